"""``python -m pcsweep.report multirun/<sweep>``: the paper's figures from a sweep's local files, no W&B needed.

Writes into ``<sweep>/report/``: benchmark bars (Fig 2), curves (Fig 3), loss landscapes (Figs 4 and 7, wide and
zoomed, contour and surface), weight distributions (Fig 5), the weight-decay comparison (Fig 6) when the sweep has
one, why a gap remains (train vs test, each layer's share of the error energy, the PC-BP gap against depth), the
learning-rate tuning when the sweep was tuned, a self-contained ``report.html`` (figures embedded) and ``report.md``.
Runs with several seeds are shown as a mean with a 95% confidence interval. Landscapes are cached in each run folder.
Nothing is chosen on the test split: among several configurations of one twin, the claims take the one with the best
validation score. Folders set aside (``<run>.other-<hash>``: trained under an earlier default) never enter a report.

The package, each module importing only those listed before it: ``sweep`` (the runs and their tables), ``style``
(colors, markers, figure helpers), ``figures`` (Figs 2, 3, 5, per layer), ``landscapes`` (Figs 4, 7, shape numbers),
``tuning`` (the learning-rate choice), ``claims_facts`` (what the claims read, claims.json), ``gap`` (why a gap
remains), ``documents`` (report.html, report.md), ``sections`` (what each section shows); here, ``build_report`` and
the ``pcsweep-report`` command.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # before any module of the package imports pyplot: the report draws into files, never a window
import seaborn as sns

from pcsweep.config.errors import exit_with
from pcsweep.report.claims import ClaimRules, groups_of
from pcsweep.report.claims_facts import claims_frame, run_fact, write_claims
from pcsweep.report.documents import write_documents
from pcsweep.report.figures import benchmark_frame, coinciding
from pcsweep.report.gap import (
    depth_gap_frame,
    energy_share_frame,
    energy_table,
    generalization_frame,
    generalization_table,
)
from pcsweep.report.landscapes import figure_landscapes, run_shapes
from pcsweep.report.sections import (
    figure_sections,
    gap_sections,
    landscape_sections,
    landscape_view,
    shape_section,
    tuning_section,
)
from pcsweep.report.sweep import Run, Sweep, accuracy_curve_frame, load_sweep, summary_frame
from pcsweep.sweep.table import read_manifest
from pcsweep.track.wandb_run import start_wandb

__all__ = [  # what pcsweep.sweep.table, the console script and the tests use; the rest lives in the modules
    "Run",
    "Sweep",
    "accuracy_curve_frame",
    "benchmark_frame",
    "build_report",
    "claims_overview",
    "cli",
    "coinciding",
    "depth_gap_frame",
    "energy_share_frame",
    "energy_table",
    "generalization_frame",
    "generalization_table",
    "load_sweep",
    "log_to_wandb",
    "main",
    "parse_rules",
    "run_fact",
    "summary_frame",
    "write_claims",
]


def build_report(
    sweep_dir: Path,
    spans=(1.0, 0.1),
    resolution: int = 41,
    samples: int = 1000,
    landscapes: bool = True,
    quiet: bool = False,
    rules: Optional[ClaimRules] = None,
) -> Path:
    """A sweep's whole report into ``<sweep>/report/``: the sections' figures, the landscapes' shape, claims.json,
    then report.html (returned) and report.md. ``landscapes=False`` skips the expensive part."""
    sweep = load_sweep(Path(sweep_dir))
    rules = rules or ClaimRules()
    # a choice among configurations only the test split could make stops here, in one line, before any work
    groups = groups_of([run_fact(run) for run in sweep.runs])
    out = sweep.path / "report"
    out.mkdir(exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    draw = partial(figure_landscapes, spans=spans, resolution=resolution, samples=samples, quiet=quiet)
    sections = tuning_section(sweep, out) + figure_sections(sweep, out) + gap_sections(sweep, out, groups)
    sections += landscape_sections(sweep, out, draw if landscapes else None, landscape_view(samples, resolution))
    shapes = run_shapes(sweep, spans, resolution, samples, quiet) if landscapes else {}
    claims, _ = write_claims(sweep, out, rules, shapes)
    sections.append(shape_section(sweep, shapes))
    html_path, _ = write_documents(sweep, out, sections, claims)
    return html_path


def log_to_wandb(html_path: Path, sweep_dir: Path, options: Optional[dict] = None) -> None:
    """The report's figures as one W&B run (job type ``report``, grouped and tagged by the sweep, whose training runs
    carry the same ``sweep=`` tag), offline without a key, as training runs are; the report folder as a ``report``
    artifact."""
    import wandb  # imported here: heavy, and only --wandb needs it

    manifest = read_manifest(Path(sweep_dir))
    sweep = (manifest.get("sweep_id") if manifest is not None else None) or Path(sweep_dir).name
    run = start_wandb(
        html_path.parent,
        **(options or {}),
        name=f"report {Path(sweep_dir).name}",
        group=sweep,
        job_type="report",
        tags=[f"sweep={sweep}"[:64]],
        config={"sweep": sweep},
    )
    try:
        run.log({p.stem: wandb.Image(str(p)) for p in html_path.parent.glob("*.png")})
        run.log({"report": wandb.Html(html_path.read_text())})
        claims_path = html_path.parent / "claims.json"
        if claims_path.is_file():
            claims = json.loads(claims_path.read_text())["claims"]
            run.log({"claims": wandb.Table(dataframe=claims_frame(claims).astype(str))})
            run.summary.update({f"claim{c['id']}": c["verdict"] for c in claims})
            artifact = wandb.Artifact(f"claims-{Path(sweep_dir).name}", type="claims")
            artifact.add_file(str(claims_path))
            run.log_artifact(artifact)
        # the report folder's own files (html, md, figures, claims.json), not its wandb/ folder
        files = sorted(
            p for p in html_path.parent.iterdir() if p.is_file() and p.suffix in (".html", ".md", ".png", ".json")
        )
        if not run.disabled and files:
            artifact = wandb.Artifact(f"report-{Path(sweep_dir).name}", type="report", metadata={"sweep": sweep})
            for path in files:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
    finally:
        run.finish()


def parse_rules(items: Sequence[str]) -> dict:
    """``--rule NAME=VALUE`` items as ClaimRules fields (counts as int, thresholds as float); a malformed one is a
    ValueError, one line for the user."""
    rules = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--rule {item!r}: expected NAME=VALUE")
        rules[name] = int(value) if name in ("min_seeds", "deep_layers") else float(value)
    return rules


def claims_overview(path: Path) -> str:
    """One line per claim, for the terminal."""
    claims = json.loads(path.read_text())["claims"]
    return "\n".join(
        f"  claim {c['id']}: {c['verdict']}" + (f" ({c['reason']})" if c["reason"] else "") for c in claims
    )


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="pcsweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder, e.g. multirun/default")
    parser.add_argument("--resolution", type=int, default=41, help="landscape grid points per axis")
    parser.add_argument("--samples", type=int, default=1000, help="training samples the landscape loss uses")
    parser.add_argument("--spans", type=float, nargs="+", default=[1.0, 0.1], help="wide and zoomed half-widths")
    parser.add_argument("--no-landscapes", action="store_true", help="skip the (expensive) landscapes")
    parser.add_argument("--wandb", action="store_true", help="also log the figures to W&B")
    parser.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a claim-verdict threshold (pcsweep.report.claims.ClaimRules), e.g. --rule accuracy_margin=0.01",
    )
    args = parser.parse_args(argv)
    try:
        rules = ClaimRules.from_mapping(parse_rules(args.rule))
        html_path = build_report(
            args.sweep, tuple(args.spans), args.resolution, args.samples, landscapes=not args.no_landscapes, rules=rules
        )
    except (FileNotFoundError, ValueError) as exc:
        exit_with(str(exc), prog="pcsweep-report")
    print(f"[pcsweep.report] {html_path}")
    print(claims_overview(html_path.parent / "claims.json"))
    if args.wandb:
        log_to_wandb(html_path, args.sweep)
    return html_path


def cli() -> None:
    """The ``pcsweep-report`` command (``python -m pcsweep.report``)."""
    main()
