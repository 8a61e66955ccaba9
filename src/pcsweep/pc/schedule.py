"""How one PC training batch is scheduled: T inference steps, weight updates on schedule (the paper's condition 2).

One loop, ``train_batch``, drives any ``Stepper``: the fast engine (``pcsweep.pc.engine``) and the plain and autograd
references (``pcsweep.pc.reference``) differ only in how they take a step, never in when.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from pcsweep.pc.energy import Network, output_loss


@dataclass(frozen=True)
class Inference:
    """Inference and the update schedule of one batch.

    ``update_every=None`` is condition 2 enforced (one weight update after ``steps`` steps); an integer k updates the
    weights every k steps from the current activities (relaxed). ``momentum`` (beta) makes the activity descent the
    heavy ball, ``v <- beta v - step_size dE/dx; x <- x + v``: the same fixed points, stable while
    ``step_size * lambda_max < 2 (1 + beta)``. ``tolerance`` (off: the paper's T is fixed) ends inference once the
    error energy's relative change over ``check_every`` steps falls below it. ``fixed_predictions`` holds every
    prediction at its feedforward value (Rosenbaum's FixedPred: with step 1 and >= L steps, BP's gradients exactly).
    """

    steps: int = 256
    step_size: float = 0.1
    momentum: float = 0.0
    update_every: Optional[int] = None
    tolerance: Optional[float] = None
    check_every: int = 8
    fixed_predictions: bool = False

    def __post_init__(self) -> None:
        """Each error names its field (``pcsweep.settings`` prefixes ``inference.``: one check, one message)."""
        checks = (
            (self.steps >= 1, "steps", ">= 1", self.steps),
            (
                self.update_every is None or 1 <= self.update_every <= self.steps,
                "update_every",
                f"null or in [1, inference.steps={self.steps}]",
                self.update_every,
            ),
            (self.step_size > 0, "step_size", "> 0", self.step_size),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum),
            (self.tolerance is None or self.tolerance > 0, "tolerance", "null or > 0", self.tolerance),
            (self.check_every >= 1, "check_every", ">= 1", self.check_every),
        )
        for ok, key, rule, value in checks:
            if not ok:
                raise ValueError(f"{key} must be {rule}, got {value!r}")


def plateaued(previous, current, tolerance: float):
    """The relative change from ``previous`` to ``current`` is at most ``tolerance`` (floats or 0-d tensors)."""
    return abs(previous - current) <= tolerance * abs(previous)


@dataclass
class BatchResult:
    """What one training batch produced; tensors stay on the device (no host sync inside the loop)."""

    loss: Tensor  # output loss of the feedforward pass, before any update (the same number BP reports)
    logits: Tensor  # feedforward prediction, before any update
    energy_start: Tensor  # mean ERROR energy per sample right after the output is clamped (no log-variance term)
    energy_end: Tensor  # mean error energy per sample after the last inference step (before the last weight update)
    updates: int  # weight updates applied
    energy_trace: Optional[Tensor] = None  # (T + 1,) mean error energy per sample after each step, when asked for
    steps_used: int = 0  # inference steps run (fewer than T only when a tolerance stopped inference early)
    energy_rises: Optional[Tensor] = None  # checks (every check_every steps) at which the error energy had risen
    log_variance_energy: Optional[Tensor] = None  # 0.5 sum log S at the end: the constant the error energy leaves out


class Stepper(Protocol):
    """What the loop needs of an implementation; errors are current after ``start``, ``step`` and ``recompute``."""

    net: Network

    def start(self, inputs: Tensor, target: Tensor) -> Tensor: ...  # feedforward init + clamp; returns the logits
    def step(self) -> None: ...  # one inference step on every hidden activity
    def recompute(self) -> None: ...  # the errors, after the parameters changed
    def error_energy(self) -> Tensor: ...  # mean error energy per sample (0-d)
    def write_gradients(self) -> object: ...  # dE/dtheta into every parameter's .grad
    def parameters_changed(self) -> None: ...  # after the optimizer stepped
    def log_variance_energy(self) -> Tensor: ...


@torch.no_grad()
def train_batch(
    stepper: Stepper,
    inference: Inference,
    inputs: Tensor,
    target: Tensor,
    apply_update: Callable[[], None],
    trace_energy: bool = False,
) -> BatchResult:
    """Feedforward init, clamp, ``inference.steps`` steps with weight updates on schedule.

    ``apply_update`` is called once the gradients are in ``.grad`` (typically ``optimizer.step``). Every
    ``check_every`` steps the error energy is compared with the last check (rises are counted: a stability watch)
    and, with a tolerance, inference stops once it plateaued; a last weight update is then made from there.
    """
    logits = stepper.start(inputs, target)
    loss = output_loss(logits, target, stepper.net.output_loss)
    energy_start = stepper.error_energy()
    trace = [energy_start] if trace_energy else None
    every = inference.update_every or inference.steps
    updates, steps_used = 0, inference.steps
    tolerance_ref = rise_ref = energy_end = energy_start
    rises = torch.zeros((), dtype=torch.int64, device=energy_start.device)
    for t in range(1, inference.steps + 1):
        stepper.step()
        if trace is not None:
            trace.append(stepper.error_energy())
        last, converged = t == inference.steps, False
        if t % inference.check_every == 0 or last:
            current = trace[-1] if trace is not None else stepper.error_energy()
            rises += current > rise_ref
            rise_ref = current
            if inference.tolerance is not None and t % inference.check_every == 0 and not last:
                converged = bool(plateaued(tolerance_ref, current, inference.tolerance))
                tolerance_ref = current
        if last or converged:  # before the last weight update changes what the energy depends on
            energy_end = trace[-1] if trace is not None else stepper.error_energy()
        if t % every == 0 or converged:
            stepper.write_gradients()
            apply_update()
            stepper.parameters_changed()
            updates += 1
            if not (last or converged):
                stepper.recompute()
                rise_ref = stepper.error_energy()  # rises are counted within inference, not across updates
        if converged:
            steps_used = t
            break
    return BatchResult(
        loss=loss,
        logits=logits,
        energy_start=energy_start,
        energy_end=energy_end,
        updates=updates,
        energy_trace=torch.stack(trace) if trace is not None else None,
        steps_used=steps_used,
        energy_rises=rises,
        log_variance_energy=stepper.log_variance_energy(),
    )
