"""The tuning stage (``tune=lr``): every family of a sweep gets the same search, scored on validation data.

A family is a grid job without its seed: everything that makes a run except the seed and the tuned key. Each family
is trained at every candidate (or at ``tune.trials`` values Optuna draws) with ``trial_seeds(tune)`` (disjoint from
the grid's seeds unless ``tune.reuse_trials``: the runs reported are not the runs that chose), each trial
an ordinary run folder under ``<sweep>/tuning/``. A trial's score is the mean validation accuracy of its last
``tune.last_evals`` evaluations (one evaluation is noise: PC curves swing by 0.1 between evaluations at large learning
rates), a candidate's the mean over its seeds. A candidate whose runs failed for a reason the tool detects (diverged,
failed to learn, inference unstable, condition 2 violated) is excluded, never chosen. The choice, with every
candidate's score per seed, is written to ``<sweep>/tuning/tuning.json``; the grid then trains at it.
Plain python over summaries: the sweeper (``hydra_plugins.pcsweep_sweeper``) launches the trials.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from pcsweep.config.settings import TRIAL_SEED_BASE
from pcsweep.run.files import write_atomic

log = logging.getLogger(__name__)

TUNING_DIR = "tuning"  # under the sweep folder: the trials' run folders and tuning.json
REUSED = " [reused trial: selection-biased]"  # a grid run that is the trial that chose (tune.reuse_trials)
RECORD = "tuning.json"


def trial_seeds(tune: Any) -> list[int]:
    """The seeds every candidate is trained at (``tune``: the tune settings, typed or a config node): from
    ``TRIAL_SEED_BASE``, disjoint from a grid's, unless ``tune.reuse_trials``."""
    base = 0 if tune.reuse_trials else TRIAL_SEED_BASE
    return list(range(base, base + tune.seeds))


def override_key(override: str) -> str:
    """``optimizer.lr=1e-3`` -> ``optimizer.lr`` (``+``/``++``/``~`` prefixes dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class Family:
    """The grid jobs that differ only in their seed: one search serves them all."""

    overrides: list[str]  # a job's overrides without its seed
    name: str = ""  # <paper name>_<dataset>-<hash of the identity without the seed>
    model: str = ""
    twin: str = ""
    dataset: str = ""
    width: int = 0
    depth: int = 0
    default: Optional[float] = None  # the value the grid would train at without tuning
    epochs: int = 0  # per trial
    val_fraction: float = 0.0
    settings: Any = None  # the family's composed settings (pcsweep.config.settings.Settings)
    trials: dict[tuple[float, int], Optional[dict]] = field(default_factory=dict)  # (value, seed) -> its summary

    @property
    def key(self) -> tuple[str, ...]:
        """What tells families apart (two may share a name when they differ in a setting outside the identity)."""
        return tuple(self.overrides)


def families_of(jobs: Sequence[Sequence[str]]) -> list[Family]:
    """The grid's jobs grouped by everything but ``seed``, in the grid's order."""
    found: dict[tuple[str, ...], Family] = {}
    for job in jobs:
        rest = [o for o in job if override_key(o) != "seed"]
        found.setdefault(tuple(rest), Family(rest))
    return list(found.values())


def trial_overrides(family: Family, key: str, value: float, seed: int, epochs: int, val_fraction: float) -> list[str]:
    """A trial: the family's job at ``key=value`` and ``seed``, without tuning itself, on the same validation split."""
    fixed = {
        key: repr(value),
        "seed": str(seed),
        "epochs": str(epochs),
        "dataset.val_fraction": repr(val_fraction),
        "tune": "none",
    }
    return [o for o in family.overrides if override_key(o) not in fixed] + [f"{k}={v}" for k, v in fixed.items()]


def trial_line(progress: str, settings: Any, run_name: str, summary: Optional[dict] = None) -> str:
    """A tuning trial's line as it starts (``summary`` None) and as it ends: trial k of N, its run folder, family,
    candidate and seed; at the end its validation score (never its test accuracy), the stage's elapsed time and the
    time left at the time per trial measured so far."""
    from pcsweep.config.compose import paper_name, setting_value

    k, n, started, key = progress.split("/", 3)
    value = setting_value(settings, key)
    what = f"{paper_name(settings)} on {settings.dataset.name}, {key}={value:g}, seed {settings.seed}"
    if summary is None:
        return f"tuning trial {k} of {n}: training {run_name} ({what})"
    elapsed = max(time.time() - float(started), 0.0)
    left = elapsed / int(k) * (int(n) - int(k))
    score = summary.get("val_score")
    result = f"validation score {score:.3f}" if score is not None else "no validation score"
    if summary.get("status") != "complete":
        result += f" ({str(summary.get('status')).replace('_', ' ')})"
    timing = f"{elapsed / 60:.1f} min elapsed, about {left / 60:.1f} min left"
    return f"tuning trial {k} of {n}: {run_name} ({what}): {result}; {timing}"


def trial_score(summary: Optional[dict], last_evals: int) -> Optional[float]:
    """Mean validation accuracy of the run's last ``last_evals`` evaluations (its curve: several per epoch)."""
    if not summary:
        return None
    points = [p["val_acc"] for p in summary.get("curve") or [] if p.get("val_acc") is not None]
    if not points:  # a summary written before the curve carried validation points: the per-epoch records
        points = [r["val_acc"] for r in summary.get("history") or [] if r.get("val_acc") is not None]
    return sum(points[-last_evals:]) / len(points[-last_evals:]) if points else None


def trial_problem(summary: Optional[dict]) -> Optional[str]:
    """Why a trial cannot count, or None: what the run found out about itself."""
    if summary is None:
        return "no summary (failed or unfinished)"
    if summary.get("status") != "complete":
        return str(summary.get("status", "unfinished")).replace("_", " ")
    checks = summary.get("checks") or {}
    if (checks.get("inference") or {}).get("verdict") == "unstable":
        return "inference unstable"
    if (checks.get("condition2") or {}).get("verdict") == "violated":
        return "condition 2 violated"
    return None


def candidate_record(value: float, summaries: dict[int, Optional[dict]], last_evals: int) -> dict:
    """One candidate: its score per seed, mean and spread over seeds, and ``ok`` or why it is excluded."""
    scores = {str(seed): trial_score(s, last_evals) for seed, s in sorted(summaries.items())}
    problems = sorted({p for p in (trial_problem(s) for s in summaries.values()) if p})
    valid = [v for v in scores.values() if v is not None]
    if not problems and len(valid) < len(scores):
        problems = ["no validation score"]
    ok = not problems
    return {
        "value": value,
        "scores": scores,
        "mean": statistics.fmean(valid) if ok else None,
        "std": (statistics.stdev(valid) if len(valid) > 1 else 0.0) if ok else None,
        "status": "ok" if ok else "excluded: " + ", ".join(problems),
    }


def choose(
    family: Family,
    values: Sequence[float],
    seeds: Sequence[int],
    last_evals: int,
    bounds: Optional[tuple[float, float]] = None,
) -> dict:
    """The family's record in tuning.json: every candidate, the best valid one and how to say where it came from.
    ``bounds``: a search's range (Optuna's), against which "on the edge" is judged (within a quarter decade of an
    end); without, the tried values' own ends."""
    candidates = [
        candidate_record(v, {s: family.trials.get((v, s)) for s in seeds}, last_evals) for v in sorted(set(values))
    ]
    valid = [c for c in candidates if c["mean"] is not None]
    record: dict[str, Any] = {
        "family": family.name,
        "model": family.model,
        "twin": family.twin,
        "dataset": family.dataset,
        "width": family.width,
        "depth": family.depth,
        "default": family.default,
        "epochs": family.epochs,
        "candidates": candidates,
    }
    if not valid:
        reasons = sorted({c["status"].removeprefix("excluded: ") for c in candidates})
        origin = f"default (tuning found no valid candidate: {'; '.join(reasons)})"
        none = {"chosen": None, "score": None, "spread": None, "edge": False, "runner_up": None, "within_noise": False}
        return {**record, **none, "origin": origin}
    ranked = sorted(valid, key=lambda c: c["mean"], reverse=True)
    best = ranked[0]
    if bounds is None:
        edge = best["value"] in (candidates[0]["value"], candidates[-1]["value"])
    else:
        edge = best["value"] <= bounds[0] * 10**0.25 or best["value"] >= bounds[1] / 10**0.25
    origin = f"tuned: {best['value']:g} of {len(candidates)} candidates, val {best['mean']:.3f} ± {best['std']:.3f}"
    # the runner-up within one spread over seeds (the larger of the two): the choice between them is seed noise
    runner_up = ranked[1] if len(ranked) > 1 else None
    within_noise = runner_up is not None and best["mean"] - runner_up["mean"] <= max(best["std"], runner_up["std"])
    if edge:
        origin += " (on the edge of the searched range)"
    if within_noise:
        assert runner_up is not None
        origin += f" (within one spread of {runner_up['value']:g}: val {runner_up['mean']:.3f})"
    return {
        **record,
        "chosen": best["value"],
        "score": best["mean"],
        "spread": best["std"],
        "edge": edge,
        "runner_up": runner_up["value"] if runner_up else None,
        "within_noise": within_noise,
        "origin": origin,
    }


def beyond(value: float, up: bool) -> float:
    """The next half-decade past ``value`` on the 1, 3, 10 ladder the candidates use (1e-2 -> 3e-2 -> 1e-1 up,
    1e-5 -> 3e-6 -> 1e-6 down)."""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10**exponent
    if up:
        return float(f"{3 * 10**exponent if mantissa < 2 else 10 ** (exponent + 1):.0e}")
    return float(f"{10**exponent if mantissa > 2 else 3 * 10 ** (exponent - 1):.0e}")


def to_widen(record: dict, tried: Sequence[float], widened: int, limit: int) -> Optional[float]:
    """Widen at the edge: the next half-decade beyond a choice on the edge of what was tried, or None (the choice
    is interior, nothing was chosen, the candidate last added there failed, or ``limit`` (``tune.widen``) were
    added). The same rule for every family."""
    chosen = record.get("chosen")
    if chosen is None or not record.get("edge") or widened >= limit:
        return None
    up = chosen >= max(tried)
    last = max(tried) if up else min(tried)
    if last != chosen:  # the candidate beyond the choice was tried and failed (excluded): the edge is real
        return None
    return beyond(chosen, up)


def decayed_arms(families: Sequence[Family]) -> dict[tuple[str, ...], Family]:
    """Families that differ from another of the sweep only in weight decay (claim 8's arms), each with the family
    without it: a decayed arm trains at its undecayed arm's choice, so comparing the two changes one thing."""
    from pcsweep.config.compose import family_name

    plain = {f.name: f for f in families if not (f.settings.weight_decay or f.settings.variance_weight_decay)}
    arms = {}
    for family in families:
        s = family.settings
        if s.weight_decay or s.variance_weight_decay:
            base = plain.get(family_name(replace(s, weight_decay=0.0, variance_weight_decay=0.0)))
            if base is not None:
                arms[family.key] = base
    return arms


def follow(family: Family, base: dict) -> dict:
    """A decayed arm's record: its undecayed arm's choice (no trials of its own), and that said in its origin."""
    origin = (
        f"{base['origin']} [the undecayed arm's choice: one rate for both arms]" if base["chosen"] else base["origin"]
    )
    return {
        **base,
        "family": family.name,
        "model": family.model,
        "twin": family.twin,
        "candidates": [],  # no trials of its own: the score, spread and edge are its base's, in the base's record
        "score": None,
        "spread": None,
        "edge": False,
        "within_noise": False,
        "follows": base["family"],
        "origin": origin,
    }


def lr_origin(settings: Any) -> str:
    """Where the run's learning rate came from: the tuning stage (``tune.origin``, set by the sweeper), the twin's
    default (``learning_rates.<optimizer>`` of conf/twin/), or given (on the command line or by a preset)."""
    if settings.tune.origin:
        return settings.tune.origin
    optimizer = settings.optimizer or {}
    name = str(optimizer.get("_target_", "")).rsplit(".", 1)[-1].lower()
    return "default" if settings.learning_rates.get(name) == optimizer.get("lr") else "given"


def batches_per_epoch(train_samples: int, batch_size: int) -> int:
    return math.ceil(train_samples / batch_size)


def cost_line(trials: int, families: int, to_train: int, seconds: float) -> str:
    """One line before any trial trains: what the search will cost (``seconds``: the trials still to train, each
    at its family's measured time per batch)."""
    return (
        f"tuning: {trials} trials ({families} families x the same candidates and seeds), {trials - to_train} "
        f"already finished; the {to_train} to train are projected at {seconds / 3600:.2f} h ({seconds:.0f} s) of "
        "training at the time per batch measured here"
    )


def reuse_trial(run_dir: Path, trial_dir: Path, trial: Optional[dict], origin: Optional[str]) -> bool:
    """A grid run that its tuning already trained (the same settings, seed and epochs: the chosen value at a tuning
    seed) is copied from its trial folder instead of trained again, its ``lr_origin`` set to the tuning's word.
    ``trial``: the trial's finished summary (``pcsweep.run.folder.finished_summary``), or None: nothing to reuse."""
    if trial is None:
        return False
    summary = dict(trial)
    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(trial_dir, partial, ignore=shutil.ignore_patterns(".hydra", "*.lock", "wandb"))
    if origin:
        summary["lr_origin"] = origin + REUSED
        write_atomic(partial / "summary.json", json.dumps(summary, indent=1))
    run_dir.mkdir(parents=True, exist_ok=True)
    for child in partial.iterdir():  # a single run's folder may hold Hydra's record of this launch already
        os.replace(child, run_dir / child.name)
    partial.rmdir()
    log.info(f"{run_dir.name}: trained by the tuning stage (seed and value alike): reused from {trial_dir}")
    return True
