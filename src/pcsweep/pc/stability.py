"""Keeping inference stable while the weights train (pure torch, over the engine's public API): the pre-flight at the
initial weights, the automatic step size and variance floor, and re-measuring the curvature as it grows.

Heavy-ball descent on the activities is stable while ``step_size * lambda_max < 2 (1 + momentum)``; ``lambda_max``
(the activity Hessian's largest eigenvalue, ``activity_curvature``) scales like 1/S, so a floor on log S bounds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import Tensor

from pcsweep.config.errors import UserError
from pcsweep.pc.solvers import solver_class

if TYPE_CHECKING:
    from pcsweep.pc.engine import PCEngine
    from pcsweep.pc.schedule import Inference

# log_variance_min=auto: step_size * lambda_max / S_min held at this fraction of the limit; with the automatic
# step size the floor is S_min = auto_stiffness / 0.9 (0.89 for rc3, 0.56 for rc23)
AUTO_FLOOR_STIFFNESS = 0.9


def heavy_ball_limit(momentum: float) -> float:
    """Heavy-ball descent on a quadratic is stable while step_size * lambda_max < 2 (1 + momentum)."""
    return 2 * (1 + momentum)


def automatic_step(fraction: float, momentum: float, curvature: float) -> float:
    """``inference.step_size=auto``: the step at ``fraction`` (``inference.auto_stiffness``) of the stability limit."""
    return fraction * heavy_ball_limit(momentum) / curvature


@torch.no_grad()
def stiffness(engine: PCEngine, inputs: Tensor, target: Tensor, iterations: int = 30) -> float:
    """``step_size * lambda_max`` at the feedforward state of (inputs, target), with the current variances."""
    engine.feedforward_init(inputs, target)
    return engine.inference.step_size * float(activity_curvature(engine, iterations).max())


def variance_floor(step_size: float, curvature_at_unit_variance: float, target_stiffness: float) -> float:
    """The lowest log S at which ``step_size * lambda_max`` stays at ``target_stiffness`` (lambda scales like 1/S)."""
    return math.log(step_size * curvature_at_unit_variance / target_stiffness)


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
    floor_setting: Any,
    trainable_variance: bool,
    step_setting: Any = None,
    auto_stiffness: Optional[float] = None,
) -> dict:
    """At the initial weights (S = 1) on one batch: is gradient descent on the activities stable, and which floor on
    log S keeps it so? Heavy-ball descent is stable while ``step_size * lambda_max < 2 (1 + momentum)``; the largest
    eigenvalue scales like 1/S, so a floor f allows ``step_size * lambda_max * exp(-f)`` at most.
    ``step_setting="auto"`` sets the engine's step size to ``auto_stiffness`` of that limit over ``lambda_max``
    (a number, or None, keeps the engine's).

    Returns ``lambda_max``, ``step_size``, ``stiffness``, ``limit``, ``log_variance_min`` (None without trainable
    variances) and the ``CurvatureTargets`` the run follows; raises ``UnstableSetting`` for a step size or a floor
    past the limit. The step is checked against the solver's own ``stability_limit`` (``pcsweep.pc.solvers``; a solver
    that takes no step size has none), the floor by the heavy-ball rule whatever the solver (S_min bounds the
    curvature, 1/S_min)."""
    engine.feedforward_init(inputs, target)
    lam = float(activity_curvature(engine).max())
    limit = heavy_ball_limit(engine.inference.momentum)
    targets = CurvatureTargets()
    if step_setting == "auto":
        if auto_stiffness is None:
            raise ValueError("step_setting='auto' needs auto_stiffness (inference.auto_stiffness)")
        targets.step_stiffness = auto_stiffness * limit
        engine.inference = replace(
            engine.inference, step_size=automatic_step(auto_stiffness, engine.inference.momentum, lam)
        )
    gamma = engine.inference.step_size
    stiff = gamma * lam
    if solver_class(engine.inference.solver).stability_limit(engine.inference.momentum) is not None and stiff >= limit:
        raise UnstableSetting(
            f"inference.step_size={gamma:g} is past the stability limit: step_size * lambda_max = {stiff:.3g} >= "
            f"2 (1 + momentum) = {limit:.3g} at the initial weights (lambda_max = {lam:.3g}); use a step size "
            f"below {limit / lam:.3g}, or inference.step_size=auto"
        )
    floor = None
    if trainable_variance:
        step_key = f"inference.auto_stiffness={auto_stiffness:g}" if step_setting == "auto" else None
        floor = _stable_floor(floor_setting, engine.inference, lam, targets, step_key)
    return {
        "lambda_max": lam,
        "stiffness": stiff,
        "limit": limit,
        "log_variance_min": floor,
        "step_size": gamma,
        "targets": targets,
    }


def _stable_floor(
    floor_setting: Any, inference: Inference, lam: float, targets: CurvatureTargets, step_key: Optional[str]
) -> float:
    """The floor on log S for ``log_variance_min`` (``auto``: where ``step_size * lambda_max / S_min`` is
    ``AUTO_FLOOR_STIFFNESS`` of the limit, followed as the curvature grows via ``targets``; a number is checked)."""
    gamma, beta = inference.step_size, inference.momentum
    limit = heavy_ball_limit(beta)
    stiff = gamma * lam
    if floor_setting == "auto":
        if stiff >= AUTO_FLOOR_STIFFNESS * limit:
            raise UnstableSetting(
                f"{step_key or f'inference.step_size={gamma:g}'} leaves no room for a trainable variance: "
                f"log_variance_min=auto keeps step_size * lambda_max / S_min at {AUTO_FLOOR_STIFFNESS:g} of the limit, "
                f"and step_size * lambda_max is already {stiff / limit:.3g} of it at S = 1; use a smaller step "
                f"(auto_stiffness < {AUTO_FLOOR_STIFFNESS:g})"
            )
        targets.floor_stiffness = AUTO_FLOOR_STIFFNESS * limit
        return variance_floor(gamma, lam, targets.floor_stiffness)
    floor, lowest = float(floor_setting), math.log(stiff / limit)
    if floor <= lowest:
        raise UnstableSetting(
            f"log_variance_min={floor:g} is below the stable range: with inference.step_size={gamma:g}, "
            f"momentum {beta:g} and lambda_max = {lam:.3g} at the initial weights, inference diverges once "
            f"log S < {lowest:.3g}; use log_variance_min=auto or a value above {lowest:.3g}"
        )
    return floor


@torch.no_grad()
def activity_curvature(engine: PCEngine, iterations: int = 30, seed: int = 0, unit_variance: bool = False) -> Tensor:
    """Largest eigenvalue of each sample's Gauss-Newton Hessian of E over the hidden activities of a solo run, by
    power iteration at the engine's current state (shape (B,)). Gradient descent on the activities is stable while
    ``step_size * lambda_max < 2``. At the feedforward state (hidden errors zero, linear output) Gauss-Newton is the
    exact Hessian; it scales like 1/S, so a variance floor S_min multiplies it by at most 1/S_min.

    H v = sum_l J_l^T P_l J_l v, with J_l v = v_l - f'(a_l) * (v_{l-1} W_l^T) the change of e_l (x_0, x_L clamped).
    ``unit_variance``: as if every S were 1 (an upper bound on the curvature times S_min when all S >= S_min).
    """
    net, L = engine.net, engine.net.num_layers
    W, fp, X, aL = net.weights, engine.fprime, engine.X[:, 0], engine.aL[0]
    P: list[Optional[Tensor]] = [None] * L if unit_variance else engine.precisions
    gen = torch.Generator(device=X.device).manual_seed(seed)
    v = torch.randn(X.shape, generator=gen, device=X.device, dtype=X.dtype)
    softmax = torch.softmax(aL, dim=1) if net.output_loss == "ce" else None
    lam = torch.zeros(v.shape[1], dtype=v.dtype, device=v.device)
    for _ in range(iterations):
        v = v / v.pow(2).sum(dim=(0, 2)).sqrt().clamp_min(1e-30).view(1, -1, 1)
        r = []  # P_l J_l v for l = 1..L
        for l in range(1, L + 1):
            change = v[l - 1] if l < L else torch.zeros_like(aL)
            if l > 1:
                drive = v[l - 2] @ W[l - 1].t()
                change = change - (fp[l] * drive if l < L else drive)
            if l == L and softmax is not None:  # cross-entropy: the softmax's Hessian instead of a precision
                r.append(softmax * change - softmax * (softmax * change).sum(dim=1, keepdim=True))
            else:
                r.append(change if P[l - 1] is None else cast(Tensor, P[l - 1]) * change)
        hv = torch.stack([r[l - 1] - ((fp[l + 1] * r[l]) if l + 1 < L else r[l]) @ W[l] for l in range(1, L)])
        lam = (v * hv).sum(dim=(0, 2))
        v = hv
    return lam
