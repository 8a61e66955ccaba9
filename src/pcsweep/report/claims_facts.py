"""What the claims read of each run (pcsweep.report.claims judges them), the verdicts as a table, and
claims.json. A run's validation score is among its facts: configurations of one twin are chosen on it, never on
the test split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from pcsweep.report.claims import ClaimRules, claims_document, evaluate
from pcsweep.report.style import ci_text
from pcsweep.report.sweep import Run, Sweep, load_weights
from pcsweep.run.files import write_atomic
from pcsweep.track.layers import wasserstein1


def run_fact(run: Run, shape: Optional[dict] = None) -> dict:
    """What the claims read of one run (pcsweep.report.claims), its validation score included: configurations of one
    twin are chosen on it, never on the test split the claims are judged on."""
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
        "lr_origin": s.get("lr_origin"),
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
            bp_weights[run.group + (run.config.get("seed"),)] = load_weights(run)
    facts = []
    for run in sweep.runs:
        fact = run_fact(run, shapes.get(run.path))
        bp = bp_weights.get((fact["dataset"], fact["width"], fact["depth"], fact["seed"]))
        if bp is not None and run.twin != "bp" and fact["status"] == "complete":
            fact["weight_distance"] = [wasserstein1(w, b) for w, b in zip(load_weights(run), bp)]
        facts.append(fact)
    return facts


def _fmt_value(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def claims_frame(results: list[dict]) -> pd.DataFrame:
    """One row per claim and setting: the measured value, its interval, the verdict and why (report and W&B)."""
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
                    "95% CI": ci_text(ci, group.get("n", 0)),
                    "Cohen's d": _fmt_value(group.get("effect_size")),
                    "seeds": group.get("n", 0),
                    "verdict": group["verdict"],
                    "reason": group.get("reason") or "",
                }
            )
    return pd.DataFrame(rows)


def write_claims(sweep: Sweep, out: Path, rules: ClaimRules, shapes: dict[Path, dict]) -> tuple[list[dict], Path]:
    """The verdicts, and ``<out>/claims.json`` written atomically (a reader never sees half of it)."""
    results = evaluate(run_facts(sweep, shapes), rules, sweep.tuning)
    path = out / "claims.json"
    write_atomic(path, json.dumps(claims_document(results, rules), indent=1, sort_keys=True))
    return results, path
