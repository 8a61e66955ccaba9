"""Which runs a claim reads: one configuration per twin and setting, chosen on validation scores only (never the
test split), the problems that make a comparison inconclusive, pairing by seed, and a claim's result row."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from pcsweep.config.errors import UserError
from pcsweep.report.claim_rules import INCONCLUSIVE, NOT_TESTED, ClaimRules, Estimate


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
        return f"{twin}: condition 2 violated (the weight update was not made at the inference equilibrium)"
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
