"""What the claims are judged by: the verdicts, the thresholds (``ClaimRules``, ``report.claims`` in the config),
the paper's words (``CLAIMS``), and the statistics over seeds (Student-t intervals, paired by seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence, cast

from scipy import stats

HOLDS, FAILS, INCONCLUSIVE, NOT_TESTED = "holds", "does not hold", "inconclusive", "not tested"
PC_TWINS = ("pc", "pc_rc2", "pc_rc3", "pc_rc23")


@dataclass
class ClaimRules:
    """Thresholds of the verdicts (README: "The paper's claims")."""

    confidence: float = 0.95  # of the intervals over seeds
    min_seeds: int = 2  # fewer: the value is shown, the verdict is inconclusive
    accuracy_margin: float = 0.02  # "similar accuracy": |difference| below this; "clearly worse": above it
    time_ratio: float = 0.5  # "substantially faster": time to 90% at most this fraction of pc's
    sharper_factor: float = 2.0  # "much sharper": loss increase at the sharpness radius at least this many times pc's
    convex_fraction: float = 0.9  # "convex near the minimum": this share of the zoomed plane is locally convex
    convex_kept: float = 0.8  # a twin keeps pc's convexity when its wide plane's convex share is at least
    # this times pc's (a bounded loss bends down far out, for BP too: wide planes
    # are compared with each other, not with 1)
    deep_layers: int = 2  # "the deepest layers": the first this many weight layers (input side)
    updated_ratio: float = 0.5  # a layer "fails to update" when its relative change is below this times BP's
    gaussian_distance: float = 0.05  # a layer is "roughly Gaussian" below this (pcsweep.track.layers.gaussian_distance)

    @classmethod
    def from_mapping(cls, values: Optional[dict]) -> ClaimRules:
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown claim rule(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**values)


CLAIMS = {
    1: (
        "PC and BP reach similar final accuracy on the same architecture.",
        "final accuracy of pc minus bp (paired by seed); holds when the interval lies within +-accuracy_margin",
    ),
    2: (
        "Standard PC can converge early to a clearly worse minimum, especially in narrow networks.",
        "final accuracy of bp minus pc at the narrowest width; holds when it exceeds accuracy_margin and, with two "
        "widths, the gap is larger in the narrow network than in the wide one",
    ),
    3: (
        "Relaxing condition 3 brings PC to BP: rc3 is the PC twin most similar to BP.",
        "final accuracy of pc_rc3 minus bp; holds when within +-accuracy_margin and rc3 is the PC twin nearest BP "
        "in weight distributions (mean per-layer Wasserstein distance) and in landscape sharpness (|log ratio|)",
    ),
    4: (
        "Relaxing condition 2 cuts training time substantially, while BP stays faster.",
        "time to 90% of final accuracy, pc_rc2 over pc (geometric mean ratio); holds when at most time_ratio and "
        "bp's time is below pc_rc2's",
    ),
    5: (
        "Relaxing condition 2 keeps the landscape convex but makes it much sharper.",
        "loss increase at the sharpness radius, pc_rc2 over pc; holds when at least sharper_factor and pc_rc2's "
        "wide plane keeps pc's convex share (at least convex_kept times it)",
    ),
    6: (
        "Relaxing both conditions loses convexity everywhere but in the immediate vicinity of the minimum.",
        "convex share of pc_rc23's wide plane over pc's (paired by seed); holds when below convex_kept while "
        "pc_rc23's zoomed plane is convex (convex_fraction)",
    ),
    7: (
        "Except rc3, PC twins fail to update their deepest layers; rc3's layers, like BP's, are roughly Gaussian.",
        "relative weight change of the deep_layers first layers over BP's (mean); holds when below updated_ratio "
        "for every PC twin but rc3, at or above it for rc3, and rc3's layers are within gaussian_distance",
    ),
    8: (
        "A mild weight decay on W and S makes rc23's landscape smoother and every layer's weights Gaussian.",
        "pc_rc23 with decay minus without (paired by seed): convex share of the wide plane, and the largest "
        "per-layer distance from a Gaussian; holds when the first rises and the second falls",
    ),
}


# ------------------------------------------------------------------------------------------------ statistics
def interval(values: Sequence[float], confidence: float = 0.95) -> Optional[tuple[float, float]]:
    """Student-t interval of the mean, None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


@dataclass
class Estimate:
    values: list[float]
    log: bool = False  # a ratio: interval on the log scale, reported back as ratios

    def mean(self) -> float:
        if self.log:
            return math.exp(sum(math.log(v) for v in self.values) / len(self.values))
        return sum(self.values) / len(self.values)

    def ci(self, confidence: float) -> Optional[tuple[float, float]]:
        if self.log:
            bounds = interval([math.log(v) for v in self.values], confidence)
            return (math.exp(bounds[0]), math.exp(bounds[1])) if bounds else None
        return interval(self.values, confidence)

    def effect_size(self) -> Optional[float]:
        """Cohen's d_z of the per-seed paired values: their mean over their standard deviation (log ratios for a
        ratio, so 0 means no effect); None under two seeds or without spread. How PC benchmarks with preregistered
        protocols report a paired effect (FabricPC): the interval says whether, d how large against the seeds' noise."""
        values = [math.log(v) for v in self.values] if self.log else list(self.values)
        if len(values) < 2:
            return None
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return mean / sd if sd > 0 else None


def decide(
    estimate: Estimate, rules: ClaimRules, holds: Callable[[float, float], bool], fails: Callable[[float, float], bool]
) -> tuple[str, str]:
    """A verdict from an interval: ``holds(lo, hi)`` / ``fails(lo, hi)`` on the interval, else inconclusive."""
    n = len(estimate.values)
    if n < rules.min_seeds or n < 2:
        return INCONCLUSIVE, f"{n} seed{'s' if n != 1 else ''}: no interval (min_seeds {rules.min_seeds})"
    lo, hi = cast(tuple[float, float], estimate.ci(rules.confidence))  # two or more values: an interval
    if holds(lo, hi):
        return HOLDS, ""
    if fails(lo, hi):
        return FAILS, ""
    return INCONCLUSIVE, "the interval straddles the threshold (more seeds would decide)"


def _where(group: dict) -> str:
    """``digits/64`` (``digits/64/8`` when the sweep spans depths): a setting in a verdict's reason."""
    return "/".join(str(group[k]) for k in ("dataset", "width", "depth") if group.get(k) is not None)


def overall_verdict(groups: list[dict]) -> tuple[str, str]:
    verdicts = [g["verdict"] for g in groups]
    tested = [v for v in verdicts if v != NOT_TESTED]
    if not tested:
        return NOT_TESTED, groups[0]["reason"] if groups else "no runs"
    if len(set(tested)) == 1 and tested[0] in (HOLDS, FAILS):
        reasons = [
            (f"{_where(g)}: " if len(groups) > 1 else "") + g["reason"]
            for g in groups
            if g["verdict"] == tested[0] and g["reason"]
        ]
        return tested[0], "; ".join(reasons)
    if HOLDS in tested and FAILS in tested:
        failed = ", ".join(_where(g) for g in groups if g["verdict"] == FAILS)
        return INCONCLUSIVE, f"holds in some settings, not in {failed}"
    first = next(g for g in groups if g["verdict"] == INCONCLUSIVE)
    return INCONCLUSIVE, f"{_where(first)}: {first['reason']}" if len(groups) > 1 else first["reason"]


Setting = tuple[str, Any, Optional[int]]  # dataset, width, depth (None when the sweep has one depth)
