"""How the learning rates were chosen, when the sweep was tuned (``<sweep>/tuning/tuning.json``, written by
pcsweep.sweep.tuning): the choice per configuration, the excluded candidates and why, what a reader must know before
trusting a choice, and the validation score against the tuned value."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import pandas as pd

from pcsweep.report.style import PALETTE, finish, save


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
            # candidates added beyond the edge (tune.widen): each trained at every seed, in the budget line too
            "widened to": ", ".join(f"{v:g}" for v in f.get("widened") or []),
            # the runner-up within one spread over seeds: the choice between the two is seed noise
            "within noise": f"yes ({f['runner_up']:g})" if f.get("within_noise") else "",
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
        if f.get("within_noise"):
            notes.append(
                f"{name}: {chosen:g} beat {f['runner_up']:g} by less than one spread over seeds: the choice is within "
                "noise (more tuning seeds would separate them)"
            )
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
    note = " (edge)" if family.get("edge") else " (the undecayed arm's choice)" if family.get("follows") else ""
    ax.set_title(f"{family['model']}, {family['dataset']}{note}", fontsize=9)
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
    finish(fig, f"Tuning: {tuning.get('score', 'validation score')}, {len(tuning.get('seeds') or [])} seeds")
    return [save(fig, out / "tuning.png")]
