"""Did the paper's conditions hold? What a PC run measures of itself (pure torch, over the engine's public API).

- **Condition 2** (inference converged): on a fixed probe batch, the state after the twin's update point (T steps,
  or k for relax 2) against inference run far past it. The gap is the share of the error energy at T that inference
  would still remove, ``(E_T - E_conv) / E_T``; per weight layer, the cosine and the norm ratio between the update at
  T and the update at convergence.
- **Condition 3 relaxed**: per-layer statistics of log S, and how many neurons sit on the floor.

Inference's stability is kept (and measured) by ``pcsweep.pc.stability``; what the numbers mean for a run, its
verdicts, is ``pcsweep.track.verdicts``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Sequence, cast

import torch
from torch import Tensor

from pcsweep.pc import PCEngine
from pcsweep.pc.schedule import plateaued, train_batch


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
    layers_at_t = engine.layer_error_energies()[0].tolist()
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
        "layer_energy_converged": engine.layer_error_energies()[0].tolist(),
        "cosine": [_cosine(a, b) for a, b in zip(updates_at_t, updates_at_end)],
        "norm_ratio": [
            float(a.norm() / b.norm()) if float(b.norm()) > 0 else 1.0 for a, b in zip(updates_at_t, updates_at_end)
        ],
    }


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
