"""The report's sections: each a ``Section`` of figures and tables with the text that says what they show. They are
drawn here, in the order the report reads (tuning, the paper's figures, why a gap remains, landscapes and weight
decay, landscape shape)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from pcsweep.report.claim_rules import Setting
from pcsweep.report.documents import Section
from pcsweep.report.figures import curve_notes, figure_benchmark, figure_curves, figure_layers, figure_weights
from pcsweep.report.gap import (
    depth_gap_frame,
    depth_table,
    energy_share_frame,
    energy_table,
    figure_depth,
    figure_energy,
    figure_generalization,
    generalization_frame,
    generalization_table,
)
from pcsweep.report.landscapes import shape_frame
from pcsweep.report.sweep import Sweep, variance_frame, weight_decay_models
from pcsweep.report.tuning import excluded_table, figure_tuning, tuning_notes, tuning_table

SHAPE_TEXT = (
    "Extreme eigenvalues of the loss Hessian over all weights at the trained point (Lanczos on Hessian-vector "
    "products), the share of the plotted plane where the 2x2 Hessian is convex (|min(λ,0)/λmax| <= 0.1), the "
    "radius of the convex disc, and the mean loss increase along 16 random filter-normalized directions at the "
    "zoomed radius."
)


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
            "networks can concentrate it near the output and leave the input side little error to learn from (the "
            "imbalance the PCX benchmark and μPC describe); the table says whether these runs do (output / input "
            "above 1: toward the output).",
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


def landscape_view(samples: int, resolution: int) -> str:
    """What the landscape figures show, with the grid the report measured them on."""
    return (
        f"Feedforward output loss on {samples} training samples along two filter-normalized Gaussian directions, "
        f"{resolution}x{resolution} grid; wide, zoomed and as a surface. The star is the trained model."
    )


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


def shape_section(sweep: Sweep, shapes: dict[Path, dict]) -> Section:
    """The landscape's shape as numbers, one row per measured run (empty, and so left out, without landscapes)."""
    return Section("Landscape shape", SHAPE_TEXT, tables=[("", shape_frame(sweep, shapes))])
