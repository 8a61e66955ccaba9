"""Why a gap remains between PC and BP: what a model learned against what carries over (train vs test), where the
error energy sits per layer, and the PC-BP gap against depth. Each as a per-run frame, a per-model table (means and
95% t-intervals over seeds) and a figure per dataset and width."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from pcsweep.report.claim_rules import PC_TWINS, Setting, interval
from pcsweep.report.claim_runs import paired
from pcsweep.report.figures import coinciding
from pcsweep.report.style import (
    PALETTE,
    TWIN_MARKERS,
    ci_text,
    finish,
    linestyle_of,
    log_if_wide,
    model_bars,
    model_lines,
    save,
    seeds_title,
)
from pcsweep.report.sweep import Sweep, last_energy, model_order

SPLITS = ("train", "test")


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
        for model in model_order(setting["model"])
    ]


# ------------------------------------------------------------------------------------------------ train vs test
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
                "gap 95% CI": ci_text(interval(gaps), len(gaps)),
                "train loss": _mean(part["train loss"]),
                "test loss": _mean(part["test loss"]),
            }
        )
    return pd.DataFrame(rows)


def figure_generalization(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Train next to test, accuracy and loss, per model (mean and 95% CI over seeds)."""
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]) if not frame.empty else []:
        order = model_order(part["model"])
        both = pd.concat(
            [part.assign(split=split, accuracy=part[f"{split} acc"], loss=part[f"{split} loss"]) for split in SPLITS]
        )
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(order), 4.2))
        for ax, column in zip(axes, ("accuracy", "loss")):
            data = both.dropna(subset=[column])
            if data.empty:
                ax.set_visible(False)
                continue
            model_bars(ax, data, column, order, hue="split", hue_order=list(SPLITS), capsize=0.1)
            ax.set_title(f"Final {column}, train and test")
            ax.legend(title=None, fontsize=8)
        fig.suptitle(seeds_title(f"Generalization, {dataset}, width {width}", part))
        fig.tight_layout()
        paths.append(save(fig, out / f"generalization_{dataset}_{width}.png"))
    return paths


# ------------------------------------------------------------------------------------------------ error energy
def energy_share_frame(sweep: Sweep) -> pd.DataFrame:
    """Per finished PC run and layer, its share of the error energy at the weight update (last probe batch)."""
    rows = []
    for run in sweep.finished:
        energy = last_energy(run)
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
        order = model_order(part["model"])
        fig, ax = plt.subplots(figsize=(8, 4.8))
        model_lines(ax, part, "layer", "energy share", order, order)
        layers = part.groupby("model")["layer"].max().unique()
        if len(layers) == 1:
            ax.axhline(1 / layers[0], color="grey", lw=0.8, ls=":", label="uniform")
        log_if_wide(ax, part["energy share"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (1 = input side)")
        ax.legend(title=None, fontsize=8)
        title = seeds_title(f"Error energy share at the update, {dataset}, width {width}", part)
        finish(fig, title, coinciding(part, "energy share", x="layer"))
        paths.append(save(fig, out / f"energy_{dataset}_{width}.png"))
    return paths


# ------------------------------------------------------------------------------------------------ depth
def _failed(runs: dict[int, dict]) -> int:
    """Seeds that did not complete (diverged, failed to learn, unfinished): they stay in the gap as what they were."""
    return sum(1 for f in runs.values() if f["status"] != "complete")


def _accuracy_gap(pc: dict, bp: dict) -> Optional[float]:
    return pc["final_acc"] - bp["final_acc"] if pc["final_acc"] is not None and bp["final_acc"] is not None else None


def depth_gap_frame(groups: dict[Setting, dict]) -> pd.DataFrame:
    """Per dataset, width, depth and PC twin: final test accuracy minus bp's, paired by seed (mean and 95%
    t-interval), each twin in the configuration the claims take (chosen on validation, ``claims.groups_of``). Every
    seed counts: one that failed or diverged stays in the gap with the accuracy it ended at, and ``failed`` says how
    many of the twin's and bp's seeds did not complete (a seed with no accuracy at all is in that count only)."""
    rows = []
    for (dataset, width, depth), group in groups.items():
        if depth is None:  # the sweep has one depth
            continue
        for twin in PC_TWINS:
            chosen = group[twin]
            gaps = paired(chosen, group["bp"], _accuracy_gap)
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
                        "failed": f"{_failed(chosen)} of {len(chosen)} ({twin}), "
                        f"{_failed(group['bp'])} of {len(group['bp'])} (bp)",
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
        ci_text(None if math.isnan(lo) else (lo, hi), n)
        for lo, hi, n in zip(frame["ci low"], frame["ci high"], frame["seeds"])
    ]
    return frame.drop(columns=["ci low", "ci high"]).assign(**{"95% CI": text})


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
                linestyle=linestyle_of(twin),
                capsize=3,
                label=twin,
            )
        ax.set_xticks(depths)
        ax.set_xlabel("depth (weight layers)")
        ax.set_ylabel("final test accuracy, PC - BP")
        ax.legend(title=None, fontsize=8)
        finish(fig, f"PC-BP gap against depth, {dataset}, width {width} (mean, 95% t-interval over seeds)")
        paths.append(save(fig, out / f"depth_{dataset}_{width}.png"))
    return paths
