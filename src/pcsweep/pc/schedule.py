"""How one PC training batch is scheduled: T inference steps, weight updates on schedule (the paper's condition 2).

One loop, ``train_batches``, drives any ``Stepper`` of R >= 1 runs: the engine (``pcsweep.pc.engine``: a solo run, or a
pack of runs computed together) and the plain and autograd references (``pcsweep.pc.reference``) differ only in how
they take a step, never in when.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from pcsweep.pc.energy import output_loss
from pcsweep.pc.solvers import SOLVERS, solver_class


@dataclass(frozen=True)
class Inference:
    """Inference and the update schedule of one batch.

    ``update_every=None`` is condition 2 enforced (one weight update after ``steps`` steps); an integer k updates the
    weights every k steps from the current activities (relaxed).

    ``solver`` is how inference moves, a name in ``pcsweep.pc.solvers.SOLVERS``: ``state`` descends the energy over
    the hidden activities (the paper's dynamics, ``pcsweep.pc.state_solver``; ``momentum`` (beta) makes it the heavy
    ball ``v <- beta v - step_size dE/dx; x <- x + v``); ``error`` optimizes over the prediction errors
    (``pcsweep.pc.error_solver``: the same equilibrium, reached in a fraction of the steps; no step size to choose).

    ``tolerance`` (off: the paper's T is fixed) ends inference at the equilibrium: once the relative residual
    ``|dE/dx| / |dE/dx at the feedforward state|`` is below it at two consecutive checks (every ``check_every``
    steps), with no rise of the energy at the second and not before ``min_steps``. ``fixed_predictions`` holds every
    prediction at its feedforward value (Rosenbaum's FixedPred: with step 1 and >= L steps, BP's gradients exactly).
    """

    steps: int = 256
    step_size: float = 0.1
    momentum: float = 0.0
    update_every: Optional[int] = None
    tolerance: Optional[float] = None
    check_every: int = 8
    fixed_predictions: bool = False
    solver: str = "state"

    def __post_init__(self) -> None:
        """Each error names its field (``pcsweep.config.settings`` prefixes ``inference.``: one check, one message)."""
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
            (self.solver in SOLVERS, "solver", f"one of {list(SOLVERS)}", self.solver),
        )
        for ok, key, rule, value in checks:
            if not ok:
                raise ValueError(f"{key} must be {rule}, got {value!r}")
        cannot = solver_class(self.solver).check_inference(self)
        if cannot is not None:
            raise ValueError(f"solver must be {cannot}, got {self.solver!r}")

    def min_steps(self, hidden_layers: int) -> int:
        """The earliest step at which inference may stop (the solver's rule: state descent moves the error down
        one layer per step, error optimization reaches every layer at its first)."""
        return solver_class(self.solver).min_steps(hidden_layers, self.check_every)

    def check_steps(self, hidden_layers: int) -> None:
        """With a tolerance, T must leave room for two checks from ``min_steps`` (ValueError naming ``steps``)."""
        need = self.min_steps(hidden_layers) + self.check_every
        if self.tolerance is not None and self.steps < need:
            raise ValueError(
                f"steps must be >= {need} with a tolerance ({self.solver} inference reaches all {hidden_layers} "
                f"hidden layers and checks twice by then), got {self.steps}"
            )


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
    residual: Optional[Tensor] = None  # the worst sample's |dE/dx| relative to its first (``relative_residual``)
    converged: Optional[bool] = None  # the tolerance was met (None: no tolerance, T steps by design)


class Stepper(Protocol):
    """What the loop needs of an implementation of R >= 1 runs: tensors carry the run on their leading dimension,
    and errors are current after ``start``, ``step`` and ``recompute``."""

    output_loss: str
    hidden_layers: int

    def start(self, inputs: Tensor, target: Tensor) -> Tensor: ...  # feedforward init + clamp; the logits (R, B, n)
    def step(self) -> None: ...  # one inference step on every hidden activity of every moving run
    def recompute(self) -> None: ...  # the errors, after the parameters changed
    def error_energies(self) -> Tensor: ...  # (R,) mean error energy per sample of each run
    def write_gradients(self) -> object: ...  # dE/dtheta into every parameter's .grad
    def parameters_changed(self) -> None: ...  # after the optimizers stepped
    def log_variance_energies(self) -> Tensor: ...  # (R,)
    def residuals(self) -> Tensor: ...  # (R, B) |dE/dx| over every hidden activity of each sample of each run
    def hold(self, moving: Sequence[bool]) -> None: ...  # runs that stopped keep their activities from now on


@dataclass
class _Runs:
    """Each run's bookkeeping during one batch (R entries each; tensors stay on the device)."""

    moving: list[bool]
    updates: list[int]
    steps_used: list[int]
    rise_ref: Tensor
    energy_end: Tensor
    rises: Tensor
    log_variance_energy: list[Optional[Tensor]]
    residual: Tensor  # relative, at the last check (at the stop once a run stopped)
    below: list[bool]  # the last check was below the tolerance
    converged: list[bool]

    def mask(self, flags: Sequence[bool]) -> Tensor:
        return torch.tensor(list(flags), dtype=torch.bool, device=self.rises.device)


@torch.no_grad()
def train_batches(
    stepper: Stepper,
    inferences: Sequence[Inference],
    inputs: Tensor,
    target: Tensor,
    apply_updates: Sequence[Callable[[], None]],
    trace_energy: bool = False,
) -> list[BatchResult]:
    """Feedforward init, clamp, T steps with weight updates on schedule, for R runs at once (``inputs`` (R, B, n_in),
    ``inferences[r]`` and ``apply_updates[r]`` run r's; T, the update and the check interval are the first's).

    ``apply_updates[r]`` is called once the gradients are in ``.grad`` (typically run r's ``optimizer.step``). Every
    ``check_every`` steps each run's error energy is compared with its last check (rises are counted: a stability
    watch) and, with a tolerance, a run stops at the equilibrium (``Inference``): a last weight update is made from
    there and its activities are held while the others go on. Each run stops, updates and counts as it would alone;
    each records the relative residual where it stopped.
    """
    R, first = len(apply_updates), inferences[0]
    steps, check_every, every = first.steps, first.check_every, first.update_every or first.steps
    min_steps = first.min_steps(stepper.hidden_layers)
    judging = any(i.tolerance is not None for i in inferences)
    logits = stepper.start(inputs, target)
    losses = [output_loss(logits[r], target[r], stepper.output_loss) for r in range(R)]
    energy_start = stepper.error_energies()
    residual_start = stepper.residuals()
    trace = [energy_start] if trace_energy else None
    device = energy_start.device
    runs = _Runs(
        [True] * R, [0] * R, [steps] * R, energy_start, energy_start,
        torch.zeros(R, dtype=torch.int64, device=device), [None] * R,
        torch.ones_like(energy_start), [False] * R, [False] * R,
    )  # fmt: skip
    for t in range(1, steps + 1):
        stepper.step()
        if trace is not None:
            trace.append(stepper.error_energies())
        last, converged = t == steps, [False] * R
        if t % check_every == 0 or last:
            current = trace[-1] if trace is not None else stepper.error_energies()
            residual = relative_residual(stepper.residuals(), residual_start) if judging or last else None
            converged = _check(runs, inferences, current, residual, judge=t % check_every == 0 and t >= min_steps)
            if last:  # the runs that reach T: did they meet their tolerance all the same?
                converged = [False] * R
            ending = runs.mask([m and (last or c) for m, c in zip(runs.moving, converged)])
            runs.energy_end = torch.where(ending, current, runs.energy_end)  # before the update changes it
            if residual is not None:
                runs.residual = torch.where(ending, residual, runs.residual)
        due = [m and (t % every == 0 or c) for m, c in zip(runs.moving, converged)]
        if any(due):
            _update(stepper, runs, apply_updates, due, converged, last)
        if any(converged) and _stop_converged(stepper, runs, converged, t):
            break
    energies = stepper.log_variance_energies()
    return [
        _result(runs, r, inferences[r], losses[r], logits[r], energy_start[r], energies[r], trace) for r in range(R)
    ]


def _stop_converged(stepper: Stepper, runs: _Runs, converged: list[bool], t: int) -> bool:
    """The runs that met their tolerance at step ``t`` stop there and are held; True once no run moves."""
    energies = stepper.log_variance_energies()
    for r in (r for r in range(len(converged)) if converged[r]):
        runs.steps_used[r], runs.moving[r], runs.log_variance_energy[r] = t, False, energies[r]
        runs.converged[r] = True
    if not any(runs.moving):
        return True
    stepper.hold(runs.moving)
    return False


# a sample whose first residual is below this share of the batch's mean is judged against that share: one already at
# its equilibrium (a tiny first residual, relative noise) cannot hold the batch
SAMPLE_FLOOR = 0.1


def relative_residual(residual: Tensor, start: Tensor) -> Tensor:
    """(R,) the worst sample's residual relative to its own at the first step (``residual``, ``start``: (R, B)), a
    sample's first residual floored at ``SAMPLE_FLOOR`` of the batch's mean; 0 for a run that started at rest."""
    floor = SAMPLE_FLOOR * start.mean(dim=1, keepdim=True)
    scale = torch.maximum(start, floor).clamp_min(torch.finfo(start.dtype).tiny)
    worst = (residual / scale).amax(dim=1)
    return torch.where(start.amax(dim=1) > 0, worst, torch.zeros_like(worst))


def _result(runs: _Runs, r: int, inference: Inference, loss, logits, energy_start, log_variance_energy, trace):
    met = None
    if inference.tolerance is not None:  # stopped at the equilibrium, or ended at T within the tolerance anyway
        met = runs.converged[r] or bool(runs.residual[r] < inference.tolerance)
    return BatchResult(
        loss=loss,
        logits=logits,
        energy_start=energy_start,
        energy_end=runs.energy_end[r],
        updates=runs.updates[r],
        energy_trace=None if trace is None else torch.stack([e[r] for e in trace[: runs.steps_used[r] + 1]]),
        steps_used=runs.steps_used[r],
        energy_rises=runs.rises[r],
        log_variance_energy=log_variance_energy if runs.log_variance_energy[r] is None else runs.log_variance_energy[r],
        residual=runs.residual[r],
        converged=met,
    )


def _check(
    runs: _Runs, inferences: Sequence[Inference], current: Tensor, residual: Optional[Tensor], judge: bool
) -> list[bool]:
    """A check: rises counted for the moving runs and, when ``judge`` (past ``min_steps``), which of them are at the
    equilibrium: the relative residual below the tolerance at this check and the last, and the energy not risen since
    the last."""
    rose = current > runs.rise_ref
    if all(runs.moving):  # every run moves (a solo run always): no mask to build
        runs.rises += rose
        runs.rise_ref = current
    else:
        moving = runs.mask(runs.moving)
        runs.rises += rose & moving
        runs.rise_ref = torch.where(moving, current, runs.rise_ref)
    converged = [False] * len(runs.moving)
    if residual is None:
        return converged
    residuals, rises = residual.tolist(), rose.tolist()  # one host sync a check
    for r, inference in enumerate(inferences):
        if runs.moving[r] and inference.tolerance is not None:
            below = residuals[r] < inference.tolerance
            converged[r] = judge and below and runs.below[r] and not rises[r]
            runs.below[r] = below
    return converged


def _update(stepper: Stepper, runs: _Runs, apply_updates, due: list[bool], converged: list[bool], last: bool) -> None:
    """The weight updates due now; the runs that go on after theirs recount rises from the new errors."""
    stepper.write_gradients()
    for r in (r for r in range(len(due)) if due[r]):
        apply_updates[r]()
        runs.updates[r] += 1
    stepper.parameters_changed()
    again = [d and not c for d, c in zip(due, converged)]
    if any(again) and not last:
        stepper.recompute()
        runs.rise_ref = torch.where(runs.mask(again), stepper.error_energies(), runs.rise_ref)


def train_batch(
    stepper: Stepper,
    inference: Inference,
    inputs: Tensor,
    target: Tensor,
    apply_update: Callable[[], None],
    trace_energy: bool = False,
) -> BatchResult:
    """``train_batches`` for a stepper of one run: ``inputs`` (B, n_in), ``target`` (B, n_out)."""
    return train_batches(stepper, [inference], inputs[None], target[None], [apply_update], trace_energy)[0]
