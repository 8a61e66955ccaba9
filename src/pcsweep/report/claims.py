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
from dataclasses import asdict
from typing import Any, Optional, Sequence

from pcsweep.report.claim_rules import (
    CLAIMS,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_TESTED,
    PC_TWINS,
    ClaimRules,
    Estimate,
    Setting,
    decide,
    overall_verdict,
)
from pcsweep.report.claim_runs import (
    _landscape_missing,
    _mean,
    _need,
    _result,
    _shape,
    paired,
    problems,
    ratio,
    shape_ratios,
    twin_runs,
)


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
        verdict, reason = overall_verdict(rows) if rows else (NOT_TESTED, "no runs")
        results.append(
            {"id": number, "claim": claim, "statistic": statistic, "verdict": verdict, "reason": reason, "groups": rows}
        )
    return results


def claims_document(results: list[dict], rules: ClaimRules) -> dict:
    return {"rules": asdict(rules), "claims": results}
