"""Inference solvers behind one small interface, chosen by name (``inference.solver``) from a registry.

A solver moves one engine's inference towards the equilibrium of the energy; the engine (``pcsweep.pc.engine``)
holds the buffers and the math every solver shares (predictions, errors, the residual, the gradients), and the loop
(``pcsweep.pc.schedule.train_batches``) decides when to step, check, update and stop. A solver is:

- ``start()`` at the feedforward state (hidden errors zero), ``step()``, ``recompute()`` after the parameters
  changed, ``hold(moving)`` for runs that stopped;
- class facts the loop and the checks read before any engine exists: ``min_steps``, ``check_inference`` (what the
  solver cannot run) and ``stability_limit`` (the bound on step size x curvature that the pre-flight at the initial
  weights, ``pcsweep.pc.stability.preflight_stability``, holds it to; None where it takes no step size).

Adding one is a new file and a line in ``SOLVERS`` (or ``register_solver`` from outside the package); subclassing
``Solver`` gives the defaults below (a solo-run solver that runs a converged schedule, no step size to check).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence, Union

if TYPE_CHECKING:
    from torch import Tensor

    from pcsweep.pc.energy import Activation
    from pcsweep.pc.kernels import Tricks
    from pcsweep.pc.members import Member
    from pcsweep.pc.schedule import Inference
    from pcsweep.pc.storage import EngineStorage


class Host(Protocol):
    """What a solver may use of the engine it moves (``PCEngine``): its storage and the shared math."""

    store: EngineStorage
    members: list[Member]
    tricks: Tricks
    R: int
    H: int
    activation: Activation
    output_loss: str
    fixed_predictions: bool
    front: int  # hidden rows below it still hold their feedforward values (exact zero errors)

    def feed_input(self) -> None: ...  # a_1 = W_1 x_0 + b_1, once per parameter change (x_0 is clamped)
    def errors(self, predict: bool, lo: int = 0) -> None: ...  # predictions (if asked) and errors from the rows lo up
    def weighted_errors(self, lo: int = 0) -> None: ...  # eps = e / S, g = f'(a) eps, and the output's errors
    def residuals(self) -> Tensor: ...  # (R, B) |dE/dx| per sample; dE/dx itself left in ``store.gradient``


class Solver(Protocol):
    """One engine's inference solver (see the module docstring); the bodies here are the defaults a subclass gets."""

    engine: Host
    solo_2d_kernels: bool = False  # a solo run's in and out layers use the 2-d kernels (``kernels.affine``)

    def __init__(self, engine: Host) -> None:
        self.engine = engine

    def start(self) -> None: ...  # at the feedforward state (errors current), before the first step
    def step(self) -> None: ...  # one inference step for every moving run; errors current after it
    def recompute(self) -> None: ...  # the errors (and the solver's state), after the parameters changed

    def allocate(self) -> None:
        """The engine's buffers changed (a new batch size, dtype or device): the solver's own, anew."""

    def hold(self, moving: Sequence[bool]) -> None:
        """Runs with False keep their state until the next ``start`` (a pack whose runs stop apart)."""
        if not all(moving):
            raise NotImplementedError(f"{type(self).__name__} cannot hold a run: it trains solo runs only")

    @classmethod
    def min_steps(cls, hidden_layers: int, check_every: int) -> int:
        """The earliest step at which inference may stop (a check past one step per layer, unless it knows better)."""
        return check_every + hidden_layers

    @classmethod
    def check_inference(cls, inference: Inference) -> Optional[str]:
        """Why the solver cannot run these settings (completing "solver must be ..."), or None."""
        if inference.update_every is not None or inference.fixed_predictions:
            return (
                "state when the weights are updated during inference (update_every: relax 2 and 23, whose updates "
                "are the relaxation itself) or with fixed predictions"
            )
        return None

    @classmethod
    def stability_limit(cls, momentum: float) -> Optional[float]:
        """The bound on step_size * lambda_max the pre-flight holds it to; None: it takes no step size."""
        return None


# name -> "module:Class", imported on first use (a solver's module may import the engine's; this one imports none)
SOLVERS: dict[str, Union[str, type]] = {
    "state": "pcsweep.pc.state_solver:StateDescent",
    "error": "pcsweep.pc.error_solver:ErrorOptimization",
}


def register_solver(name: str, solver: Union[str, type]) -> None:
    """Make ``inference.solver=name`` run ``solver`` (a class, or "module:Class")."""
    SOLVERS[name] = solver


def solver_class(name: str) -> Any:
    """The registered solver ``name`` (``KeyError`` for an unknown one: ``Inference`` names the choices)."""
    entry = SOLVERS[name]
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = SOLVERS[name] = getattr(importlib.import_module(module), cls)
    return entry
