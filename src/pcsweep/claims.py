"""The paper's claims, checked on a sweep: per claim and per dataset x width, a statistic over seeds, its confidence
interval, and a verdict (``holds``, ``does not hold``, ``inconclusive`` with the reason, or ``not tested``).

Each claim is written down as measured (the paper's words are in ``CLAIMS``). Statistics are paired by seed (the same
seed draws the same initial weights for every twin); intervals are Student-t intervals of the mean over seeds (for
ratios, of the mean log ratio), so the same runs always give the same numbers. A run that diverged, failed to learn,
or whose assumptions failed (condition 2 violated in ``pc``, unstable inference) makes a claim that needs it
``inconclusive``; it is never counted. All thresholds are in ``ClaimRules`` (``report.claims`` in the config).
Nothing is chosen on the test split the claims are judged on: among several configurations of one twin (learning
rates), the one with the best validation score is taken, and without a validation split the choice is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Optional, Sequence, cast

from scipy import stats

from pcsweep.errors import UserError

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
    gaussian_distance: float = 0.05  # a layer is "roughly Gaussian" below this (pcsweep.layers.gaussian_distance)

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


# ------------------------------------------------------------------------------------------------ runs
class SelectionError(UserError, ValueError):
    """Configurations of one twin that only the test split could tell apart: one line, no report."""


def _setting(f: dict) -> str:
    parts = [str(f["dataset"]), f"width {f.get('width')}"] + ([f"depth {f['depth']}"] if f.get("depth") else [])
    return ", ".join(parts)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def validation_score(group: Sequence[dict]) -> tuple[bool, bool, float]:
    """How one configuration ranks: every seed finished first, then every run's conditions held (inference stable,
    condition 2 not violated: what tuning excludes too), then the mean validation score of its finished runs (-inf
    when none has one)."""
    scores = [f["val_score"] for f in group if f["status"] == "complete" and _finite(f.get("val_score"))]
    mean = sum(scores) / len(scores) if scores else -math.inf
    held = all(f.get("inference") != "unstable" and f.get("condition2") != "violated" for f in group)
    return all(f["status"] == "complete" for f in group), held, mean


def _has_validation(group: Sequence[dict]) -> bool:
    return any(f.get("val_score") is not None or (f.get("val_fraction") or 0) > 0 for f in group)


def twin_runs(facts: Sequence[dict], twin: str, decayed: bool = False) -> dict[int, dict]:
    """One run per seed of ``twin`` (with or without weight decay). With several configs (learning rates: the paper
    tuned rc23's), the one with the best validation score (``validation_score``): the test split, on which the
    claims are judged, never chooses; runs of different configs are never pooled."""
    runs = [f for f in facts if f["twin"] == twin and bool(f.get("weight_decay")) == decayed]
    by_config: dict[Any, list[dict]] = {}
    for f in runs:
        by_config.setdefault(f.get("family", f.get("lr")), []).append(f)
    if not by_config:
        return {}
    # a configuration none of whose runs finished (all diverged, say) is no candidate: that needs no split to see
    finished = [g for g in by_config.values() if any(f["status"] == "complete" for f in g)] or list(by_config.values())
    if len(finished) > 1 and not all(_has_validation(group) for group in finished):
        name = twin + (" with weight decay" if decayed else "")
        raise SelectionError(
            f"{name} has {len(finished)} configurations in this sweep ({_setting(runs[0])}) and no validation "
            "split to choose among them (the test split never chooses): re-run with dataset.val_fraction=0.1, "
            "or tune=lr"
        )
    best = max(finished, key=validation_score)
    return {f["seed"]: f for f in best}


def problems(runs: dict[int, dict], twin: str, needs_condition2: bool = False) -> Optional[str]:
    """Why these runs cannot be counted, or None."""
    bad = [f for f in runs.values() if f["status"] != "complete"]
    if bad:
        return f"{twin}: {len(bad)} run(s) {', '.join(sorted({f['status'].replace('_', ' ') for f in bad}))}"
    if any(f.get("inference") == "unstable" for f in runs.values()):
        return f"{twin}: inference unstable"
    if needs_condition2 and any(f.get("condition2") == "violated" for f in runs.values()):
        return f"{twin}: condition 2 violated (inference not converged at T)"
    return None


def paired(a: dict[int, dict], b: dict[int, dict], value: Callable[[dict, dict], Optional[float]]) -> list[float]:
    out = []
    for seed in sorted(set(a) & set(b)):
        v = value(a[seed], b[seed])
        if v is not None and math.isfinite(v):
            out.append(v)
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b for two positive numbers (what a log-scale interval needs), else None."""
    return a / b if a is not None and b is not None and a > 0 and b > 0 else None


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _shape(f: dict, view: str, key: str) -> Optional[float]:
    return ((f.get("shape") or {}).get(view) or {}).get(key)


def shape_ratios(runs: dict[int, dict], baseline: dict[int, dict], view: str, key: str) -> list[float]:
    """Per seed, a landscape measurement of ``runs`` over the same one of ``baseline`` (positive pairs only)."""
    return paired(runs, baseline, lambda a, b: ratio(_shape(a, view, key), _shape(b, view, key)))


UNTUNED = "learning rates not tuned"  # a comparison at hand defaults is no test of the twins (docs/tuning.md)
TUNE_COMMAND = "add tune=lr to the sweep (every twin tuned alike on validation data), or give the rates yourself"


def untuned(runs: dict[int, dict]) -> bool:
    """Runs at their twin's hand default learning rate: neither tuned on this data nor given by the user."""
    return any(f.get("lr_origin") == "default" for f in runs.values())


def _need(
    group: dict[str, dict[int, dict]], twins: Sequence[str], condition2: Sequence[str] = ()
) -> Optional[tuple[str, str]]:
    missing = [t for t in twins if not group.get(t)]
    if missing:
        return NOT_TESTED, f"no {', '.join(missing)} runs"
    at_defaults = [t for t in twins if untuned(group[t])]
    if len(twins) > 1 and at_defaults:
        return NOT_TESTED, f"{UNTUNED} ({', '.join(at_defaults)} at hand defaults): {TUNE_COMMAND}"
    for t in twins:
        reason = problems(group[t], t, t in condition2)
        if reason:
            return INCONCLUSIVE, reason
    return None


def _result(estimate: Optional[Estimate], verdict: str, reason: str, rules: ClaimRules, **details) -> dict:
    if estimate is None or not estimate.values:
        return {"value": None, "ci": None, "n": 0, "verdict": verdict, "reason": reason, **details}
    ci = estimate.ci(rules.confidence)
    return {
        "value": estimate.mean(),
        "ci": list(ci) if ci else None,
        "n": len(estimate.values),
        "per_seed": estimate.values,
        "effect_size": estimate.effect_size(),  # Cohen's d_z on the per-seed paired values (log scale for ratios)
        "verdict": verdict,
        "reason": reason,
        **details,
    }


def _landscape_missing(runs: Sequence[dict]) -> Optional[tuple[str, str]]:
    if any(not f.get("shape") for f in runs):
        return NOT_TESTED, "landscape measurements missing (report built without landscapes)"
    return None


# ------------------------------------------------------------------------------------------------ the claims
def claim1(group, rules):
    need = _need(group, ("bp", "pc"), condition2=("pc",))
    if need:
        return _result(None, *need, rules)
    est = Estimate(paired(group["pc"], group["bp"], lambda p, b: p["final_acc"] - b["final_acc"]))
    m = rules.accuracy_margin
    verdict, reason = decide(est, rules, lambda lo, hi: -m < lo and hi < m, lambda lo, hi: lo > m or hi < -m)
    loss = paired(
        group["pc"],
        group["bp"],
        lambda p, b: (
            p["test_loss"] - b["test_loss"]
            if p.get("test_loss") is not None and b.get("test_loss") is not None
            else None
        ),
    )
    return _result(est, verdict, reason, rules, test_loss_difference=sum(loss) / len(loss) if loss else None)


def claim2(by_width: dict[int, dict], rules):
    """Across widths of one dataset."""
    widths = sorted(by_width)
    narrow = by_width[widths[0]]
    need = _need(narrow, ("bp", "pc"), condition2=("pc",))
    if need:
        return _result(None, *need, rules, width=widths[0])
    gap = lambda b, p: b["final_acc"] - p["final_acc"]
    est = Estimate(paired(narrow["bp"], narrow["pc"], gap))
    m = rules.accuracy_margin
    verdict, reason = decide(est, rules, lambda lo, hi: lo > m, lambda lo, hi: hi < m)
    details: dict[str, Any] = {"width": widths[0]}
    if len(widths) > 1:
        wide = by_width[widths[-1]]
        if not _need(wide, ("bp", "pc"), condition2=("pc",)):
            wide_gap = paired(wide["bp"], wide["pc"], gap)
            details.update(wide_width=widths[-1], wide_gap=sum(wide_gap) / len(wide_gap) if wide_gap else None)
            if verdict == HOLDS and wide_gap and est.mean() <= details["wide_gap"]:
                verdict, reason = FAILS, f"pc is clearly worse, but no more in width {widths[0]} than in {widths[-1]}"
    elif verdict == HOLDS:
        reason = "one width: 'especially in narrow networks' not tested"
    return _result(est, verdict, reason, rules, **details)


def _weight_distance(f: dict) -> Optional[float]:
    d = f.get("weight_distance")
    return sum(d) / len(d) if d else None


def claim3(group, rules):
    need = _need(group, ("bp", "pc_rc3"))
    if need:
        return _result(None, *need, rules)
    others = [t for t in ("pc", "pc_rc2", "pc_rc23") if group.get(t) and not problems(group[t], t)]
    est = Estimate(paired(group["pc_rc3"], group["bp"], lambda r, b: r["final_acc"] - b["final_acc"]))
    m = rules.accuracy_margin
    verdict, reason = decide(est, rules, lambda lo, hi: -m < lo and hi < m, lambda lo, hi: lo > m or hi < -m)
    if not others:
        return _result(
            est,
            INCONCLUSIVE if verdict == HOLDS else verdict,
            "no other PC twin to compare with" if verdict == HOLDS else reason,
            rules,
        )

    def mean_of(twin, value):
        values = [v for v in (value(f) for f in group[twin].values()) if v is not None]
        return sum(values) / len(values) if values else None

    def sharpness_gap(f):
        bp = group["bp"].get(f["seed"])
        r = ratio(_shape(f, "sharpness", "increase"), _shape(bp, "sharpness", "increase") if bp else None)
        return abs(math.log(r)) if r else None

    distance = {t: mean_of(t, _weight_distance) for t in ["pc_rc3"] + others}
    landscape = {t: mean_of(t, sharpness_gap) for t in ["pc_rc3"] + others}
    details = {"weight_distance_to_bp": distance, "sharpness_log_ratio_to_bp": landscape}
    nearest = {}
    for name, table in (("weights", distance), ("landscape", landscape)):
        known = {t: v for t, v in table.items() if v is not None}
        if "pc_rc3" in known and len(known) > 1:
            nearest[name] = min(known, key=known.get) == "pc_rc3"
    details["rc3_nearest"] = nearest
    if verdict == HOLDS:
        if not nearest:
            verdict, reason = INCONCLUSIVE, "weight and landscape distances missing"
        elif not all(nearest.values()):
            verdict, reason = (
                FAILS,
                "another PC twin is nearer BP in " + ", ".join(k for k, v in nearest.items() if not v),
            )
    return _result(est, verdict, reason, rules, **details)


def claim4(group, rules):
    need = _need(group, ("bp", "pc", "pc_rc2"), condition2=("pc",))
    if need:
        return _result(None, *need, rules)
    times = lambda a, b: ratio(a.get("t90"), b.get("t90"))
    est = Estimate(paired(group["pc_rc2"], group["pc"], times), log=True)
    if not est.values:
        return _result(None, INCONCLUSIVE, "no time to 90% recorded", rules)
    verdict, reason = decide(est, rules, lambda lo, hi: hi <= rules.time_ratio, lambda lo, hi: lo > rules.time_ratio)
    bp = Estimate(paired(group["bp"], group["pc_rc2"], times), log=True)
    bp_ci = bp.ci(rules.confidence) if bp.values else None
    if verdict == HOLDS and bp_ci and bp_ci[1] >= 1:
        verdict, reason = (
            (FAILS, "bp is not faster than pc_rc2") if bp_ci[0] >= 1 else (INCONCLUSIVE, "bp vs pc_rc2 undecided")
        )
    return _result(est, verdict, reason, rules, bp_over_rc2=bp.mean() if bp.values else None)


def _shape_over_pc(
    group, twin: str, measure: tuple[str, str], rules: ClaimRules, no_pairs: str
) -> tuple[Optional[Estimate], Optional[dict]]:
    """Claims 5 and 6: ``twin``'s landscape ``measure`` (view, key) over pc's, per seed, as an estimate; or, when
    there is none to judge, the result that says why (runs missing or unsound, no landscapes, or no positive pair:
    ``no_pairs``)."""
    need = _need(group, ("pc", twin)) or _landscape_missing(list(group["pc"].values()) + list(group[twin].values()))
    if need:
        return None, _result(None, *need, rules)
    est = Estimate(shape_ratios(group[twin], group["pc"], *measure), log=True)
    if not est.values:
        return None, _result(None, INCONCLUSIVE, no_pairs, rules)
    return est, None


def claim5(group, rules):
    not_at_a_minimum = "the loss does not rise at the sharpness radius (not at a minimum)"
    est, unjudged = _shape_over_pc(group, "pc_rc2", ("sharpness", "increase"), rules, not_at_a_minimum)
    if est is None:
        return unjudged
    kept_mean = _mean(shape_ratios(group["pc_rc2"], group["pc"], "wide", "convex_fraction"))
    verdict, reason = decide(
        est, rules, lambda lo, hi: lo >= rules.sharper_factor, lambda lo, hi: hi < rules.sharper_factor
    )
    if verdict == HOLDS and kept_mean is not None and kept_mean < rules.convex_kept:
        verdict, reason = FAILS, f"pc_rc2's wide plane is less convex than pc's ({kept_mean:.2f} of its convex share)"
    return _result(est, verdict, reason, rules, rc2_convex_share_over_pc=kept_mean)


def claim6(group, rules):
    no_convex_point = "pc's wide plane has no convex point to compare with"
    est, unjudged = _shape_over_pc(group, "pc_rc23", ("wide", "convex_fraction"), rules, no_convex_point)
    if est is None:
        return unjudged
    zoomed = _mean([_shape(f, "zoomed", "convex_fraction") for f in group["pc_rc23"].values()])
    verdict, reason = decide(est, rules, lambda lo, hi: hi < rules.convex_kept, lambda lo, hi: lo >= rules.convex_kept)
    if verdict == HOLDS and zoomed is not None and zoomed < rules.convex_fraction:
        verdict, reason = FAILS, f"pc_rc23 is not convex near the minimum either (zoomed {zoomed:.2f})"
    trials = group.get("_rc23_trials")  # a tuned sweep's candidates: every rate tried, and what became of it
    lrs = sorted({f.get("lr") for f in group.get("_all_rc23", [])} - {None})
    if trials:
        stability = {f"{value:g}": [status] for value, status in sorted(trials.items())}
    elif len(lrs) < 2:
        stability = "not tested: one learning rate"
    else:
        stability = {str(lr): sorted({f["status"] for f in group["_all_rc23"] if f.get("lr") == lr}) for lr in lrs}
    return _result(est, verdict, reason, rules, zoomed_convex_fraction=zoomed, learning_rates=stability)


def claim7(group, rules):
    need = _need(group, ("bp", "pc_rc3"))
    if need:
        return _result(None, *need, rules)
    k = rules.deep_layers

    def deep_ratio(f, b):
        if not f.get("change") or not b.get("change"):
            return None
        return sum(f["change"][:k]) / max(sum(b["change"][:k]), 1e-30)

    others = [t for t in ("pc", "pc_rc2", "pc_rc23") if group.get(t)]
    for t in others:
        reason = problems(group[t], t)
        if reason:
            return _result(None, INCONCLUSIVE, reason, rules)
    rc3 = Estimate(paired(group["pc_rc3"], group["bp"], deep_ratio))
    if not rc3.values:
        return _result(None, NOT_TESTED, "layer-wise weight changes not recorded", rules)
    u = rules.updated_ratio
    verdicts = {"pc_rc3": decide(rc3, rules, lambda lo, hi: lo >= u, lambda lo, hi: hi < u)}
    ratios = {"pc_rc3": rc3.mean()}
    for t in others:
        e = Estimate(paired(group[t], group["bp"], deep_ratio))
        ratios[t] = e.mean() if e.values else None
        verdicts[t] = (
            decide(e, rules, lambda lo, hi: hi < u, lambda lo, hi: lo >= u) if e.values else (INCONCLUSIVE, "")
        )
    gauss = [max(f["gaussian"]) for f in group["pc_rc3"].values() if f.get("gaussian")]
    rc3_gaussian = max(gauss) if gauss else None
    details = {
        "deep_change_over_bp": ratios,
        "rc3_max_gaussian_distance": rc3_gaussian,
        "last_layers_gaussian_distance": {
            t: _mean([f["gaussian"][-1] for f in group[t].values() if f.get("gaussian")])
            for t in ["bp", "pc_rc3"] + others
        },
    }
    if not others:
        return _result(rc3, INCONCLUSIVE, "no PC twin other than rc3", rules, **details)
    states = [v for v, _ in verdicts.values()]
    if FAILS in states:
        failed = [t for t, (v, _) in verdicts.items() if v == FAILS]
        return _result(rc3, FAILS, "the opposite holds for " + ", ".join(failed), rules, **details)
    if INCONCLUSIVE in states:
        return _result(rc3, INCONCLUSIVE, next(r for v, r in verdicts.values() if v == INCONCLUSIVE), rules, **details)
    if rc3_gaussian is not None and rc3_gaussian > rules.gaussian_distance:
        return _result(rc3, FAILS, f"rc3's weights are not Gaussian (distance {rc3_gaussian:.3f})", rules, **details)
    return _result(rc3, HOLDS, "", rules, **details)


def claim8(group, rules):
    plain, decayed = group.get("pc_rc23"), group.get("pc_rc23+wd")
    if not plain or not decayed:
        return _result(None, NOT_TESTED, "needs pc_rc23 with and without weight decay (experiment=weight_decay)", rules)
    for t, runs in (("pc_rc23", plain), ("pc_rc23 with decay", decayed)):
        reason = problems(runs, t)
        if reason:
            return _result(None, INCONCLUSIVE, reason, rules)
    rates = sorted({f["lr"] for f in plain.values()} | {f["lr"] for f in decayed.values()})
    if len(rates) > 1:  # the effect of decay would include a change of learning rate
        return _result(
            None,
            NOT_TESTED,
            f"the arms trained at different learning rates ({', '.join(f'{r:g}' for r in rates)}): one effect at a "
            "time needs one rate for both (a tuned sweep gives the decayed arm the undecayed arm's choice)",
            rules,
        )
    need = _landscape_missing(list(plain.values()) + list(decayed.values()))
    if need:
        return _result(None, *need, rules)
    est = Estimate(
        paired(decayed, plain, lambda d, p: _shape(d, "wide", "convex_fraction") - _shape(p, "wide", "convex_fraction"))
    )
    verdict, reason = decide(est, rules, lambda lo, hi: lo > 0, lambda lo, hi: hi <= 0)
    gauss = Estimate(
        paired(
            decayed,
            plain,
            lambda d, p: max(d["gaussian"]) - max(p["gaussian"]) if d.get("gaussian") and p.get("gaussian") else None,
        )
    )
    if gauss.values and verdict == HOLDS:
        g_verdict, g_reason = decide(gauss, rules, lambda lo, hi: hi < 0, lambda lo, hi: lo >= 0)
        if g_verdict != HOLDS:
            verdict, reason = g_verdict, "weights: " + (g_reason or "not more Gaussian with decay")
    variance = {
        "without": _mean_layers([f.get("log_variance_mean") for f in plain.values()]),
        "with": _mean_layers([f.get("log_variance_mean") for f in decayed.values()]),
    }
    return _result(
        est,
        verdict,
        reason,
        rules,
        gaussian_distance_change=gauss.mean() if gauss.values else None,
        mean_log_variance_per_layer=variance,
        # both arms at one rate, and where it came from (the undecayed arm's tuning, its default, or given)
        learning_rate=rates[0] if rates else None,
        learning_rate_origin=next(iter(plain.values())).get("lr_origin"),
    )


def _mean_layers(rows):
    rows = [r for r in rows if r]
    return [sum(col) / len(col) for col in zip(*rows)] if rows else None


PER_GROUP = {1: claim1, 3: claim3, 4: claim4, 5: claim5, 6: claim6, 7: claim7, 8: claim8}


def _where(group: dict) -> str:
    """``digits/64`` (``digits/64/8`` when the sweep spans depths): a setting in a verdict's reason."""
    return "/".join(str(group[k]) for k in ("dataset", "width", "depth") if group.get(k) is not None)


def _overall(groups: list[dict]) -> tuple[str, str]:
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


def groups_of(facts: Sequence[dict], tuning: Optional[dict] = None) -> dict[Setting, dict[str, Any]]:
    """The runs the claims read, per dataset x width (x depth when the sweep spans depths: depth is architecture,
    never a configuration to choose): one configuration per twin (``twin_runs``); with the sweep's ``tuning``
    record, undecayed pc_rc23's candidates there (claim 6 reads every rate tried). Raises ``SelectionError`` before
    any work when only the test split could choose."""
    several_depths = len({f.get("depth") for f in facts}) > 1
    settings = sorted(
        {(f["dataset"], f["width"], f.get("depth") if several_depths else None) for f in facts},
        key=lambda s: (s[0], s[1], s[2] or 0),
    )
    groups = {}
    for dataset, width, depth in settings:
        members = [
            f
            for f in facts
            if f["dataset"] == dataset and f["width"] == width and (depth is None or f.get("depth") == depth)
        ]
        group: dict[str, Any] = {t: twin_runs(members, t) for t in ("bp",) + PC_TWINS}
        group["pc_rc23+wd"] = twin_runs(members, "pc_rc23", decayed=True)
        group["_all_rc23"] = [f for f in members if f["twin"] == "pc_rc23" and not f.get("weight_decay")]
        group["_rc23_trials"] = {
            c["value"]: c["status"]
            for family in (tuning or {}).get("families", [])
            if family.get("twin") == "pc_rc23"
            and not family.get("follows")  # the decayed arm's record holds no trials of its own
            and (family.get("dataset"), family.get("width")) == (dataset, width)
            and (depth is None or family.get("depth") == depth)
            for c in family.get("candidates", [])
        }
        groups[(dataset, width, depth)] = group
    return groups


def _claim_rows(number: int, groups: dict[Setting, dict], rules: ClaimRules) -> list[dict]:
    """One claim's rows: per setting (claim 2: per dataset and depth, across widths)."""
    rows = []
    if number == 2:
        for dataset, depth in sorted({(d, dep) for d, _, dep in groups}, key=lambda s: (s[0], s[1] or 0)):
            by_width = {w: g for (d, w, dep), g in groups.items() if d == dataset and dep == depth}
            rows.append({"dataset": dataset, **_depth(depth), **claim2(by_width, rules)})
    else:
        for (dataset, width, depth), group in groups.items():
            rows.append({"dataset": dataset, "width": width, **_depth(depth), **PER_GROUP[number](group, rules)})
    return rows


def _depth(depth: Optional[int]) -> dict:
    return {"depth": depth} if depth is not None else {}


def evaluate(facts: Sequence[dict], rules: Optional[ClaimRules] = None, tuning: Optional[dict] = None) -> list[dict]:
    """Every claim on every dataset x width (x depth, when there are several; claim 2: every dataset, across widths)
    of ``facts`` (``report.run_facts``); ``tuning``: the sweep's tuning record, if it was tuned."""
    rules = rules or ClaimRules()
    groups = groups_of(facts, tuning)
    results = []
    for number, (claim, statistic) in CLAIMS.items():
        rows = _claim_rows(number, groups, rules)
        verdict, reason = _overall(rows) if rows else (NOT_TESTED, "no runs")
        results.append(
            {"id": number, "claim": claim, "statistic": statistic, "verdict": verdict, "reason": reason, "groups": rows}
        )
    return results


def claims_document(results: list[dict], rules: ClaimRules) -> dict:
    return {"rules": asdict(rules), "claims": results}
