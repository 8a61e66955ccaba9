"""State descent (``inference.solver=state``): the paper's dynamics, gradient descent on the hidden activities, with
pcsweep's heavy ball ``v <- beta v - gamma dE/dx; x <- x + v`` (beta = 0: plain descent). The same fixed points
whatever beta; stable while ``gamma * lambda_max < 2 (1 + beta)`` (``stability_limit``; ``pcsweep.pc.stability``
measures lambda_max and sets gamma). One Jacobi step moves every hidden row at once, dE/dx_l = eps_l - g_{l+1} W_{l+1},
so the error moves down one layer per step: the error front (``Tricks.error_front``) skips the rows below it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pcsweep.pc.schedule import Inference
from pcsweep.pc.solvers import Host, Solver
from pcsweep.pc.stability import heavy_ball_limit
from pcsweep.pc.storage import flat


class StateDescent(Solver):
    """Heavy-ball descent on the activities of every moving run of an engine (a ``solvers.Solver``)."""

    solo_2d_kernels = True  # a solo state run rounds as it always did

    def __init__(self, engine: Host) -> None:
        self.engine = engine
        self.velocity: Optional[Tensor] = None  # (H, R, B, n), heavy ball only
        self.moving: Optional[list[bool]] = None  # None: every run moves, with one step size and momentum
        self.gamma_rows = self.beta_rows = torch.zeros(0)  # per flat hidden row, once runs differ (``hold``)

    # ------------------------------------------------------------ class facts
    @classmethod
    def min_steps(cls, hidden_layers: int, check_every: int) -> int:
        """The error moves down one layer per step: not before it reached every layer and was checked once more."""
        return check_every + hidden_layers

    @classmethod
    def check_inference(cls, inference: Inference) -> Optional[str]:
        return None  # runs every schedule: the paper's T, the relaxed updates, fixed predictions

    @classmethod
    def stability_limit(cls, momentum: float) -> Optional[float]:
        """Heavy ball on a quadratic is stable while step_size * lambda_max < 2 (1 + momentum)."""
        return heavy_ball_limit(momentum)

    # ------------------------------------------------------------ the solver
    def allocate(self) -> None:
        store = self.engine.store
        heavy_ball = any(m.inference.momentum for m in self.engine.members)
        self.velocity = torch.zeros_like(store.X) if heavy_ball else None
        self._velocity_rows = None if self.velocity is None else [flat(self.velocity[lo:]) for lo in range(store.H)]
        self._velocity_below = None if self.velocity is None else [flat(self.velocity[lo:-1]) for lo in range(store.H)]

    def start(self) -> None:
        if self.velocity is not None:
            self.velocity.zero_()  # inference starts at rest
        self.moving = None
        members = self.engine.members
        if len({(m.inference.step_size, m.inference.momentum) for m in members}) > 1:
            self.hold([True] * len(members))  # every run moves, each with its own step size and momentum

    def hold(self, moving: Sequence[bool]) -> None:
        """Step size and momentum 0 for the runs that stopped, until the next batch starts."""
        self.moving = list(moving)
        store = self.engine.store

        def rows(values: Sequence[float]) -> Tensor:  # one value a run, on every flat hidden row
            per_run = torch.tensor(list(values), dtype=store.X.dtype, device=store.X.device)
            return per_run.view(1, -1, 1, 1).expand(store.H, -1, 1, 1).reshape(-1, 1, 1)

        members = self.engine.members
        self.gamma_rows = rows([m.inference.step_size if go else 0.0 for m, go in zip(members, moving)])
        self.beta_rows = rows([m.inference.momentum if go else 0.0 for m, go in zip(members, moving)])

    def step(self) -> None:
        """One Jacobi step on the hidden rows from the error front up, then their errors."""
        engine = self.engine
        engine.front = max(engine.front - 1, 0) if engine.tricks.error_front else 0
        self._descend(engine.front)
        self.recompute()

    def recompute(self) -> None:
        engine = self.engine
        engine.errors(not engine.fixed_predictions, lo=min(engine.front, engine.H - 1))

    def _descend(self, lo: int) -> None:
        """``v <- beta v - gamma dE/dx; x <- x + v`` on the hidden rows from ``lo`` up, every run at once (beta = 0:
        plain descent, x moves itself): dE/dx_l = eps_l - g_{l+1} W_{l+1}."""
        store, R = self.engine.store, self.engine.R
        rows, products = store.rows[lo], store.products
        heavy = self.velocity is not None
        if self.velocity is not None and self._velocity_rows is not None and self._velocity_below is not None:
            moved, moved_below, top = self._velocity_rows[lo], self._velocity_below[lo], self.velocity[-1]
        else:
            moved, moved_below, top = rows.x, rows.x_below, store.X[-1]
        if self.moving is None:  # one step size and momentum: scalar kernels
            inference = self.engine.members[0].inference
            gamma, beta = inference.step_size, inference.momentum
            if heavy:
                moved.mul_(beta)
            moved.add_(rows.eps, alpha=-gamma)
            products.feedback(lo * R, rows.g_above, moved_below, gamma)
            if R == 1:  # the 2-d kernel a solo run always used
                top[0].addmm_(store.epsL[0], store.w_out[0], alpha=gamma)
            else:
                top.baddbmm_(store.epsL, store.w_out, alpha=gamma)
        else:  # each run its own (0 for a held run: it does not move)
            gamma_rows, beta_rows = self.gamma_rows[lo * R :], self.beta_rows[lo * R :]
            if heavy:
                moved.mul_(beta_rows)
            moved.addcmul_(rows.eps, gamma_rows, value=-1.0)
            if rows.g_above.shape[0]:
                feedback = store.feedback[: rows.g_above.shape[0]]
                products.feedback_into(lo * R, rows.g_above, feedback)
                moved_below.addcmul_(feedback, gamma_rows[: feedback.shape[0]])
            torch.bmm(store.epsL, store.w_out, out=store.top_feedback)
            top.addcmul_(store.top_feedback, self.gamma_rows[-R:])
        if heavy:
            rows.x.add_(moved)
