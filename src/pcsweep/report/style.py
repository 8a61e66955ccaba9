"""How the report looks: each twin's color, marker and dash pattern (pc and pc_rc3, rc2 and rc23 can draw the same
curve, so no line may hide another), and the helpers every figure and table shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from pcsweep.report.sweep import TWIN_ORDER, twin_of

PALETTE = dict(zip(TWIN_ORDER, sns.color_palette("deep", 5)))
# pc and pc_rc3 (and rc2/rc23) can draw the same curve: each twin its own marker and dashes, so no line hides another
TWIN_MARKERS = {"bp": "o", "pc": "s", "pc_rc2": "^", "pc_rc3": "D", "pc_rc23": "v"}
TWIN_DASHES = {"bp": "", "pc": (5, 2), "pc_rc2": (1, 1.5), "pc_rc3": (4, 1.5, 1, 1.5), "pc_rc23": (8, 2, 2, 2)}


def palette_of(models) -> dict:
    """A color per model: its twin's, in lighter shades when a twin has several models (weight decay, variants)."""
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


def styles_of(models) -> dict:
    """Seaborn's style arguments for ``models``: each twin its marker and dash pattern (seeds' shades share them)."""
    return {
        "style": "model",
        "style_order": list(models),
        "markers": {m: TWIN_MARKERS.get(twin_of(m), "X") for m in models},
        "dashes": {m: TWIN_DASHES.get(twin_of(m), (2, 1)) for m in models},
    }


def linestyle_of(twin: str) -> Any:
    """The twin's dash pattern as matplotlib's ``linestyle`` (for lines drawn without seaborn)."""
    dashes = TWIN_DASHES.get(twin, "")
    return (0, dashes) if dashes else "-"


def slant(ax) -> None:
    """Model names on the x-axis, readable."""
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")


def model_bars(ax, data: pd.DataFrame, column: str, order: Sequence[str], **hue: Any) -> None:
    """Per model (x, in ``order``) the mean of ``column`` over seeds as a bar with its 95% CI (seeded: the figure is
    the same every time), the model names slanted; ``hue``: seaborn's hue arguments and any others."""
    sns.barplot(data=data, x="model", y=column, order=order, errorbar=("ci", 95), seed=0, ax=ax, **hue)
    slant(ax)


def model_lines(
    ax, data: pd.DataFrame, x: str, column: str, models: Sequence[str], order: Sequence[str], **extra: Any
) -> bool:
    """Per model of ``models`` its mean ``column`` over seeds against ``x`` with a 95% CI band (seeded), in its color
    among all of ``order`` and its twin's marker and dashes; ``extra``: any other seaborn arguments. With no ``data``
    the panel is hidden instead; whether it was drawn."""
    if data.empty:
        ax.set_visible(False)
        return False
    sns.lineplot(
        data=data,
        x=x,
        y=column,
        hue="model",
        hue_order=models,
        palette=palette_of(order),
        errorbar=("ci", 95),
        seed=0,
        ax=ax,
        **extra,
        **styles_of(models),
    )
    return True


def seeds_title(head: str, part: pd.DataFrame) -> str:
    """``head``, and how many seeds the means and intervals are over when there are several."""
    seeds = part.groupby("model")["seed"].nunique().max()
    return head + (f" (mean, 95% CI over {seeds} seeds)" if seeds > 1 else "")


def log_if_wide(ax, values: pd.Series) -> None:
    """A log y-axis for positive values that span a decade or more (a narrower range reads better linear)."""
    values = values.dropna()
    if len(values) and (values > 0).all() and values.max() >= 10 * values.min():
        ax.set_yscale("log")


def finish(fig, title: str, notes: Sequence[str] = ()) -> None:
    """The figure's title, and its notes (lines that coincide) under the panels, where no line can hide them."""
    fig.suptitle(title, fontsize=12)
    if notes:
        fig.text(0.5, 0.015, "\n".join(notes), ha="center", va="bottom", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * len(notes) if notes else 0, 1, 1))


def save(fig, path: Path) -> Path:
    """Every figure at one resolution; closed at once, since a report draws many."""
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ci_text(ci: Optional[Sequence[float]], n: int) -> str:
    """A 95% interval in a table cell, or why there is none."""
    if ci:
        return f"[{ci[0]:.3g}, {ci[1]:.3g}]"
    return f"{n} seed: no interval" if n == 1 else "-"
