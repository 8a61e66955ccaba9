"""``python -m pcsweep.report multirun/<sweep>``: the paper's figures from a sweep's local files, no W&B needed.

Writes into ``<sweep>/report/``: benchmark bars (Fig 2), curves (Fig 3), loss landscapes (Figs 4 and 7, wide and
zoomed, contour and surface), weight distributions (Fig 5), the weight-decay comparison (Fig 6) when the sweep has
one, a self-contained ``report.html`` (figures embedded) and ``report.md``. Runs with several seeds are shown as a
mean with a 95% confidence interval. Landscapes are cached in each run folder.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pcsweep.landscape import landscape  # noqa: E402
from pcsweep.summary import checks_text  # noqa: E402

TWIN_ORDER = ["bp", "pc", "pc_rc2", "pc_rc3", "pc_rc23"]
PALETTE = dict(zip(TWIN_ORDER, sns.color_palette("deep", 5)))


def twin_of(label: str) -> str:
    """``pc_256_8_rc2 wd=1e-06`` -> ``pc_rc2``; ``bp_256_8`` -> ``bp``."""
    name = label.split(" ")[0]
    algo = name.split("_")[0]
    return f"{algo}_rc{name.split('_rc')[1]}" if "_rc" in name else algo


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict

    @property
    def name(self) -> str:  # the paper's name: pc_256_8_rc2
        return self.summary["name"]

    @property
    def twin(self) -> str:
        return twin_of(self.name)

    @property
    def label(self) -> str:
        """The paper's name, plus the weight decay when there is one (Fig 6 compares the same twin with and without)."""
        decay = self.config.get("weight_decay", 0) or 0
        return self.name + (f" wd={decay:g}" if decay else "")

    @property
    def group(self) -> tuple[str, int, int]:
        return self.summary["dataset"], self.config["width"], self.config["depth"]


@dataclass
class Sweep:
    path: Path
    runs: list[Run]
    skipped: list[dict] = field(default_factory=list)  # duplicates and runs without a summary

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.summary["status"] == "complete"]


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a sweep folder")
    runs = []
    for summary_path in sorted(path.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        runs.append(Run(summary_path.parent, summary, summary.get("config", {})))
    skipped = []
    manifest = path / "sweep_runs.json"
    if manifest.is_file():
        for entry in json.loads(manifest.read_text())["runs"]:
            if entry["status"] == "duplicate":
                skipped.append({"model": entry["model"], "reason": f"duplicate of {entry['duplicate_of']}"})
            elif not (path / entry.get("run_dir", "") / "summary.json").is_file():
                skipped.append({"model": entry.get("run_dir", entry["model"]), "reason": "no summary (failed or unfinished)"})
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {path}")
    return Sweep(path, runs, skipped)


# ------------------------------------------------------------------------------------------------ tables
def summary_frame(sweep: Sweep) -> pd.DataFrame:
    rows = []
    for run in sweep.runs:
        s = run.summary
        rows.append({"model": run.label, "twin": run.twin, "dataset": s["dataset"], "width": run.config.get("width"),
                     "depth": run.config.get("depth"), "seed": run.config.get("seed"), "status": s["status"],
                     "final acc": s.get("final_test_acc"), "best acc": s.get("best_test_acc"),
                     "train loss": s.get("final_train_loss"), "test loss": s.get("final_test_loss"),
                     "train time [s]": s.get("train_seconds"), "time to 90% [s]": s.get("time_to_90"),
                     "epochs": s.get("epochs"), "conditions": checks_text(s.get("checks")),
                     "run": run.path.name})
    return pd.DataFrame(rows)


def curves_frame(sweep: Sweep) -> pd.DataFrame:
    rows = []
    for run in sweep.finished:
        for record in run.summary.get("history", []):
            rows.append({"model": run.label, "twin": run.twin, "dataset": run.summary["dataset"],
                         "width": run.config.get("width"), "seed": run.config.get("seed"),
                         "epoch": record["epoch"] + 1, "test accuracy": record.get("test_acc"),
                         "train loss": record.get("train_loss"), "test loss": record.get("test_loss")})
    return pd.DataFrame(rows)


def _order(models) -> list[str]:
    def key(model: str):
        twin = twin_of(model)
        return (TWIN_ORDER.index(twin) if twin in TWIN_ORDER else 99, model)

    return sorted(set(models), key=key)


def _palette(models) -> dict:
    colors = sns.color_palette("deep", max(len(models), 5))
    by_twin = {}
    for model in models:
        by_twin.setdefault(twin_of(model), []).append(model)
    palette = {}
    for twin, members in by_twin.items():
        base = PALETTE.get(twin, colors[len(palette) % len(colors)])
        shades = sns.light_palette(base, n_colors=len(members) + 2, reverse=True)[: len(members)]
        palette.update(dict(zip(members, [base] if len(members) == 1 else shades)))
    return palette


# ------------------------------------------------------------------------------------------------ figures
def figure_benchmark(sweep: Sweep, out: Path) -> list[Path]:
    """Fig 2: final accuracy and time to 90% of it, per model; one figure per dataset and width."""
    frame = summary_frame(sweep)
    frame = frame[frame["status"] == "complete"]
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]):
        order = _order(part["model"])
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.3 * len(order), 4.2))
        palette = _palette(order)
        for ax, column, title in ((axes[0], "final acc", "Final test accuracy"),
                                  (axes[1], "time to 90% [s]", "Time to 90% of final accuracy")):
            sns.barplot(data=part, x="model", y=column, hue="model", order=order, hue_order=order, palette=palette,
                        errorbar=("ci", 95), capsize=0.15, ax=ax, legend=False)
            ax.set_title(title)
            ax.set_xlabel("")
            ax.set_ylabel("accuracy" if column == "final acc" else "training wall time [s]")
            ax.tick_params(axis="x", rotation=30)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
        seeds = part.groupby("model")["seed"].nunique().max()
        fig.suptitle(f"{dataset}, width {width}" + (f" (mean, 95% CI over {seeds} seeds)" if seeds > 1 else ""))
        fig.tight_layout()
        paths.append(_save(fig, out / f"benchmark_{dataset}_{width}.png"))
    return paths


def figure_curves(sweep: Sweep, out: Path, select=None, suffix: str = "") -> list[Path]:
    """Fig 3: test accuracy, train and test loss per epoch; the twins of one dataset and width share axes."""
    frame = curves_frame(sweep)
    if select is not None:
        frame = frame[frame["model"].isin(select)]
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]):
        order = _order(part["model"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, column in zip(axes, ("test accuracy", "train loss", "test loss")):
            sns.lineplot(data=part, x="epoch", y=column, hue="model", hue_order=order, palette=_palette(order),
                         errorbar=("ci", 95), marker="o", ax=ax)
            ax.set_title(column.capitalize())
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if "loss" in column and (part[column].dropna() > 0).all():
                ax.set_yscale("log")
            ax.legend(title=None, fontsize=8)
        seeds = part.groupby("model")["seed"].nunique().max()
        fig.suptitle(f"{dataset}, width {width}" + (f" (mean, 95% CI over {seeds} seeds)" if seeds > 1 else ""))
        fig.tight_layout()
        paths.append(_save(fig, out / f"curves_{dataset}_{width}{suffix}.png"))
    return paths


def figure_weights(sweep: Sweep, out: Path) -> list[Path]:
    """Fig 5: distributions of the first two and the last two weight layers, per model (seeds pooled)."""
    paths = []
    for (dataset, width), runs in _by_model(sweep).items():
        order = _order(runs)
        L = len(_weights(runs[order[0]][0]))
        layers = sorted({0, 1, L - 2, L - 1})
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6))
        palette = _palette(order)
        for ax, l in zip(axes, layers):
            for model in order:
                values = torch.cat([_weights(run)[l].flatten() for run in runs[model]]).numpy()
                seeds = f" ({len(runs[model])} seeds)" if len(runs[model]) > 1 else ""
                sns.kdeplot(values, ax=ax, label=model + seeds, color=palette[model], fill=False, bw_adjust=0.8, cut=0)
            ax.set_title(f"W{l + 1}" + (" (output)" if l == L - 1 else " (first)" if l == 0 else ""))
            ax.set_xlabel("weight")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Weight distributions, {dataset}, width {width}")
        fig.tight_layout()
        paths.append(_save(fig, out / f"weights_{dataset}_{width}.png"))
    return paths


def _by_model(sweep: Sweep, select=None) -> dict[tuple, dict[str, list[Run]]]:
    """Finished runs by (dataset, width), then by label; several runs under one label are seeds."""
    groups: dict[tuple, dict[str, list[Run]]] = {}
    for run in sweep.finished:
        if select is None or run.label in select:
            groups.setdefault(run.group[:2], {}).setdefault(run.label, []).append(run)
    return groups


def _weights(run: Run) -> list[torch.Tensor]:
    state = torch.load(run.path / "weights.pt", map_location="cpu")
    count = sum(1 for k in state if k.startswith("mlp.layers.") and k.endswith(".weight"))
    return [state[f"mlp.layers.{l}.weight"].float() for l in range(count)]


def run_landscape(run: Run, span: float, resolution: int, samples: int, seed: int, quiet: bool = False) -> dict:
    """The landscape of one run, cached in its folder under a name that says how it was computed."""
    cache = run.path / f"landscape_span{span:g}_res{resolution}_n{samples}_seed{seed}.pt"
    if cache.is_file():
        return torch.load(cache)
    from pcsweep.data import load_dataset

    cfg = OmegaConf.create(run.config)
    data = load_dataset(cfg.dataset)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train), generator=gen)[:samples]
    inputs = data.train.inputs[index].double()
    target = torch.nn.functional.one_hot(data.train.labels[index], data.num_classes).double()
    state = torch.load(run.path / "weights.pt", map_location="cpu")
    L = sum(1 for k in state if k.startswith("mlp.layers.") and k.endswith(".weight"))
    weights = [state[f"mlp.layers.{l}.weight"].double() for l in range(L)]
    biases = [state[f"mlp.layers.{l}.bias"].double() for l in range(L)]

    interactive = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:  # a live counter on a terminal, one line per landscape in a log
        if not quiet and (interactive or done == total):
            print(f"{chr(13) if interactive else ''}[pcsweep.report] landscape {run.label} span {span:g}: "
                  f"{done}/{total} points", end="" if interactive else "\n", file=sys.stderr, flush=True)

    result = landscape(weights, biases, inputs, target, cfg.activation, cfg.output_loss, span=span,
                       resolution=resolution, seed=seed, progress=progress).to_dict()
    if not quiet and interactive:
        print(file=sys.stderr)
    torch.save(result, cache)
    return result


def figure_landscapes(sweep: Sweep, out: Path, spans=(1.0, 0.1), resolution: int = 41, samples: int = 1000,
                      seed: int = 0, select=None, suffix: str = "", quiet: bool = False) -> list[Path]:
    """Figs 4 and 7: per model, contour plots (wide and zoomed) and a 3-D surface of the wide view; with several
    seeds, the mean of their log-loss surfaces."""
    paths = []
    for (dataset, width), runs in _by_model(sweep, select).items():
        order = _order(runs)
        fig = plt.figure(figsize=(4.2 * len(order), 3 * 4.0))
        for col, model in enumerate(order):
            views = []
            for span in spans:
                per_seed = [run_landscape(run, span, resolution, samples, seed, quiet) for run in runs[model]]
                mean = torch.stack([torch.log10(v["losses"].clamp_min(1e-12)) for v in per_seed]).mean(0)
                views.append({"alphas": per_seed[0]["alphas"], "betas": per_seed[0]["betas"], "log_losses": mean})
            seeds = f", mean of {len(runs[model])} seeds" if len(runs[model]) > 1 else ""
            for row, (span, view) in enumerate(zip(spans, views)):
                ax = fig.add_subplot(3, len(order), row * len(order) + col + 1)
                a, b = torch.meshgrid(view["alphas"], view["betas"], indexing="ij")
                z = view["log_losses"]
                contour = ax.contourf(a.numpy(), b.numpy(), z.numpy(), levels=30, cmap="viridis")
                ax.contour(a.numpy(), b.numpy(), z.numpy(), levels=10, colors="white", linewidths=0.4)
                ax.plot(0, 0, "r*", markersize=8)
                fig.colorbar(contour, ax=ax, label="log10 loss")
                ax.set_title(f"{model}{seeds}\n{'zoomed ' if row else ''}[-{span:g}, {span:g}]²", fontsize=9)
                ax.set_xlabel("direction 1")
                ax.set_ylabel("direction 2")
            ax3 = fig.add_subplot(3, len(order), 2 * len(order) + col + 1, projection="3d")
            a, b = torch.meshgrid(views[0]["alphas"], views[0]["betas"], indexing="ij")
            z = views[0]["log_losses"]
            ax3.plot_surface(a.numpy(), b.numpy(), z.numpy(), cmap="viridis", linewidth=0, antialiased=True)
            ax3.set_title(f"{model}: surface", fontsize=9)
            ax3.set_zlabel("log10 loss")
        fig.suptitle(f"Loss landscapes (Li et al. 2018, filter-normalized), {dataset}, width {width}")
        fig.tight_layout()
        paths.append(_save(fig, out / f"landscapes_{dataset}_{width}{suffix}.png"))
    return paths


def weight_decay_models(sweep: Sweep) -> Optional[list[str]]:
    """Labels of one twin trained with and without weight decay, if the sweep has such a pair."""
    by_name: dict[str, set] = {}
    for run in sweep.finished:
        by_name.setdefault(run.name, set()).add(run.label)
    for labels in by_name.values():
        if any("wd=" in label for label in labels) and any("wd=" not in label for label in labels):
            return sorted(labels)
    return None


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ documents
def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_documents(sweep: Sweep, out: Path, sections: list[tuple[str, str, list[Path]]]) -> tuple[Path, Path]:
    frame = summary_frame(sweep).drop(columns=["twin"])
    notes = [f"{s['model']}: {s['reason']}" for s in sweep.skipped]
    notes += [f"{r.label} ({r.summary['dataset']}): diverged ({r.summary.get('diverged_reason') or 'non-finite'}), "
              "left out of the figures" for r in sweep.runs if r.summary["status"] == "diverged"]
    notes += [f"{r.label} ({r.summary['dataset']}): failed to learn (final accuracy "
              f"{r.summary.get('final_test_acc') or 0:.3f}), left out of the figures and rankings" for r in sweep.runs
              if r.summary["status"] == "failed_to_learn"]
    table_html = frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0)
    parts = [f"<h1>pcsweep report: {html.escape(sweep.path.name)}</h1>", "<h2>Runs</h2>", table_html]
    if notes:
        parts += ["<h2>Not shown</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
    md = [f"# pcsweep report: {sweep.path.name}", "", "## Runs", "", frame.to_markdown(index=False, floatfmt=".4g")
          if _has_tabulate() else frame.to_string(index=False), ""]
    if notes:
        md += ["## Not shown", ""] + [f"- {n}" for n in notes] + [""]
    for title, text, images in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>")
        parts += [f'<img src="{_embed(p)}" alt="{html.escape(p.name)}">' for p in images]
        md += [f"## {title}", "", text, ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}img{max-width:100%;"
             "margin:0.5em 0}table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;"
             "border-bottom:1px solid #ddd;text-align:right}th{background:#f3f3f3}")
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>pcsweep report</title>"
                         f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    md_path.write_text("\n".join(md))
    return html_path, md_path


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def build_report(sweep_dir: Path, spans=(1.0, 0.1), resolution: int = 41, samples: int = 1000,
                 landscapes: bool = True, quiet: bool = False) -> Path:
    sweep = load_sweep(Path(sweep_dir))
    out = sweep.path / "report"
    out.mkdir(exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    sections = [
        ("Benchmark (Fig 2)", "Final test accuracy and training wall time to reach 90% of it.",
         figure_benchmark(sweep, out)),
        ("Curves (Fig 3)", "Test accuracy, train and test loss per epoch.", figure_curves(sweep, out)),
        ("Weight distributions (Fig 5)", "First two and last two weight layers.", figure_weights(sweep, out)),
    ]
    if landscapes:
        sections.append((
            "Loss landscapes (Figs 4, 7)",
            f"Feedforward output loss on {samples} training samples along two filter-normalized Gaussian directions, "
            f"{resolution}x{resolution} grid; wide, zoomed and as a surface. The star is the trained model.",
            figure_landscapes(sweep, out, spans, resolution, samples, quiet=quiet)))
    pair = weight_decay_models(sweep)
    if pair:
        images = figure_curves(sweep, out, select=pair, suffix="_weight_decay")
        if landscapes:
            images += figure_landscapes(sweep, out, spans, resolution, samples, select=pair, suffix="_weight_decay",
                                        quiet=quiet)
        sections.append(("Weight decay (Fig 6)", "The same twin with and without weight decay.", images))
    html_path, _ = write_documents(sweep, out, sections)
    return html_path


def log_to_wandb(html_path: Path, sweep_dir: Path, logger_cfg=None) -> None:
    """The report's figures as one W&B run (job type ``report``), offline without a key, as training runs are."""
    import wandb

    from pcsweep.tracking import start_wandb

    logger_cfg = logger_cfg or OmegaConf.create({"mode": "auto", "project": "pcsweep", "entity": None,
                                                 "init_timeout": 30})
    manifest = Path(sweep_dir) / "sweep_runs.json"
    group = json.loads(manifest.read_text()).get("sweep_id") if manifest.is_file() else None
    run = start_wandb(logger_cfg, html_path.parent, name=f"report {Path(sweep_dir).name}",
                      group=group or Path(sweep_dir).name, job_type="report")
    try:
        run.log({p.stem: wandb.Image(str(p)) for p in html_path.parent.glob("*.png")})
        run.log({"report": wandb.Html(html_path.read_text())})
    finally:
        run.finish()


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m pcsweep.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder, e.g. multirun/default")
    parser.add_argument("--resolution", type=int, default=41, help="landscape grid points per axis")
    parser.add_argument("--samples", type=int, default=1000, help="training samples the landscape loss uses")
    parser.add_argument("--spans", type=float, nargs="+", default=[1.0, 0.1], help="wide and zoomed half-widths")
    parser.add_argument("--no-landscapes", action="store_true", help="skip the (expensive) landscapes")
    parser.add_argument("--wandb", action="store_true", help="also log the figures to W&B")
    args = parser.parse_args(argv)
    try:
        html_path = build_report(args.sweep, tuple(args.spans), args.resolution, args.samples,
                                 landscapes=not args.no_landscapes)
    except FileNotFoundError as exc:
        print(f"pcsweep.report: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    print(f"[pcsweep.report] {html_path}")
    if args.wandb:
        log_to_wandb(html_path, args.sweep)
    return html_path


if __name__ == "__main__":
    main()
