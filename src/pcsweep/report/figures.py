"""The paper's figures that read only the runs' summaries and weights: benchmark bars (Fig 2), curves (Fig 3),
weight distributions (Fig 5) and the per-layer view; one figure per dataset and width. Where two models' curves
coincide, one line hides the other, so the figure (and the report's text) says so."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from matplotlib.ticker import MaxNLocator

from pcsweep.report.style import (
    finish,
    linestyle_of,
    log_if_wide,
    model_bars,
    model_lines,
    palette_of,
    save,
    seeds_title,
)
from pcsweep.report.sweep import (
    BATCHES,
    Sweep,
    accuracy_curve_frame,
    by_model,
    curves_frame,
    last_energy,
    load_weights,
    model_order,
    summary_frame,
    twin_of,
)

COINCIDE = 0.01  # mean |difference| of two mean curves (accuracy) under which one line hides the other
LAYER_COLUMNS = ("relative change", "distance from Gaussian", "error energy at T")


def benchmark_frame(sweep: Sweep) -> pd.DataFrame:
    """What Fig 2 draws: every finished run with a final accuracy. Every seed counts: a run that failed to learn or
    diverged stays in the accuracy bars with the accuracy it ended at (it has no time to 90%)."""
    frame = summary_frame(sweep)
    return frame[frame["status"].isin(["complete", "failed_to_learn", "diverged"]) & frame["final acc"].notna()]


def figure_benchmark(sweep: Sweep, out: Path) -> list[Path]:
    """Fig 2: final accuracy and time to 90% of it, per model; one figure per dataset and width; the title says how
    many of each model's seeds failed (``benchmark_frame``)."""
    frame = benchmark_frame(sweep)
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]):
        order = model_order(part["model"])
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.3 * len(order), 4.2))
        palette = palette_of(order)
        for ax, column, title in (
            (axes[0], "final acc", "Final test accuracy"),
            (axes[1], "time to 90% [s]", "Time to 90% of final accuracy"),
        ):
            model_bars(
                ax, part, column, order, hue="model", hue_order=order, palette=palette, capsize=0.15, legend=False
            )
            ax.set_title(title)
            ax.set_ylabel("accuracy" if column == "final acc" else "training wall time [s]")
        failed = part[part["status"] != "complete"].groupby("model").size()
        counts = "; ".join(f"{m}: {n} of {(part['model'] == m).sum()} failed" for m, n in failed.items())
        fig.suptitle(seeds_title(f"{dataset}, width {width}", part) + (f" ({counts})" if counts else ""))
        fig.tight_layout()
        paths.append(save(fig, out / f"benchmark_{dataset}_{width}.png"))
    return paths


# ------------------------------------------------------------------------------------------------ curves
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
            _curve_panel(ax, data.dropna(subset=[column]), column, model_order(part["model"]))
            if ax is not axes[0] and ax.get_legend() is not None:
                ax.get_legend().remove()  # the first panel's legend holds every model
        finish(fig, seeds_title(f"{dataset}, width {width}", part), coinciding(part))
        paths.append(save(fig, out / f"curves_{dataset}_{width}{suffix}.png"))
    return paths


def _curve_panel(ax, data: pd.DataFrame, column: str, order: list[str]) -> None:
    """One quantity against training batches: per model its mean over seeds, a 95% CI band, its twin's style."""
    present = [m for m in order if m in set(data["model"])]
    markevery = max(1, data[BATCHES].nunique() // 12)
    if not model_lines(ax, data, BATCHES, column, present, order, markevery=markevery, markersize=5):
        return
    ax.set_title(column.capitalize())
    ax.set_xlabel(BATCHES)
    if "loss" in column:
        log_if_wide(ax, data[column])
    ax.legend(title=None, fontsize=8)


def coinciding(
    frame: pd.DataFrame, column: str = "test accuracy", x: str = BATCHES, tolerance: float = COINCIDE
) -> list[str]:
    """Models whose mean curve lies on an earlier model's (mean |difference| below ``tolerance`` over at least two
    shared ``x``: a noisy curve can touch another's at one point and still hide it everywhere else): one line hides
    the other, so the figure says so."""
    means = frame.dropna(subset=[column]).groupby(["model", x])[column].mean()
    curves = {model: curve.droplevel(0) for model, curve in means.groupby(level=0)}
    order = model_order(curves)
    notes = []
    for i, later in enumerate(order):
        for earlier in order[:i]:
            shared = curves[earlier].index.intersection(curves[later].index)
            if len(shared) < 2:
                continue
            gaps = (curves[earlier][shared] - curves[later][shared]).abs()
            if float(gaps.mean()) < tolerance:
                notes.append(
                    f"{later} coincides with {earlier} (mean |Δ| {float(gaps.mean()):.3f}, max {float(gaps.max()):.3f})"
                )
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


# ------------------------------------------------------------------------------------------------ weights
def figure_weights(sweep: Sweep, out: Path) -> list[Path]:
    """Fig 5: distributions of the first two and the last two weight layers, per model (seeds pooled); layers are
    counted from each end, so models of different depths share the panels."""
    paths = []
    for (dataset, width), runs in sorted(by_model(sweep).items()):
        order = model_order(runs)
        weights = {model: [load_weights(run) for run in runs[model]] for model in order}
        depths = {len(per_seed[0]) for per_seed in weights.values()}
        positions = [l if l < 2 else l - min(depths) for l in sorted({0, 1, min(depths) - 2, min(depths) - 1})]
        fig, axes = plt.subplots(1, len(positions), figsize=(4 * len(positions), 3.6))
        palette = palette_of(order)
        for ax, l in zip(axes, positions):
            for model in order:
                values = torch.cat([layers[l].flatten() for layers in weights[model]]).numpy()
                seeds = f" ({len(runs[model])} seeds)" if len(runs[model]) > 1 else ""
                style = {"color": palette[model], "linestyle": linestyle_of(twin_of(model))}
                sns.kdeplot(values, ax=ax, label=model + seeds, fill=False, bw_adjust=0.8, cut=0, **style)
            ax.set_title(_layer_title(l, depths))
            ax.set_xlabel("weight")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Weight distributions, {dataset}, width {width}")
        fig.tight_layout()
        paths.append(save(fig, out / f"weights_{dataset}_{width}.png"))
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


# ------------------------------------------------------------------------------------------------ per layer
def _layers_frame(sweep: Sweep) -> pd.DataFrame:
    """Per finished run and weight layer: relative change, distance from a Gaussian, error energy at T (PC)."""
    rows = []
    for run in sweep.finished:
        layers = (run.summary.get("layers") or [{}])[-1]
        energy = last_energy(run)
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
    return pd.DataFrame(rows)


def figure_layers(sweep: Sweep, out: Path) -> list[Path]:
    """Where learning and error sit, per layer: relative change from the initial weights, distance from a Gaussian
    and (PC) the error energy per layer at the end of inference; seeds averaged."""
    frame = _layers_frame(sweep)
    paths: list[Path] = []
    if frame.empty:
        return paths
    for (dataset, width), part in frame.groupby(["dataset", "width"]):
        order = model_order(part["model"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, column in zip(axes, LAYER_COLUMNS):
            _layer_panel(ax, part.dropna(subset=[column]), column, order)
        fig.suptitle(f"Per layer (1 = input side), {dataset}, width {width}")
        fig.tight_layout()
        paths.append(save(fig, out / f"layers_{dataset}_{width}.png"))
    return paths


def _layer_panel(ax, data: pd.DataFrame, column: str, order: list[str]) -> None:
    """One per-layer quantity: per model its mean over seeds and a 95% CI band (colors from the whole ``order``)."""
    if not model_lines(ax, data, "layer", column, model_order(data["model"]), order):
        return
    ax.set_title(column.capitalize() + (" (PC)" if column == "error energy at T" else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if column != "distance from Gaussian":
        log_if_wide(ax, data[column])
    ax.legend(title=None, fontsize=8)
