"""Did the paper's conditions hold? What a PC run measures of itself (pure torch, over the engine's public API).

- **Condition 2** (inference converged): on a fixed probe batch, the state after the twin's update point (T steps,
  or k for relax 2) against inference run far past it. The gap is the share of the error energy at T that inference
  would still remove, ``(E_T - E_conv) / E_T``; per weight layer, the cosine and the norm ratio between the update at
  T and the update at convergence.
- **Inference stability**: ``step_size * lambda_max`` of the activity Hessian (gradient descent diverges past 2).
- **Condition 3 relaxed**: per-layer statistics of log S, and how many neurons sit on the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, cast

import torch
from torch import Tensor

from pcsweep.errors import UserError
from pcsweep.pc import PCEngine, activity_curvature
from pcsweep.pc.schedule import plateaued, train_batch

# inference.step_size=auto: step_size * lambda_max is held at ``inference.auto_stiffness`` of the stability limit
# 2 (1 + momentum). 0.8 (pc, rc3): the slow modes, which decide condition 2, move as fast as stability allows with a
# 25% margin (lambda_max varies 1.6% across batches and grows about 2% per 100 batches at the paper's sizes at
# lr 3e-4, faster at larger learning rates; it is re-measured every ``curvature_every`` batches and after any rise).
# 0.5 (rc2, rc23, plain descent): 1 / lambda_max, the classic step.
AUTO_STEP_FRACTION = 0.8
# log_variance_min=auto: step_size * lambda_max / S_min held at this fraction of the limit; with the automatic
# step size the floor is S_min = auto_stiffness / 0.9 (0.89 for rc3, 0.56 for rc23)
AUTO_FLOOR_STIFFNESS = 0.9


@dataclass
class Condition2Thresholds:
    """Condition 2 holds when inference at T has done all but ``max_gap`` of its energy decrease and every layer's
    update points within ``min_cosine`` of the converged one."""

    max_gap: float = 0.05
    min_cosine: float = 0.95


def _cosine(a: Tensor, b: Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else 1.0


def _weight_updates(engine: PCEngine) -> list[Tensor]:
    engine.write_gradients()
    return [cast(Tensor, w.grad).detach().clone() for w in engine.net.weights]  # just written


@torch.no_grad()
def probe_condition2(
    engine: PCEngine,
    inputs: Tensor,
    target: Tensor,
    at_step: int,
    max_steps: int,
    tolerance: float = 1e-6,
    check_every: int = 8,
) -> dict:
    """Inference without weight updates on (inputs, target): the state at the twin's update point (``at_step``, or
    earlier where the engine's own ``inference.tolerance`` ends training inference: the same loop, ``train_batch``)
    against the state where the error energy's relative change over ``check_every`` steps fell below ``tolerance``
    (or ``max_steps``).

    Writes ``.grad`` of the weights (the next training batch overwrites it) and leaves the engine's buffers to the
    next ``feedforward_init``."""
    until_update = replace(engine.inference, steps=at_step, update_every=None)
    reached = train_batch(engine, until_update, inputs, target, apply_update=lambda: None)
    start, at_t = float(reached.energy_start), float(reached.energy_end)
    layers_at_t = engine.layer_error_energies().tolist()
    updates_at_t = _weight_updates(engine)
    steps, previous, current = reached.steps_used, at_t, at_t
    while steps < max_steps:
        for _ in range(check_every):
            engine.step()
        steps += check_every
        current = float(engine.error_energy())
        if not math.isfinite(current) or plateaued(previous, current, tolerance):
            break
        previous = current
    updates_at_end = _weight_updates(engine)
    return {
        "at_step": at_step,
        "steps_at_update": reached.steps_used,  # fewer than at_step when the tolerance ended inference
        "energy_start": start,
        "energy_at_T": at_t,
        "energy_converged": current,
        "steps_converged": steps,
        "gap": max(at_t - current, 0.0) / at_t if at_t > 0 else 0.0,
        "layer_energy_at_T": layers_at_t,  # where the error sits when the weights are updated
        "layer_energy_converged": engine.layer_error_energies().tolist(),
        "cosine": [_cosine(a, b) for a, b in zip(updates_at_t, updates_at_end)],
        "norm_ratio": [
            float(a.norm() / b.norm()) if float(b.norm()) > 0 else 1.0 for a, b in zip(updates_at_t, updates_at_end)
        ],
    }


def condition2_verdict(probes: Sequence[dict], relaxed: bool, limits: Condition2Thresholds) -> dict:
    """``held`` / ``violated`` (or ``relaxed`` for relax 2 and 23, by design) from every epoch's probe, with the worst
    numbers; ``not measured`` without probes."""
    if not probes:
        return {"verdict": "not measured"}
    worst_gap = max(p["gap"] for p in probes)
    worst_cosine = min(min(p["cosine"]) for p in probes)
    held = worst_gap <= limits.max_gap and worst_cosine >= limits.min_cosine
    verdict = "relaxed" if relaxed else ("held" if held else "violated")
    return {
        "verdict": verdict,
        "worst_gap": worst_gap,
        "worst_cosine": worst_cosine,
        "max_gap": limits.max_gap,
        "min_cosine": limits.min_cosine,
        "probed_epochs": len(probes),
    }


@torch.no_grad()
def stiffness(engine: PCEngine, inputs: Tensor, target: Tensor, iterations: int = 30) -> float:
    """``step_size * lambda_max`` at the feedforward state of (inputs, target), with the current variances."""
    engine.feedforward_init(inputs, target)
    return engine.inference.step_size * float(activity_curvature(engine, iterations).max())


def variance_floor(step_size: float, curvature_at_unit_variance: float, target_stiffness: float) -> float:
    """The lowest log S at which ``step_size * lambda_max`` stays at ``target_stiffness`` (lambda scales like 1/S)."""
    return math.log(step_size * curvature_at_unit_variance / target_stiffness)


def variance_statistics(log_variances: Sequence[Tensor], floor: Optional[float]) -> list[dict]:
    """Per weight layer: mean, spread across neurons, min and max of log S, and the fraction on the floor."""
    rows = []
    for log_s in log_variances:
        values = log_s.detach().double().flatten().cpu()
        at_floor = (
            float((values <= floor + 1e-6).double().mean()) if floor is not None and math.isfinite(floor) else 0.0
        )
        rows.append(
            {
                "mean": float(values.mean()),
                "std": float(values.std()) if values.numel() > 1 else 0.0,
                "min": float(values.min()),
                "max": float(values.max()),
                "at_floor": at_floor,
            }
        )
    return rows


class UnstableSetting(UserError, ValueError):
    """A setting that makes inference provably unstable at the initial weights (one line, before any training)."""


@dataclass
class CurvatureTargets:
    """What re-measuring the curvature (at S = 1, every ``curvature_every`` batches) keeps: ``step_stiffness`` is
    ``step_size * lambda_max`` for ``inference.step_size=auto`` (None: the step size is fixed), ``floor_stiffness``
    is ``step_size * lambda_max / S_min`` for ``log_variance_min=auto`` (None: no floor or a fixed one)."""

    step_stiffness: Optional[float] = None
    floor_stiffness: Optional[float] = None

    def __bool__(self) -> bool:
        return self.step_stiffness is not None or self.floor_stiffness is not None


def curvature_due(batch: int, every: int, energy_rose: bool) -> bool:
    """Re-measure the curvature before this batch? Every ``every`` batches counted over the whole run (counted per
    epoch, a short epoch re-measured once an epoch, and at large learning rates the curvature outgrew the margin in
    between), and right after a batch whose inference energy rose at a check: the sign that it already has."""
    return energy_rose or (every > 0 and batch % every == 0)


@torch.no_grad()
def follow_curvature(engine: PCEngine, inputs: Tensor, target: Tensor, targets: CurvatureTargets) -> float:
    """Re-measure ``lambda_max`` (at S = 1, on this batch's feedforward state) and move what follows it: the step
    size to ``targets.step_stiffness / lambda_max``, the floor on log S to where ``step_size * lambda_max / S_min`` is
    ``targets.floor_stiffness`` (the variances are clamped to it). The curvature grows as the weights train (about 2x
    over one 938-batch epoch at the paper's sizes), so values fixed at the initial weights let inference go unstable
    (rc2 with gamma = 0.1 did, within its first epoch). Returns lambda_max."""
    engine.feedforward_init(inputs, target)
    curvature = float(activity_curvature(engine, unit_variance=True).max())
    if targets.step_stiffness is not None:
        engine.inference = replace(engine.inference, step_size=targets.step_stiffness / curvature)
    if targets.floor_stiffness is not None:
        engine.log_variance_min = variance_floor(engine.inference.step_size, curvature, targets.floor_stiffness)
        engine.refresh_parameters()
    return curvature


@torch.no_grad()
def preflight_stability(
    engine: PCEngine,
    inputs: Tensor,
    target: Tensor,
    floor_setting,
    trainable_variance: bool,
    step_setting: Any = None,
    auto_stiffness: float = AUTO_STEP_FRACTION,
) -> dict:
    """At the initial weights (S = 1) on one batch: is gradient descent on the activities stable, and which floor on
    log S keeps it so? Heavy-ball descent is stable while ``step_size * lambda_max < 2 (1 + momentum)``; the largest
    eigenvalue scales like 1/S, so a floor f allows ``step_size * lambda_max * exp(-f)`` at most.
    ``step_setting="auto"`` sets the engine's step size to ``auto_stiffness`` of that limit over ``lambda_max``
    (a number, or None, keeps the engine's).

    Returns ``lambda_max``, ``step_size``, ``stiffness``, ``limit``, ``log_variance_min`` (None without trainable
    variances) and the ``CurvatureTargets`` the run follows; raises ``UnstableSetting`` for a step size or a floor
    past the limit."""
    engine.feedforward_init(inputs, target)
    lam = float(activity_curvature(engine).max())
    beta = engine.inference.momentum
    limit = 2 * (1 + beta)
    targets = CurvatureTargets()
    if step_setting == "auto":
        targets.step_stiffness = auto_stiffness * limit
        engine.inference = replace(engine.inference, step_size=targets.step_stiffness / lam)
    gamma = engine.inference.step_size
    stiff = gamma * lam
    if stiff >= limit:
        raise UnstableSetting(
            f"inference.step_size={gamma:g} is past the stability limit: step_size * lambda_max = {stiff:.3g} >= "
            f"2 (1 + momentum) = {limit:.3g} at the initial weights (lambda_max = {lam:.3g}); use a step size "
            f"below {limit / lam:.3g}, or inference.step_size=auto"
        )
    floor = None
    if trainable_variance:
        lowest = math.log(stiff / limit)
        if floor_setting == "auto" and stiff >= AUTO_FLOOR_STIFFNESS * limit:
            key = (
                f"inference.auto_stiffness={auto_stiffness:g}"
                if step_setting == "auto"
                else f"inference.step_size={gamma:g}"
            )
            raise UnstableSetting(
                f"{key} leaves no room for a trainable variance: log_variance_min=auto keeps step_size * "
                f"lambda_max / S_min at {AUTO_FLOOR_STIFFNESS:g} of the limit, and step_size * lambda_max is already "
                f"{stiff / limit:.3g} of it at S = 1; use a smaller step (auto_stiffness < {AUTO_FLOOR_STIFFNESS:g})"
            )
        if floor_setting == "auto":
            targets.floor_stiffness = AUTO_FLOOR_STIFFNESS * limit
            floor = variance_floor(gamma, lam, targets.floor_stiffness)
        else:
            floor = float(floor_setting)
            if floor <= lowest:
                raise UnstableSetting(
                    f"log_variance_min={floor:g} is below the stable range: with inference.step_size={gamma:g}, "
                    f"momentum {beta:g} and lambda_max = {lam:.3g} at the initial weights, inference diverges once "
                    f"log S < {lowest:.3g}; use log_variance_min=auto or a value above {lowest:.3g}"
                )
    return {
        "lambda_max": lam,
        "stiffness": stiff,
        "limit": limit,
        "log_variance_min": floor,
        "step_size": gamma,
        "targets": targets,
    }
