"""``python -m pcsweep.report multirun/<sweep>``: the paper's figures from a sweep's local files, no W&B needed.

Writes into ``<sweep>/report/``: benchmark bars (Fig 2), curves (Fig 3), loss landscapes (Figs 4 and 7, wide and
zoomed, contour and surface), weight distributions (Fig 5), the weight-decay comparison (Fig 6) when the sweep has
one, why a gap remains (train vs test, each layer's share of the error energy, the PC-BP gap against depth), the
learning-rate tuning when the sweep was tuned, a self-contained ``report.html`` (figures embedded) and ``report.md``.
Runs with several seeds are shown as a mean with a 95% confidence interval. Landscapes are cached in each run folder.
Nothing is chosen on the test split: among several configurations of one twin, the claims take the one with the best
validation score. Folders set aside (``<run>.other-<hash>``: trained under an earlier default) never enter a report.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from pcsweep.claims import PC_TWINS, ClaimRules, Setting, claims_document, evaluate, groups_of, interval, paired
from pcsweep.errors import exit_with
from pcsweep.files import read_json, write_atomic
from pcsweep.landscape import hessian_extremes, landscape, plane_convexity, sharpness
from pcsweep.layers import wasserstein1
from pcsweep.summary import checks_text, read_manifest

TWIN_ORDER = ["bp", "pc", "pc_rc2", "pc_rc3", "pc_rc23"]
PALETTE = dict(zip(TWIN_ORDER, sns.color_palette("deep", 5)))
# pc and pc_rc3 (and rc2/rc23) can draw the same curve: each twin its own marker and dashes, so no line hides another
TWIN_MARKERS = {"bp": "o", "pc": "s", "pc_rc2": "^", "pc_rc3": "D", "pc_rc23": "v"}
TWIN_DASHES = {"bp": "", "pc": (5, 2), "pc_rc2": (1, 1.5), "pc_rc3": (4, 1.5, 1, 1.5), "pc_rc23": (8, 2, 2, 2)}
COINCIDE = 0.01  # max |difference| of two mean curves (accuracy) under which one line hides the other
SET_ASIDE = ".other-"  # a run folder trained under an earlier default, renamed by pcsweep.run: never reported


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
    variant: str = ""  # set when runs of different configs share one name: they are shown apart, never pooled

    @cached_property
    def family(self) -> str:
        """The run's identity without its seed: runs of one family are seeds of one experiment."""
        from pcsweep.config import config_hash

        return config_hash({k: v for k, v in self.config.items() if k != "seed"})

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
        return self.name + (f" wd={decay:g}" if decay else "") + self.variant

    @property
    def group(self) -> tuple[str, int, int]:
        return self.summary["dataset"], self.config["width"], self.config["depth"]

    @property
    def lr(self) -> Optional[float]:
        """The learning rate it trained with (summaries before ``lr`` was written: the config's)."""
        given = self.summary.get("lr")
        return given if given is not None else (self.config.get("optimizer") or {}).get("lr")

    def columns(self) -> dict[str, Any]:
        """What every per-run table starts with."""
        return {
            "model": self.label,
            "twin": self.twin,
            "dataset": self.summary["dataset"],
            "width": self.config.get("width"),
            "depth": self.config.get("depth"),
            "seed": self.config.get("seed"),
        }


@dataclass
class Sweep:
    path: Path
    runs: list[Run]
    skipped: list[dict] = field(default_factory=list)  # duplicates and runs without a summary
    tuning: Optional[dict] = None  # <sweep>/tuning/tuning.json when the sweep was tuned (its trials are no runs)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.summary["status"] == "complete"]


def seeds_only(runs: list[Run]) -> tuple[list[Run], list[dict]]:
    """Make every group of runs a set of seeds of one config: a second run of the same config and seed is listed,
    not counted; runs of different configs under one name are told apart (``[family]`` after the name)."""
    kept: list[Run]
    skipped: list[dict]
    seen: dict[tuple[str, Any], str]  # (family, seed) -> the folder that holds it
    kept, skipped, seen = [], [], {}
    for run in runs:
        key = (run.family, run.config.get("seed"))
        if key in seen:
            skipped.append(
                {"model": run.path.name, "reason": f"same config and seed as {seen[key]}: listed, not counted"}
            )
            continue
        seen[key] = run.path.name
        kept.append(run)
    families: dict[tuple, set] = {}
    for run in kept:
        families.setdefault((run.summary["dataset"], run.label), set()).add(run.family)
    for run in kept:
        if len(families[(run.summary["dataset"], run.label)]) > 1:
            run.variant = f" [{run.family[:6]}]"
    return kept, skipped


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a sweep folder")
    runs = []
    for summary_path in sorted(path.glob("*/summary.json")):  # one level: tuning/<trial>/ is never a sweep run
        if SET_ASIDE in summary_path.parent.name:
            continue
        summary = read_json(summary_path)  # an unreadable one is set aside (one line): that run is not reported
        if isinstance(summary, dict):
            runs.append(Run(summary_path.parent, summary, summary.get("config", {})))
    runs, skipped = seeds_only(runs)
    manifest = read_manifest(path)
    if manifest is not None:
        for entry in manifest["runs"]:
            if entry["status"] == "duplicate":
                skipped.append({"model": entry["model"], "reason": f"duplicate of {entry['duplicate_of']}"})
            elif not (path / entry.get("run_dir", "") / "summary.json").is_file():
                skipped.append(
                    {"model": entry.get("run_dir", entry["model"]), "reason": "no summary (failed or unfinished)"}
                )
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {path}")
    tuning = read_json(path / "tuning" / "tuning.json")
    return Sweep(path, runs, skipped, tuning if isinstance(tuning, dict) and tuning.get("families") else None)


# ------------------------------------------------------------------------------------------------ tables
def summary_frame(sweep: Sweep) -> pd.DataFrame:
    rows = []
    for run in sweep.runs:
        s = run.summary
        rows.append(
            {
                **run.columns(),
                "lr": run.lr,
                "lr from": s.get("lr_origin"),
                "status": s["status"],
                "val score": s.get("val_score"),
                "final acc": s.get("final_test_acc"),
                "best acc": s.get("best_test_acc"),
                "train loss": s.get("final_train_loss"),
                "test loss": s.get("final_test_loss"),
                "train time [s]": s.get("train_seconds"),
                "time to 90% [s]": s.get("time_to_90"),
                "epochs": s.get("epochs"),
                "conditions": checks_text(s.get("checks")),
                "run": run.path.name,
            }
        )
    return pd.DataFrame(rows)


BATCHES = "training batches"  # the x-axis all twins share: a relax=2 twin's 32 optimizer steps per batch are one


def _finished(sweep: Sweep, select=None) -> list[Run]:
    return [run for run in sweep.finished if select is None or run.label in select]


def curves_frame(sweep: Sweep, select=None) -> pd.DataFrame:
    """Per epoch: test accuracy, train and test loss, at the batch where the epoch ended."""
    rows = []
    for run in _finished(sweep, select):
        for record in run.summary.get("history", []):
            rows.append(
                {
                    **run.columns(),
                    "epoch": record["epoch"] + 1,
                    BATCHES: record.get("step", record["epoch"] + 1),
                    "test accuracy": record.get("test_acc"),
                    "train loss": record.get("train_loss"),
                    "test loss": record.get("test_loss"),
                }
            )
    return pd.DataFrame(rows)


def accuracy_curve_frame(sweep: Sweep, select=None) -> pd.DataFrame:
    """Test (and validation) accuracy at every evaluation a run recorded (about ten per epoch, ``summary["curve"]``);
    a run without a curve falls back to its per-epoch records."""
    rows = []
    for run in _finished(sweep, select):
        for point in run.summary.get("curve") or run.summary.get("history", []):
            rows.append(
                {
                    **run.columns(),
                    BATCHES: point.get("step", point["epoch"] + 1),
                    "test accuracy": point.get("test_acc"),
                    "validation accuracy": point.get("val_acc"),
                }
            )
    return pd.DataFrame(rows)


def _order(models) -> list[str]:
    def key(model: str):
        twin = twin_of(model)
        return (TWIN_ORDER.index(twin) if twin in TWIN_ORDER else 99, model)

    return sorted(set(models), key=key)


def _palette(models) -> dict:
    colors = sns.color_palette("deep", max(len(models), 5))
    by_twin: dict[str, list] = {}
    for model in models:
        by_twin.setdefault(twin_of(model), []).append(model)
    palette: dict[Any, Any] = {}  # model -> color
    for twin, members in by_twin.items():
        base = PALETTE.get(twin, colors[len(palette) % len(colors)])
        shades = sns.light_palette(base, n_colors=len(members) + 2, reverse=True)[: len(members)]
        palette.update(dict(zip(members, [base] if len(members) == 1 else shades)))
    return palette


def _styles(models) -> dict:
    """Seaborn's style arguments for ``models``: each twin its marker and dash pattern (seeds' shades share them)."""
    return {
        "style": "model",
        "style_order": list(models),
        "markers": {m: TWIN_MARKERS.get(twin_of(m), "X") for m in models},
        "dashes": {m: TWIN_DASHES.get(twin_of(m), (2, 1)) for m in models},
    }


def _slant(ax) -> None:
    """Model names on the x-axis, readable."""
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")


def _seeds_title(head: str, part: pd.DataFrame) -> str:
    seeds = part.groupby("model")["seed"].nunique().max()
    return head + (f" (mean, 95% CI over {seeds} seeds)" if seeds > 1 else "")


def _log_if_wide(ax, values: pd.Series) -> None:
    """A log y-axis for positive values that span a decade or more (a narrower range reads better linear)."""
    values = values.dropna()
    if len(values) and (values > 0).all() and values.max() >= 10 * values.min():
        ax.set_yscale("log")


def _finish(fig, title: str, notes: Sequence[str] = ()) -> None:
    """The figure's title, and its notes (lines that coincide) under the panels, where no line can hide them."""
    fig.suptitle(title, fontsize=12)
    if notes:
        fig.text(0.5, 0.015, "\n".join(notes), ha="center", va="bottom", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * len(notes) if notes else 0, 1, 1))


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
        for ax, column, title in (
            (axes[0], "final acc", "Final test accuracy"),
            (axes[1], "time to 90% [s]", "Time to 90% of final accuracy"),
        ):
            sns.barplot(
                data=part,
                x="model",
                y=column,
                hue="model",
                order=order,
                hue_order=order,
                palette=palette,
                errorbar=("ci", 95),
                seed=0,
                capsize=0.15,
                ax=ax,
                legend=False,
            )
            ax.set_title(title)
            ax.set_ylabel("accuracy" if column == "final acc" else "training wall time [s]")
            _slant(ax)
        fig.suptitle(_seeds_title(f"{dataset}, width {width}", part))
        fig.tight_layout()
        paths.append(_save(fig, out / f"benchmark_{dataset}_{width}.png"))
    return paths


def figure_curves(sweep: Sweep, out: Path, select=None, suffix: str = "") -> list[Path]:
    """Fig 3: test (and validation) accuracy at every recorded evaluation, train and test loss per epoch, all on the
    batch axis the twins share, seeds as a band; where two models' mean curves coincide, the figure says so."""
    points, epochs = accuracy_curve_frame(sweep, select), curves_frame(sweep, select)
    paths: list[Path] = []
    if points.empty:
        return paths
    for (dataset, width), part in points.groupby(["dataset", "width"]):
        per_epoch = epochs[(epochs["dataset"] == dataset) & (epochs["width"] == width)]
        panels = [(part, "test accuracy"), (per_epoch, "train loss"), (per_epoch, "test loss")]
        if part["validation accuracy"].notna().any():
            panels.insert(1, (part, "validation accuracy"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4))
        for ax, (data, column) in zip(axes, panels):
            _curve_panel(ax, data.dropna(subset=[column]), column, _order(part["model"]))
            if ax is not axes[0] and ax.get_legend() is not None:
                ax.get_legend().remove()  # the first panel's legend holds every model
        _finish(fig, _seeds_title(f"{dataset}, width {width}", part), coinciding(part))
        paths.append(_save(fig, out / f"curves_{dataset}_{width}{suffix}.png"))
    return paths


def _curve_panel(ax, data: pd.DataFrame, column: str, order: list[str]) -> None:
    """One quantity against training batches: per model its mean over seeds, a 95% CI band, its twin's style."""
    if data.empty:
        ax.set_visible(False)
        return
    present = [m for m in order if m in set(data["model"])]
    sns.lineplot(
        data=data,
        x=BATCHES,
        y=column,
        hue="model",
        hue_order=present,
        palette=_palette(order),
        errorbar=("ci", 95),
        seed=0,
        markevery=max(1, data[BATCHES].nunique() // 12),
        markersize=5,
        ax=ax,
        **_styles(present),
    )
    ax.set_title(column.capitalize())
    ax.set_xlabel(BATCHES)
    if "loss" in column:
        _log_if_wide(ax, data[column])
    ax.legend(title=None, fontsize=8)


def coinciding(
    frame: pd.DataFrame, column: str = "test accuracy", x: str = BATCHES, tolerance: float = COINCIDE
) -> list[str]:
    """Models whose mean curve lies on an earlier model's (max |difference| below ``tolerance`` over at least two
    shared ``x``): one line hides the other, so the figure says so."""
    means = frame.dropna(subset=[column]).groupby(["model", x])[column].mean()
    curves = {model: curve.droplevel(0) for model, curve in means.groupby(level=0)}
    order = _order(curves)
    notes = []
    for i, later in enumerate(order):
        for earlier in order[:i]:
            shared = curves[earlier].index.intersection(curves[later].index)
            gap = float((curves[earlier][shared] - curves[later][shared]).abs().max()) if len(shared) > 1 else math.inf
            if gap < tolerance:
                notes.append(f"{later} coincides with {earlier} (max |Δ| {gap:.3f})")
                break
    return notes


def curve_notes(sweep: Sweep) -> list[str]:
    """``coinciding`` for every dataset and width, for the report's text."""
    points = accuracy_curve_frame(sweep)
    if points.empty:
        return []
    return [
        f"{dataset}, width {width}: {note}"
        for (dataset, width), part in points.groupby(["dataset", "width"])
        for note in coinciding(part)
    ]


def figure_weights(sweep: Sweep, out: Path) -> list[Path]:
    """Fig 5: distributions of the first two and the last two weight layers, per model (seeds pooled); layers are
    counted from each end, so models of different depths share the panels."""
    paths = []
    for (dataset, width), runs in sorted(_by_model(sweep).items()):
        order = _order(runs)
        weights = {model: [_weights(run) for run in runs[model]] for model in order}
        depths = {len(per_seed[0]) for per_seed in weights.values()}
        positions = [l if l < 2 else l - min(depths) for l in sorted({0, 1, min(depths) - 2, min(depths) - 1})]
        fig, axes = plt.subplots(1, len(positions), figsize=(4 * len(positions), 3.6))
        palette = _palette(order)
        for ax, l in zip(axes, positions):
            for model in order:
                values = torch.cat([layers[l].flatten() for layers in weights[model]]).numpy()
                seeds = f" ({len(runs[model])} seeds)" if len(runs[model]) > 1 else ""
                style = {"color": palette[model], "linestyle": _linestyle(twin_of(model))}
                sns.kdeplot(values, ax=ax, label=model + seeds, fill=False, bw_adjust=0.8, cut=0, **style)
            ax.set_title(_layer_title(l, depths))
            ax.set_xlabel("weight")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Weight distributions, {dataset}, width {width}")
        fig.tight_layout()
        paths.append(_save(fig, out / f"weights_{dataset}_{width}.png"))
    return paths


def _layer_title(position: int, depths: set[int]) -> str:
    """``W1 (first)``, ``W8 (output)``; with several depths, ``W(L-1)`` and ``W(L) (output)``."""
    if position >= 0:
        return f"W{position + 1}" + (" (first)" if position == 0 else "")
    if len(depths) == 1:
        name = f"W{min(depths) + position + 1}"
    else:
        name = "W(L)" if position == -1 else f"W(L{position + 1})"
    return name + (" (output)" if position == -1 else "")


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


_DATASETS: dict = {}


def _loss_setting(run: Run, samples: int, seed: int):
    """What a run's landscape is measured on: its trained weights and biases (float64) and a fixed training subset."""
    from pcsweep.data import load_dataset
    from pcsweep.settings import dataset_settings

    cfg = OmegaConf.create(run.config)
    key = OmegaConf.to_yaml(cfg.dataset)
    if key not in _DATASETS:  # one load per dataset for the whole report
        _DATASETS[key] = load_dataset(dataset_settings(run.config["dataset"]))
    data = _DATASETS[key]
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train), generator=gen)[:samples]
    inputs = data.train.inputs[index].double()
    target = torch.nn.functional.one_hot(data.train.labels[index], data.num_classes).double()
    state = torch.load(run.path / "weights.pt", map_location="cpu")
    L = sum(1 for k in state if k.startswith("mlp.layers.") and k.endswith(".weight"))
    weights = [state[f"mlp.layers.{l}.weight"].double() for l in range(L)]
    biases = [state[f"mlp.layers.{l}.bias"].double() for l in range(L)]
    return cfg, weights, biases, inputs, target


def run_landscape(run: Run, span: float, resolution: int, samples: int, seed: int, quiet: bool = False) -> dict:
    """The landscape of one run, cached in its folder under a name that says how it was computed."""
    cache = run.path / f"landscape_span{span:g}_res{resolution}_n{samples}_seed{seed}.pt"
    if cache.is_file():
        return torch.load(cache)
    cfg, weights, biases, inputs, target = _loss_setting(run, samples, seed)

    interactive = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:  # a live counter on a terminal, one line per landscape in a log
        if not quiet and (interactive or done == total):
            print(
                f"{chr(13) if interactive else ''}[pcsweep.report] landscape {run.label} span {span:g}: "
                f"{done}/{total} points",
                end="" if interactive else "\n",
                file=sys.stderr,
                flush=True,
            )

    result = landscape(
        weights,
        biases,
        inputs,
        target,
        cfg.activation,
        cfg.output_loss,
        span=span,
        resolution=resolution,
        seed=seed,
        progress=progress,
    ).to_dict()
    if not quiet and interactive:
        print(file=sys.stderr)
    torch.save(result, cache)
    return result


def figure_landscapes(
    sweep: Sweep,
    out: Path,
    spans=(1.0, 0.1),
    resolution: int = 41,
    samples: int = 1000,
    seed: int = 0,
    select=None,
    suffix: str = "",
    quiet: bool = False,
) -> list[Path]:
    """Figs 4 and 7: per model, contour plots (wide and zoomed) and a 3-D surface of the wide view; with several
    seeds, the mean of their log-loss surfaces."""
    paths = []
    for (dataset, width), runs in sorted(_by_model(sweep, select).items()):
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


# ------------------------------------------------------------------------------------------------ claims
def run_shape(run: Run, spans, resolution: int, samples: int, seed: int = 0, quiet: bool = False) -> dict:
    """The landscape's shape as numbers (README: "Landscape shape"): the plane's convex share in the wide and zoomed
    views, the Hessian's extreme eigenvalues at the trained weights, and the loss increase at the zoomed radius."""
    views = {}
    for name, span in (("wide", max(spans)), ("zoomed", min(spans))):
        grid = run_landscape(run, span, resolution, samples, seed, quiet)
        views[name] = plane_convexity(grid["losses"], grid["alphas"])
    cache = run.path / f"shape_n{samples}_r{min(spans):g}_seed{seed}.json"
    measured = read_json(cache)
    if measured is None:
        cfg, weights, biases, inputs, target = _loss_setting(run, samples, seed)
        args = (weights, biases, inputs, target, cfg.activation, cfg.output_loss)
        measured = {
            "hessian": hessian_extremes(*args, seed=seed),
            "sharpness": sharpness(*args, radius=min(spans), seed=seed),
        }
        write_atomic(cache, json.dumps(measured))
    return {**views, **measured}


def run_fact(run: Run, shape: Optional[dict] = None) -> dict:
    """What the claims read of one run (pcsweep.claims), its validation score included: configurations of one twin
    are chosen on it, never on the test split the claims are judged on."""
    s, checks = run.summary, run.summary.get("checks") or {}
    layers = (s.get("layers") or [{}])[-1]
    variance = (checks.get("variance") or {}).get("layers")
    dataset = run.config.get("dataset")
    return {
        "label": run.label,
        "twin": run.twin,
        "dataset": s["dataset"],
        "width": run.config.get("width"),
        "depth": run.config.get("depth"),
        "seed": run.config.get("seed"),
        "lr": run.lr,
        "family": run.family,
        "weight_decay": run.config.get("weight_decay") or 0.0,
        "status": s["status"],
        "val_score": s.get("val_score"),
        "val_fraction": dataset.get("val_fraction") if isinstance(dataset, dict) else None,
        "final_acc": s.get("final_test_acc"),
        "test_loss": s.get("final_test_loss"),
        "t90": s.get("time_to_90"),
        "condition2": (checks.get("condition2") or {}).get("verdict"),
        "inference": (checks.get("inference") or {}).get("verdict"),
        "change": layers.get("change"),
        "gaussian": layers.get("gaussian_distance"),
        "log_variance_mean": [v["mean"] for v in variance] if variance else None,
        "shape": shape,
    }


def run_facts(sweep: Sweep, shapes: dict[Path, dict]) -> list[dict]:
    """``run_fact`` of every run (failed ones make claims inconclusive), with each finished PC run's per-layer
    weight distance to bp's run of the same seed and architecture."""
    bp_weights = {}
    for run in sweep.finished:
        if run.twin == "bp":
            bp_weights[run.group + (run.config.get("seed"),)] = _weights(run)
    facts = []
    for run in sweep.runs:
        fact = run_fact(run, shapes.get(run.path))
        bp = bp_weights.get((fact["dataset"], fact["width"], fact["depth"], fact["seed"]))
        if bp is not None and run.twin != "bp" and fact["status"] == "complete":
            fact["weight_distance"] = [wasserstein1(w, b) for w, b in zip(_weights(run), bp)]
        facts.append(fact)
    return facts


def _fmt_value(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _ci_text(ci: Optional[Sequence[float]], n: int) -> str:
    """A 95% interval in a table cell, or why there is none."""
    if ci:
        return f"[{ci[0]:.3g}, {ci[1]:.3g}]"
    return f"{n} seed: no interval" if n == 1 else "-"


def claims_frame(results: list[dict]) -> pd.DataFrame:
    rows = []
    for claim in results:
        for group in claim["groups"]:
            ci = group.get("ci")
            rows.append(
                {
                    "claim": claim["id"],
                    "setting": f"{group['dataset']}"
                    + (f", width {group['width']}" if group.get("width") else "")
                    + (f", depth {group['depth']}" if group.get("depth") else ""),
                    "value": _fmt_value(group.get("value")),
                    "95% CI": _ci_text(ci, group.get("n", 0)),
                    "seeds": group.get("n", 0),
                    "verdict": group["verdict"],
                    "reason": group.get("reason") or "",
                }
            )
    return pd.DataFrame(rows)


def write_claims(sweep: Sweep, out: Path, rules: ClaimRules, shapes: dict[Path, dict]) -> tuple[list[dict], Path]:
    results = evaluate(run_facts(sweep, shapes), rules)
    path = out / "claims.json"
    write_atomic(path, json.dumps(claims_document(results, rules), indent=1, sort_keys=True))
    return results, path


def _last_energy(run: Run) -> Optional[list[float]]:
    """The error energy per layer (1 = input side) at the weight update, on the run's last probe batch."""
    probes = run.summary.get("conditions") or []
    return ((probes[-1] or {}).get("condition2") or {}).get("layer_energy_at_T") if probes else None


def figure_layers(sweep: Sweep, out: Path) -> list[Path]:
    """Where learning and error sit, per layer: relative change from the initial weights, distance from a Gaussian
    and (PC) the error energy per layer at the end of inference; seeds averaged."""
    rows = []
    for run in sweep.finished:
        layers = (run.summary.get("layers") or [{}])[-1]
        energy = _last_energy(run)
        for l, change in enumerate(layers.get("change") or []):
            rows.append(
                {
                    "model": run.label,
                    "dataset": run.summary["dataset"],
                    "width": run.config.get("width"),
                    "layer": l + 1,
                    "relative change": change,
                    "distance from Gaussian": layers["gaussian_distance"][l],
                    "error energy at T": energy[l] if energy else None,
                }
            )
    frame = pd.DataFrame(rows)
    paths: list[Path] = []
    if frame.empty:
        return paths
    for (dataset, width), part in frame.groupby(["dataset", "width"]):
        order = _order(part["model"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, column in zip(axes, ("relative change", "distance from Gaussian", "error energy at T")):
            data = part.dropna(subset=[column])
            if data.empty:
                ax.set_visible(False)
                continue
            sns.lineplot(
                data=data,
                x="layer",
                y=column,
                hue="model",
                hue_order=_order(data["model"]),
                palette=_palette(order),
                errorbar=("ci", 95),
                seed=0,
                ax=ax,
                **_styles(_order(data["model"])),
            )
            ax.set_title(column.capitalize() + (" (PC)" if column == "error energy at T" else ""))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if column != "distance from Gaussian":
                _log_if_wide(ax, data[column])
            ax.legend(title=None, fontsize=8)
        fig.suptitle(f"Per layer (1 = input side), {dataset}, width {width}")
        fig.tight_layout()
        paths.append(_save(fig, out / f"layers_{dataset}_{width}.png"))
    return paths


def variance_frame(sweep: Sweep, labels) -> pd.DataFrame:
    """Mean log S per layer and label (seeds averaged), from each run's last variance statistics."""
    columns: dict[str, list[list[float]]] = {}  # label -> per run, each layer's mean log S
    for run in sweep.finished:
        layers = ((run.summary.get("checks") or {}).get("variance") or {}).get("layers")
        if run.label in labels and layers:
            columns.setdefault(run.label, []).append([layer["mean"] for layer in layers])
    frame = pd.DataFrame({label: [sum(col) / len(col) for col in zip(*rows)] for label, rows in columns.items()})
    frame.insert(0, "layer", [f"S{l + 1}" for l in range(len(frame))])
    return frame


def shape_frame(sweep: Sweep, shapes: dict[Path, dict]) -> pd.DataFrame:
    rows = []
    for run in sweep.finished:
        shape = shapes.get(run.path)
        if shape:
            rows.append(
                {
                    "model": run.label,
                    "dataset": run.summary["dataset"],
                    "seed": run.config.get("seed"),
                    "lambda_max": shape["hessian"]["lambda_max"],
                    "lambda_min": shape["hessian"]["lambda_min"],
                    "|min/max|": shape["hessian"]["ratio"],
                    "convex share (wide)": shape["wide"]["convex_fraction"],
                    "convex share (zoomed)": shape["zoomed"]["convex_fraction"],
                    "convex radius": shape["wide"]["convex_radius"],
                    f"loss rise at r={shape['sharpness']['radius']:g}": shape["sharpness"]["increase"],
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = {model: i for i, model in enumerate(_order(frame["model"]))}
    return frame.sort_values(["dataset", "model", "seed"], key=lambda c: c.map(order) if c.name == "model" else c)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ why a gap remains
def _number(value: Any) -> float:
    """A table cell as a float (NaN when missing), so pandas and seaborn treat the column as numbers."""
    return float(value) if value is not None else math.nan


def _mean(values) -> Optional[float]:
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _model_parts(frame: pd.DataFrame) -> list[tuple[tuple[str, Any, str], pd.DataFrame]]:
    """A per-run frame's rows per dataset, width and model, in the report's model order."""
    if frame.empty:
        return []
    return [
        ((dataset, width, model), setting[setting["model"] == model])
        for (dataset, width), setting in frame.groupby(["dataset", "width"])
        for model in _order(setting["model"])
    ]


def generalization_frame(sweep: Sweep) -> pd.DataFrame:
    """Per finished run, final train and test accuracy and loss: what it learned against what carries over."""
    rows = []
    for run in sweep.finished:
        s, last = run.summary, (run.summary.get("history") or [{}])[-1]
        train_acc = s.get("final_train_acc")  # summaries before it was written: the last epoch's record
        rows.append(
            {
                **run.columns(),
                "train acc": _number(train_acc if train_acc is not None else last.get("train_acc")),
                "test acc": _number(s.get("final_test_acc")),
                "train loss": _number(s.get("final_train_loss")),
                "test loss": _number(s.get("final_test_loss")),
            }
        )
    return pd.DataFrame(rows)


def generalization_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean train and test accuracy, their gap (train - test) with its 95% t-interval over seeds."""
    rows = []
    for (dataset, width, model), part in _model_parts(frame):
        gaps = (part["train acc"] - part["test acc"]).dropna().tolist()
        rows.append(
            {
                "dataset": dataset,
                "width": width,
                "model": model,
                "seeds": len(part),
                "train acc": _mean(part["train acc"]),
                "test acc": _mean(part["test acc"]),
                "gap": _mean(gaps),
                "gap 95% CI": _ci_text(interval(gaps), len(gaps)),
                "train loss": _mean(part["train loss"]),
                "test loss": _mean(part["test loss"]),
            }
        )
    return pd.DataFrame(rows)


SPLITS = ("train", "test")


def figure_generalization(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Train next to test, accuracy and loss, per model (mean and 95% CI over seeds)."""
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]) if not frame.empty else []:
        order = _order(part["model"])
        both = pd.concat(
            [part.assign(split=split, accuracy=part[f"{split} acc"], loss=part[f"{split} loss"]) for split in SPLITS]
        )
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(order), 4.2))
        for ax, column in zip(axes, ("accuracy", "loss")):
            data = both.dropna(subset=[column])
            if data.empty:
                ax.set_visible(False)
                continue
            sns.barplot(
                data=data,
                x="model",
                y=column,
                hue="split",
                order=order,
                hue_order=list(SPLITS),
                errorbar=("ci", 95),
                seed=0,
                capsize=0.1,
                ax=ax,
            )
            ax.set_title(f"Final {column}, train and test")
            _slant(ax)
            ax.legend(title=None, fontsize=8)
        fig.suptitle(_seeds_title(f"Generalization, {dataset}, width {width}", part))
        fig.tight_layout()
        paths.append(_save(fig, out / f"generalization_{dataset}_{width}.png"))
    return paths


def energy_share_frame(sweep: Sweep) -> pd.DataFrame:
    """Per finished PC run and layer, its share of the error energy at the weight update (last probe batch)."""
    rows = []
    for run in sweep.finished:
        energy = _last_energy(run)
        total = sum(energy) if energy else 0.0
        if run.twin != "bp" and math.isfinite(total) and total > 0:
            rows += [{**run.columns(), "layer": l + 1, "energy share": e / total} for l, e in enumerate(energy or [])]
    return pd.DataFrame(rows)


def energy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per PC model: the input layer's and the output layer's share (means over seeds) and their ratio."""
    rows = []
    for (dataset, width, model), part in _model_parts(frame):
        shares = part.groupby("layer")["energy share"].mean()
        first, last = float(shares.iloc[0]), float(shares.iloc[-1])
        rows.append(
            {
                "dataset": dataset,
                "width": width,
                "model": model,
                "seeds": part["seed"].nunique(),
                "layers": len(shares),
                "input layer share": first,
                "output layer share": last,
                "output / input": last / first if first > 0 else None,
            }
        )
    return pd.DataFrame(rows)


def figure_energy(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Each layer's share of the error energy at the update, per PC model (mean, 95% CI over seeds)."""
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]) if not frame.empty else []:
        order = _order(part["model"])
        fig, ax = plt.subplots(figsize=(8, 4.8))
        sns.lineplot(
            data=part,
            x="layer",
            y="energy share",
            hue="model",
            hue_order=order,
            palette=_palette(order),
            errorbar=("ci", 95),
            seed=0,
            ax=ax,
            **_styles(order),
        )
        layers = part.groupby("model")["layer"].max().unique()
        if len(layers) == 1:
            ax.axhline(1 / layers[0], color="grey", lw=0.8, ls=":", label="uniform")
        _log_if_wide(ax, part["energy share"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (1 = input side)")
        ax.legend(title=None, fontsize=8)
        title = _seeds_title(f"Error energy share at the update, {dataset}, width {width}", part)
        _finish(fig, title, coinciding(part, "energy share", x="layer"))
        paths.append(_save(fig, out / f"energy_{dataset}_{width}.png"))
    return paths


def _complete(runs: dict[int, dict]) -> dict[int, dict]:
    return {seed: f for seed, f in runs.items() if f["status"] == "complete"}


def _accuracy_gap(pc: dict, bp: dict) -> Optional[float]:
    return pc["final_acc"] - bp["final_acc"] if pc["final_acc"] is not None and bp["final_acc"] is not None else None


def depth_gap_frame(groups: dict[Setting, dict]) -> pd.DataFrame:
    """Per dataset, width, depth and PC twin: final test accuracy minus bp's, paired by seed (mean and 95%
    t-interval), each twin in the configuration the claims take (chosen on validation, ``claims.groups_of``)."""
    rows = []
    for (dataset, width, depth), group in groups.items():
        if depth is None:  # the sweep has one depth
            continue
        for twin in PC_TWINS:
            chosen = _complete(group[twin])
            gaps = paired(chosen, _complete(group["bp"]), _accuracy_gap)
            ci = interval(gaps)
            if gaps:
                rows.append(
                    {
                        "dataset": dataset,
                        "width": width,
                        "twin": twin,
                        "depth": depth,
                        "model": next(iter(chosen.values()))["label"],
                        "seeds": len(gaps),
                        "PC - BP": sum(gaps) / len(gaps),
                        "ci low": ci[0] if ci else math.nan,
                        "ci high": ci[1] if ci else math.nan,
                    }
                )
    return pd.DataFrame(rows)


def depth_table(frame: pd.DataFrame) -> pd.DataFrame:
    """``depth_gap_frame`` as the report shows it: the interval in one cell."""
    if frame.empty:
        return frame
    text = [
        _ci_text(None if math.isnan(lo) else (lo, hi), n)
        for lo, hi, n in zip(frame["ci low"], frame["ci high"], frame["seeds"])
    ]
    return frame.drop(columns=["ci low", "ci high"]).assign(**{"95% CI": text})


def _linestyle(twin: str) -> Any:
    dashes = TWIN_DASHES.get(twin, "")
    return (0, dashes) if dashes else "-"


def figure_depth(frame: pd.DataFrame, out: Path) -> list[Path]:
    """The PC-BP gap against depth, one line per PC twin (mean, 95% t-interval over seeds); 0 is bp. The twins are
    drawn a little apart along x, so that equal gaps (pc and pc_rc3) show both."""
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]) if not frame.empty else []:
        depths = sorted(part["depth"].unique())
        twins = [t for t in PC_TWINS if t in set(part["twin"])]
        apart = 0.06 * (min(b - a for a, b in zip(depths, depths[1:])) if len(depths) > 1 else 1)
        fig, ax = plt.subplots(figsize=(8, 4.8))
        ax.axhline(0, color=PALETTE["bp"], lw=1, label="bp")
        for i, twin in enumerate(twins):
            line = part[part["twin"] == twin].sort_values("depth")
            below = (line["PC - BP"] - line["ci low"]).fillna(0)
            above = (line["ci high"] - line["PC - BP"]).fillna(0)
            ax.errorbar(
                line["depth"] + apart * (i - (len(twins) - 1) / 2),
                line["PC - BP"],
                yerr=[below, above],
                color=PALETTE[twin],
                marker=TWIN_MARKERS[twin],
                linestyle=_linestyle(twin),
                capsize=3,
                label=twin,
            )
        ax.set_xticks(depths)
        ax.set_xlabel("depth (weight layers)")
        ax.set_ylabel("final test accuracy, PC - BP")
        ax.legend(title=None, fontsize=8)
        _finish(fig, f"PC-BP gap against depth, {dataset}, width {width} (mean, 95% t-interval over seeds)")
        paths.append(_save(fig, out / f"depth_{dataset}_{width}.png"))
    return paths


# ------------------------------------------------------------------------------------------------ tuning
def tuning_table(tuning: dict) -> pd.DataFrame:
    """The value chosen per configuration, its validation score and spread over seeds, and where it came from."""
    rows = [
        {
            "model": f["model"],
            "dataset": f["dataset"],
            "width": f.get("width"),
            "depth": f.get("depth"),
            "chosen": f.get("chosen"),
            "val score": _plus_minus(f.get("score"), f.get("spread")),
            "origin": f.get("origin"),
            "edge": "yes" if f.get("edge") else "",
        }
        for f in tuning["families"]
    ]
    return pd.DataFrame(rows)


def _plus_minus(value: Optional[float], spread: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")


def excluded_table(tuning: dict) -> pd.DataFrame:
    """Candidates that were not eligible, and why (inference unstable, diverged...)."""
    rows = [
        {
            "model": f["model"],
            "dataset": f["dataset"],
            tuning.get("key", "value"): c["value"],
            "reason": c["status"].removeprefix("excluded: "),
            "seeds scored": len(c.get("scores") or {}),
        }
        for f in tuning["families"]
        for c in f["candidates"]
        if c.get("status", "ok") != "ok"
    ]
    return pd.DataFrame(rows)


def tuning_notes(tuning: dict) -> list[str]:
    """What a reader must know before trusting a choice: nothing valid, or a choice on the edge of the range."""
    notes = []
    for f in tuning["families"]:
        name, chosen = f"{f['model']} ({f['dataset']})", f.get("chosen")
        if chosen is None:
            notes.append(f"{name}: no candidate was valid, nothing was chosen")
        elif f.get("edge"):
            side = "smallest" if chosen <= min(c["value"] for c in f["candidates"]) else "largest"
            notes.append(f"{name}: {chosen:g} is the {side} candidate, the best value may lie outside the range")
    return notes


def _tuning_panel(ax, family: dict, key: str) -> None:
    """One configuration: each seed's score (thin), their mean (thick), the choice (star), exclusions (x)."""
    color = PALETTE.get(family.get("twin", ""), "C0")
    ok = [c for c in family["candidates"] if c.get("status", "ok") == "ok"]
    for i, seed in enumerate(sorted({s for c in family["candidates"] for s in c.get("scores") or {}})):
        points = [(c["value"], c["scores"][seed]) for c in ok if (c.get("scores") or {}).get(seed) is not None]
        if points:
            ax.plot(*zip(*points), color=color, lw=0.8, alpha=0.5, label=None if i else "each seed")
    means = [(c["value"], c["mean"]) for c in ok if c.get("mean") is not None]
    if means:
        ax.plot(*zip(*means), color=color, lw=2.2, marker="o", markersize=4, label="mean over seeds")
    label: Optional[str] = "excluded"
    for c in family["candidates"]:
        if c.get("status", "ok") != "ok":
            scores = [v for v in (c.get("scores") or {}).values() if v is not None]
            ys, transform = (scores, ax.transData) if scores else ([0.04], ax.get_xaxis_transform())
            ax.scatter(
                [c["value"]] * len(ys), ys, marker="x", color="crimson", transform=transform, zorder=3, label=label
            )
            label = None  # one legend entry for all exclusions
    if family.get("chosen") is not None:
        ax.axvline(family["chosen"], color="k", lw=0.8, ls=":")
        if family.get("score") is not None:
            ax.plot(family["chosen"], family["score"], "*", ms=15, color="gold", mec="k", label="chosen", zorder=4)
    if all(c["value"] > 0 for c in family["candidates"]):
        ax.set_xscale("log")
    ax.set_title(f"{family['model']}, {family['dataset']}" + (" (edge)" if family.get("edge") else ""), fontsize=9)
    ax.set_xlabel(key)
    ax.set_ylabel("validation score")


def figure_tuning(tuning: dict, out: Path) -> list[Path]:
    """Validation score against the tuned value, one panel per configuration."""
    families = tuning["families"]
    cols = min(4, len(families))
    rows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    for ax, family in zip(axes.flat, families):
        _tuning_panel(ax, family, tuning.get("key", "value"))
    for ax in list(axes.flat)[len(families) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    _finish(fig, f"Tuning: {tuning.get('score', 'validation score')}, {len(tuning.get('seeds') or [])} seeds")
    return [_save(fig, out / "tuning.png")]


# ------------------------------------------------------------------------------------------------ documents
def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0)


def _table_md(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else frame.to_string(index=False)


def claims_parts(results: list[dict]) -> tuple[list[str], list[str]]:
    """The claims section: per claim its verdict, what was measured, and one row per setting (html, markdown)."""
    intro = (
        "Each claim of the paper as measured here; the verdict rules and thresholds are in the README and in "
        "claims.json. Intervals are 95% Student-t intervals over seeds (paired by seed)."
    )
    html_parts, md = (
        ["<h2>The paper's claims</h2>", f"<p>{html.escape(intro)}</p>"],
        ["## The paper's claims", "", intro, ""],
    )
    frame = claims_frame(results)
    for claim in results:
        head = f"Claim {claim['id']}: {claim['claim']} — {claim['verdict']}" + (
            f" ({claim['reason']})" if claim["reason"] else ""
        )
        rows = frame[frame["claim"] == claim["id"]].drop(columns=["claim"])
        html_parts += [
            f"<h3>{html.escape(head)}</h3>",
            f"<p><i>{html.escape(claim['statistic'])}</i></p>",
            _table_html(rows),
        ]
        md += [f"### {head}", "", f"*{claim['statistic']}*", "", _table_md(rows), ""]
    return html_parts, md


@dataclass
class Section:
    """One part of report.html and report.md: a heading, what it shows, its tables (caption, frame) and figures."""

    title: str
    text: str
    images: list[Path] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)

    @property
    def shown(self) -> list[tuple[str, pd.DataFrame]]:
        return [(caption, table) for caption, table in self.tables if not table.empty]

    def html(self) -> list[str]:
        parts = [f"<h2>{html.escape(self.title)}</h2><p>{html.escape(self.text)}</p>"]
        for caption, table in self.shown:
            parts += ([f"<p><b>{html.escape(caption)}</b></p>"] if caption else []) + [_table_html(table)]
        return parts + [f'<img src="{_embed(p)}" alt="{html.escape(p.name)}">' for p in self.images]

    def markdown(self) -> list[str]:
        lines = [f"## {self.title}", "", self.text, ""]
        for caption, table in self.shown:
            lines += ([f"**{caption}**", ""] if caption else []) + [_table_md(table), ""]
        return lines + [f"![{p.stem}]({p.name})" for p in self.images] + [""]


def _not_shown(sweep: Sweep) -> list[str]:
    """Runs the figures leave out, and why."""
    notes = [f"{s['model']}: {s['reason']}" for s in sweep.skipped]
    notes += [
        f"{r.label} ({r.summary['dataset']}): diverged ({r.summary.get('diverged_reason') or 'non-finite'}), "
        "left out of the figures"
        for r in sweep.runs
        if r.summary["status"] == "diverged"
    ]
    notes += [
        f"{r.label} ({r.summary['dataset']}): failed to learn (final accuracy "
        f"{r.summary.get('final_test_acc') or 0:.3f}), left out of the figures and rankings"
        for r in sweep.runs
        if r.summary["status"] == "failed_to_learn"
    ]
    return notes


def write_documents(
    sweep: Sweep, out: Path, sections: Sequence[Section], claims: Optional[list[dict]] = None
) -> tuple[Path, Path]:
    """report.html (figures embedded) and report.md: the runs, what is not shown, the claims, then ``sections``
    (a section with neither a figure nor a non-empty table is left out)."""
    frame = summary_frame(sweep).drop(columns=["twin"])
    notes = _not_shown(sweep)
    parts = [f"<h1>pcsweep report: {html.escape(sweep.path.name)}</h1>", "<h2>Runs</h2>", _table_html(frame)]
    if notes:
        parts += ["<h2>Not shown</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
    md = [f"# pcsweep report: {sweep.path.name}", "", "## Runs", "", _table_md(frame), ""]
    if notes:
        md += ["## Not shown", ""] + [f"- {n}" for n in notes] + [""]
    if claims is not None:
        claim_html, claim_md = claims_parts(claims)
        parts += claim_html
        md += claim_md
    for section in sections:
        if section.images or section.shown:
            parts += section.html()
            md += section.markdown()
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}img{max-width:100%;"
        "margin:0.5em 0}table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}th{background:#f3f3f3}"
    )
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>pcsweep report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    md_path.write_text("\n".join(md))
    return html_path, md_path


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def tuning_section(sweep: Sweep, out: Path) -> list[Section]:
    """How the learning rates were chosen, when the sweep was tuned (``<sweep>/tuning/tuning.json``)."""
    tuning = sweep.tuning
    if tuning is None:
        return []
    key = tuning.get("key", "the value")
    text = (
        f"{key} chosen per configuration on the validation split (the test split never chooses): "
        f"{len(tuning.get('candidates') or [])} candidates x {len(tuning.get('seeds') or [])} seeds, "
        f"{tuning.get('epochs')} epochs each, scored by the {tuning.get('score', 'validation score')}"
        + (f", {tuning['wall_seconds']:.0f} s in all" if tuning.get("wall_seconds") is not None else "")
        + ". Thin lines: seeds; thick: their mean; star and dotted line: the chosen value; x: excluded candidates."
    )
    notes = tuning_notes(tuning)
    return [
        Section(
            "Learning rate (tuning)",
            text + (" Note: " + "; ".join(notes) + "." if notes else ""),
            figure_tuning(tuning, out),
            [("Chosen per configuration", tuning_table(tuning)), ("Excluded candidates", excluded_table(tuning))],
        )
    ]


def figure_sections(sweep: Sweep, out: Path) -> list[Section]:
    """The paper's figures that need no landscapes: benchmark, curves, weights, per layer."""
    notes = curve_notes(sweep)
    return [
        Section(
            "Benchmark (Fig 2)",
            "Final test accuracy and training wall time to reach 90% of it.",
            figure_benchmark(sweep, out),
        ),
        Section(
            "Curves (Fig 3)",
            "Test accuracy at every evaluation (about ten per epoch; validation accuracy too when there is a "
            "validation split), train and test loss at the end of each epoch, against the training batches all "
            "twins share; each twin has its own marker and dash pattern."
            + (" Lines that coincide: " + "; ".join(notes) + "." if notes else ""),
            figure_curves(sweep, out),
        ),
        Section("Weight distributions (Fig 5)", "First two and last two weight layers.", figure_weights(sweep, out)),
        Section(
            "Per layer",
            "Relative change of each weight layer from its initial values, distance of its distribution "
            "from a Gaussian (1-D Wasserstein of the standardized weights), and for PC the error energy per layer at "
            "the update point on the probe batch.",
            figure_layers(sweep, out),
        ),
    ]


def gap_sections(sweep: Sweep, out: Path, groups: dict[Setting, dict]) -> list[Section]:
    """Why a gap remains: generalization, where the error energy sits, and (with several depths) the gap's depth."""
    generalization, energy = generalization_frame(sweep), energy_share_frame(sweep)
    sections = [
        Section(
            "Why a gap remains: train vs test",
            "Final train and test accuracy and loss per model; the gap is train minus test accuracy, with its 95% "
            "Student-t interval over seeds.",
            figure_generalization(generalization, out),
            [("", generalization_table(generalization))],
        ),
        Section(
            "Why a gap remains: error energy per layer",
            "Each layer's share of the error energy at the weight update (last probe batch), per PC model. Deep PC "
            "networks concentrate it near the output, leaving the input side with little error to learn from "
            "(the imbalance the PCX benchmark and μPC describe).",
            figure_energy(energy, out),
            [("", energy_table(energy))],
        ),
    ]
    if len({run.config.get("depth") for run in sweep.finished}) >= 2:
        depth = depth_gap_frame(groups)
        sections.append(
            Section(
                "Why a gap remains: depth",
                "Final test accuracy of each PC twin minus bp's (same dataset, width, depth and seed), against depth; "
                "mean and 95% Student-t interval over seeds. Each twin in the configuration the claims take.",
                figure_depth(depth, out),
                [("", depth_table(depth))],
            )
        )
    return sections


def landscape_sections(sweep: Sweep, out: Path, draw: Optional[Callable[..., list[Path]]], view: str) -> list[Section]:
    """Figs 4, 6 and 7: the landscapes (``draw``: ``figure_landscapes`` with the report's grid, None without
    landscapes), and the weight-decay comparison when the sweep has one."""
    sections = []
    if draw is not None:
        sections.append(Section("Loss landscapes (Figs 4, 7)", view, draw(sweep, out)))
    pair = weight_decay_models(sweep)
    if pair:
        images = figure_curves(sweep, out, select=pair, suffix="_weight_decay")
        images += draw(sweep, out, select=pair, suffix="_weight_decay") if draw is not None else []
        sections.append(Section("Weight decay (Fig 6)", "The same twin with and without weight decay.", images))
        sections.append(
            Section(
                "Weight decay: what it did to the variances",
                "Mean log S per weight layer (over neurons, then seeds) at the end of training, with and without "
                "decay; 0 is S = 1, where the decay pulls.",
                tables=[("", variance_frame(sweep, pair))],
            )
        )
    return sections


def build_report(
    sweep_dir: Path,
    spans=(1.0, 0.1),
    resolution: int = 41,
    samples: int = 1000,
    landscapes: bool = True,
    quiet: bool = False,
    rules: Optional[ClaimRules] = None,
) -> Path:
    sweep = load_sweep(Path(sweep_dir))
    rules = rules or ClaimRules()
    # a choice among configurations only the test split could make stops here, in one line, before any work
    groups = groups_of([run_fact(run) for run in sweep.runs])
    out = sweep.path / "report"
    out.mkdir(exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    draw = partial(figure_landscapes, spans=spans, resolution=resolution, samples=samples, quiet=quiet)
    view = (
        f"Feedforward output loss on {samples} training samples along two filter-normalized Gaussian directions, "
        f"{resolution}x{resolution} grid; wide, zoomed and as a surface. The star is the trained model."
    )
    sections = tuning_section(sweep, out) + figure_sections(sweep, out) + gap_sections(sweep, out, groups)
    sections += landscape_sections(sweep, out, draw if landscapes else None, view)
    shapes = (
        {run.path: run_shape(run, spans, resolution, samples, quiet=quiet) for run in sweep.finished}
        if landscapes
        else {}
    )
    claims, _ = write_claims(sweep, out, rules, shapes)
    shape_text = (
        "Extreme eigenvalues of the loss Hessian over all weights at the trained point (Lanczos on Hessian-vector "
        "products), the share of the plotted plane where the 2x2 Hessian is convex (|min(λ,0)/λmax| <= 0.1), the "
        "radius of the convex disc, and the mean loss increase along 16 random filter-normalized directions at the "
        "zoomed radius."
    )
    sections.append(Section("Landscape shape", shape_text, tables=[("", shape_frame(sweep, shapes))]))
    html_path, _ = write_documents(sweep, out, sections, claims)
    return html_path


def log_to_wandb(html_path: Path, sweep_dir: Path, options: Optional[dict] = None) -> None:
    """The report's figures as one W&B run (job type ``report``, grouped and tagged by the sweep, whose training runs
    carry the same ``sweep=`` tag), offline without a key, as training runs are; the report folder as a ``report``
    artifact."""
    import wandb

    from pcsweep.tracking import start_wandb

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
        help="a claim-verdict threshold (pcsweep.claims.ClaimRules), e.g. --rule accuracy_margin=0.01",
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


if __name__ == "__main__":
    cli()
