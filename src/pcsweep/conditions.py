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
from dataclasses import dataclass
from typing import Optional, Sequence, cast

import torch
from torch import Tensor

from pcsweep.errors import UserError
from pcsweep.pc import PCEngine, activity_curvature
from pcsweep.pc.schedule import plateaued

# Stiffness (step_size * lambda_max) the automatic variance floor allows: below the limit 2, with room for the
# curvature to grow as the weights train (1 would be the critically damped step for the stiffest mode).
AUTO_FLOOR_STIFFNESS = 1.5


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
    """Inference without weight updates on (inputs, target): the state at ``at_step`` against the state where the
    error energy's relative change over ``check_every`` steps fell below ``tolerance`` (or ``max_steps``).

    Writes ``.grad`` of the weights (the next training batch overwrites it) and leaves the engine's buffers to the
    next ``feedforward_init``."""
    engine.start(inputs, target)
    start = float(engine.error_energy())
    for _ in range(at_step):
        engine.step()
    at_t = float(engine.error_energy())
    layers_at_t = engine.layer_error_energies().tolist()
    updates_at_t = _weight_updates(engine)
    steps, previous, current = at_step, at_t, at_t
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


def variance_floor(
    step_size: float, curvature_at_unit_variance: float, target_stiffness: float = AUTO_FLOOR_STIFFNESS
) -> float:
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


@torch.no_grad()
def follow_variance_floor(engine: PCEngine, inputs: Tensor, target: Tensor, target_stiffness: float) -> float:
    """Move the engine's floor on log S to where ``step_size * lambda_max / S_min`` is ``target_stiffness`` for the
    curvature of the current weights (measured at S = 1 on this batch's feedforward state), and clamp the variances
    to it. The curvature grows as the weights train (about 1.4x over 1,000 updates on digits), so a floor fixed at
    the initial weights would let inference become unstable. Returns the new floor."""
    engine.feedforward_init(inputs, target)
    curvature = float(activity_curvature(engine, unit_variance=True).max())
    engine.log_variance_min = variance_floor(engine.inference.step_size, curvature, target_stiffness)
    engine.refresh_parameters()
    return engine.log_variance_min


@torch.no_grad()
def preflight_stability(
    engine: PCEngine, inputs: Tensor, target: Tensor, floor_setting, trainable_variance: bool
) -> dict:
    """At the initial weights (S = 1) on one batch: is gradient descent on the activities stable, and which floor on
    log S keeps it so? Heavy-ball descent is stable while ``step_size * lambda_max < 2 (1 + momentum)``; the largest
    eigenvalue scales like 1/S, so a floor f allows ``step_size * lambda_max * exp(-f)`` at most.

    Returns ``lambda_max``, ``stiffness``, ``limit`` and ``log_variance_min`` (None without trainable variances);
    raises ``UnstableSetting`` for a step size or a floor past the limit."""
    engine.feedforward_init(inputs, target)
    lam = float(activity_curvature(engine).max())
    gamma, beta = engine.inference.step_size, engine.inference.momentum
    limit, stiff = 2 * (1 + beta), gamma * lam
    if stiff >= limit:
        raise UnstableSetting(
            f"inference.step_size={gamma:g} is past the stability limit: step_size * lambda_max = {stiff:.3g} >= "
            f"2 (1 + momentum) = {limit:.3g} at the initial weights (lambda_max = {lam:.3g}); use a step size "
            f"below {limit / lam:.3g}"
        )
    floor = None
    if trainable_variance:
        lowest = math.log(stiff / limit)
        if floor_setting == "auto":
            floor = variance_floor(gamma, lam, AUTO_FLOOR_STIFFNESS * (1 + beta))
        else:
            floor = float(floor_setting)
            if floor <= lowest:
                raise UnstableSetting(
                    f"relax.log_variance_min={floor:g} is below the stable range: with inference.step_size={gamma:g}, "
                    f"momentum {beta:g} and lambda_max = {lam:.3g} at the initial weights, inference diverges once "
                    f"log S < {lowest:.3g}; use relax.log_variance_min=auto or a value above {lowest:.3g}"
                )
    return {
        "lambda_max": lam,
        "stiffness": stiff,
        "limit": limit,
        "log_variance_min": floor,
        "floor_stiffness": AUTO_FLOOR_STIFFNESS * (1 + beta) if floor_setting == "auto" else None,
    }
