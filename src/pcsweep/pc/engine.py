"""The PC engine: the math of ``pcsweep.pc.energy`` for R >= 1 runs at once, in preallocated layer-stacked buffers.

A solo run is R = 1; a pack (seeds, learning-rate candidates, pc beside rc3, rc2 beside rc23: ``pcsweep.pc.members``)
is R runs of one shape whose every kernel serves all of them. Hidden tensors are (H, R, B, n), layers outermost, so
the rows of any set of layers, for every run, are one contiguous block: an inference step is a fixed handful of
batched kernels (one for all predictions, one for all feedbacks, fused elementwise work) whatever the depth and R.
Each run keeps its own parameters (views of the engine's stacks, so its own optimizer updates them in place), its own
step size, momentum, tolerance and variance floor; a run whose inference stopped is held (``hold``) while the others
go on. ``schedule.train_batches`` is the one loop that drives it.

Nothing here changes the arithmetic beyond float rounding: the engine is tested against the plain functions and
autograd in float64, a pack member against its solo run to 1e-10. The speed machinery (``pcsweep.pc.kernels``) is
switchable (``Tricks``) and measured by ``python -m pcsweep.bench``:

- **views built once** per buffer or parameter change (``pcsweep.pc.storage``);
- **the error front**: after the feedforward init the hidden errors are exactly zero and the front moves down one
  layer per step, so rows below it are not recomputed (also what keeps their errors exactly zero on every CPU);
- **the input cache**: a_1 = W_1 x_0 + b_1 changes only with W_1 and b_1 (x_0 is clamped);
- the CPU kernels of ``pcsweep.pc.kernels`` (transposed copy, thread balance, pre-packed weights).
"""

from __future__ import annotations

import math
from typing import Callable, Generic, Optional, Sequence, TypeVar, cast

import torch
from torch import Tensor

from pcsweep.pc.energy import Network, log_variance_energy, log_variance_gradient, output_loss
from pcsweep.pc.error_solver import ConjugateErrors
from pcsweep.pc.kernels import HiddenProducts, Tricks, affine, batch_sum, outer
from pcsweep.pc.members import Member, check_members
from pcsweep.pc.schedule import BatchResult, Inference, train_batch, train_batches
from pcsweep.pc.storage import EngineStorage, _flat

T = TypeVar("T")


class RunZero(Generic[T]):
    """A solo run's setting, as the engine's attribute: read and written on run 0's member (``pc.members.Member``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: PCEngine, owner: Optional[type] = None) -> T:
        return cast(T, getattr(engine.members[0], self.name))

    def __set__(self, engine: PCEngine, value: T) -> None:
        setattr(engine.members[0], self.name, value)


class PCEngine(EngineStorage):
    """Inference and learning for R runs of one shape (see the module docstring); a ``schedule.Stepper``.

    ``PCEngine(network, inference, log_variance_min)`` is a solo run; ``PCEngine.of(members)`` a pack. Buffers are
    allocated once per batch size and reused. The per-layer lists ``x, a, mu, fprime, e, eps, g, precisions``
    (indexed by l as in the equations) are views of run 0's rows: a solo run's state, as the equations name it.
    """

    def __init__(
        self,
        network: Network,
        inference: Inference = Inference(),
        log_variance_min: float = -math.inf,
        tricks: Tricks = Tricks(),
    ) -> None:
        self._setup([Member(network, inference, log_variance_min)], tricks)

    @classmethod
    def of(cls, members: Sequence[Member], tricks: Tricks = Tricks()) -> PCEngine:
        """An engine of R members computed together (``PackError``, one line, for members that cannot share one)."""
        engine = cls.__new__(cls)
        engine._setup(list(members), tricks)
        return engine

    def _setup(self, members: list[Member], tricks: Tricks) -> None:
        check_members(members)
        self.members, self.tricks = members, tricks
        net = members[0].network
        self.R, self.L, self.sizes = len(members), net.num_layers, net.sizes
        self.H = self.hidden_layers = self.L - 1
        self.activation, self.output_loss = net.activation, net.output_loss
        self.fixed_predictions = members[0].inference.fixed_predictions
        self.solver = members[0].inference.solver  # one for all (members.check_members)
        self._conjugate: Optional[ConjugateErrors] = None  # the error solver's search state
        self.two_d = self.R == 1 and self.solver == "state"  # kernels.affine: a solo state run rounds as it always did
        self._buffers_for: Optional[tuple] = None
        self._bindings: list[tuple[Tensor, Tensor, Tensor]] = []
        self._products: Optional[HiddenProducts] = None
        self._moving: Optional[list[bool]] = None  # None: every run moves, with one step size and momentum
        self.refresh_parameters()

    # ------------------------------------------------------------- a solo run's settings (run 0's)
    @property
    def net(self) -> Network:
        return self.members[0].network

    inference = RunZero[Inference]()
    log_variance_min = RunZero[float]()

    # ----------------------------------------------------------------- the loop
    def _predict(self, lo: int = 0) -> None:
        """a_l, mu_l and f'(a_l) for every layer from the current activities (hidden rows below ``lo`` unchanged)."""
        rows = self._rows[lo]
        if not self._input_current:  # x_0 is clamped: a_1 changes only with W_1, b_1
            affine(self.A[0], self.b_in, self.x0, self._w_in_t, self.two_d)
            self._input_current = True
        assert self._products is not None
        self._products.predict(lo * self.R, rows.x_below, rows.a_above)
        affine(self.aL, self.b_out, self.X[-1], self._w_out_t, self.two_d)
        self.activation.forward(rows.a, rows.mu)
        self.activation.derivative(rows.a, rows.mu, rows.fp)

    def activities_changed(self) -> None:
        """Call after writing ``x`` by hand: the next ``recompute`` recomputes every prediction."""
        self._front = 0

    # ``lo``: the lowest hidden row (x_{lo+1}) the last step moved. After the feedforward init the hidden errors are
    # exactly zero and the error front moves down one layer per step, so for the first L-1 steps of a batch the rows
    # below it hold exact zeros (errors) and unchanged values (activities, predictions): no work is spent on them.
    def _errors(self, predict: bool, lo: int = 0) -> None:
        if predict:
            self._predict(lo)
        rows = self._rows[lo]
        torch.sub(rows.x, rows.mu, out=rows.e)
        self._weighted_errors(lo)

    def _weighted_errors(self, lo: int = 0) -> None:
        """eps = e / S and g = f'(a) eps from the errors (hidden rows from ``lo`` up), and the output's errors."""
        rows = self._rows[lo]
        if self._precision_rows is not None:
            torch.mul(rows.e, self._precision_rows[lo * self.R :], out=rows.eps)
        torch.mul(rows.fp, rows.eps, out=rows.g)
        if self.output_loss == "mse":
            torch.sub(self.target, self.aL, out=self.eL)
            if self.p_out is not None:
                torch.mul(self.eL, self.p_out, out=self.epsL)
        else:  # cross-entropy: eps_L = onehot - softmax(a_L); e_L keeps the same (no variance)
            torch.softmax(self.aL, dim=-1, out=self.epsL)
            torch.sub(self.target, self.epsL, out=self.epsL)
            self.eL.copy_(self.epsL)

    def _step(self, lo: int = 0) -> None:
        """Heavy ball ``v <- beta v - gamma dE/dx; x <- x + v`` (beta = 0: plain descent, x moves itself) on the
        hidden rows from ``lo`` up, every run at once: dE/dx_l = eps_l - g_{l+1} W_{l+1}."""
        rows, products, R = self._rows[lo], cast(HiddenProducts, self._products), self.R
        heavy = rows.v is not None
        moved, moved_below = (rows.v, rows.v_below) if heavy else (rows.x, rows.x_below)
        top = cast(Tensor, self.V)[-1] if heavy else self.X[-1]
        assert moved is not None and moved_below is not None
        if self._moving is None:  # one step size and momentum: scalar kernels
            gamma, beta = self.inference.step_size, self.inference.momentum
            if heavy:
                moved.mul_(beta)
            moved.add_(rows.eps, alpha=-gamma)
            products.feedback(lo * R, rows.g_above, moved_below, gamma)
            if self.two_d:
                top[0].addmm_(self.epsL[0], self.w_out[0], alpha=gamma)
            else:
                top.baddbmm_(self.epsL, self.w_out, alpha=gamma)
        else:  # each run its own (0 for a held run: it does not move)
            gamma_rows, beta_rows = self._gamma_rows[lo * R :], self._beta_rows[lo * R :]
            if heavy:
                moved.mul_(beta_rows)
            moved.addcmul_(rows.eps, gamma_rows, value=-1.0)
            if rows.g_above.shape[0]:
                feedback = self.feedback[: rows.g_above.shape[0]]
                products.feedback_into(lo * R, rows.g_above, feedback)
                moved_below.addcmul_(feedback, gamma_rows[: feedback.shape[0]])
            torch.bmm(self.epsL, self.w_out, out=self.top_feedback)
            top.addcmul_(self.top_feedback, self._gamma_rows[-R:])
        if heavy:
            rows.x.add_(cast(Tensor, rows.v))

    def hold(self, moving: Sequence[bool]) -> None:
        """Runs that stopped (``moving[r]`` False) keep their activities: step size and momentum 0 for them from now
        on, until the next batch starts."""
        self._moving = list(moving)
        like = self.X

        def per_run(values: Sequence[float]) -> Tensor:
            return torch.tensor(list(values), dtype=like.dtype, device=like.device)

        def rows(values: Sequence[float]) -> Tensor:  # one value a run, on every flat hidden row
            return per_run(values).view(1, -1, 1, 1).expand(self.H, -1, 1, 1).reshape(-1, 1, 1)

        self._gamma_rows = rows([m.inference.step_size if go else 0.0 for m, go in zip(self.members, moving)])
        self._beta_rows = rows([m.inference.momentum if go else 0.0 for m, go in zip(self.members, moving)])
        if self._conjugate is not None:
            self._conjugate.hold(per_run(self._moving))

    @torch.no_grad()
    def residuals(self) -> Tensor:
        """(R,) |dE/dx| over every hidden activity and sample of each run, dE/dx_l = eps_l - g_{l+1} W_{l+1}: the
        distance to the equilibrium whatever the solver (zero there; the stop compares it with its feedforward
        value). One batched product."""
        grad, products = self.gradient, cast(HiddenProducts, self._products)
        if self._front >= self.H:  # the feedforward state: every hidden error is zero, only the top layer's is not
            torch.bmm(self.epsL, self.w_out, out=grad[-1])
            return grad[-1].pow(2).sum(dim=(1, 2)).sqrt()
        if self.H > 1:
            products.feedback_into(0, _flat(self.G[1:]), _flat(grad[:-1]))
        torch.bmm(self.epsL, self.w_out, out=grad[-1])
        torch.sub(self.EPS, grad, out=grad)
        return grad.pow(2).sum(dim=(0, 2, 3)).sqrt()

    # ----------------------------------------------------------------- measurements, per run (R,)
    def error_energies(self) -> Tensor:
        """(R,) mean error energy per sample of each run, sum_l e_l^2 / (2 S_l), from the current errors (e . eps,
        no temporary at R = 1): what inference lowers, comparable across twins (the log S term is constant in it)."""
        B = self.X.shape[2]
        if self.two_d:
            hidden = torch.dot(self.E.view(-1), self.EPS.view(-1)).reshape(1)
        else:
            hidden = (self.E * self.EPS).sum(dim=(0, 2, 3))
        if self.output_loss == "ce":
            return 0.5 * hidden / B + self._ce_losses()
        if self.two_d:
            return 0.5 * (hidden + torch.dot(self.eL.view(-1), self.epsL.view(-1))) / B
        return 0.5 * (hidden + (self.eL * self.epsL).sum(dim=(1, 2))) / B

    def _ce_losses(self) -> Tensor:
        return torch.stack([output_loss(self.aL[r], self.target[r], "ce") for r in range(self.R)])

    @torch.no_grad()
    def error_energy(self) -> Tensor:
        """A solo run's mean error energy per sample (0-d, no host sync)."""
        return self.error_energies()[0]

    @torch.no_grad()
    def log_variance_energies(self) -> Tensor:
        """(R,) 0.5 sum log S of each run: the part of E that inference cannot change."""
        return torch.stack([log_variance_energy(m.network) for m in self.members])

    @torch.no_grad()
    def log_variance_energy(self) -> Tensor:
        return self.log_variance_energies()[0]

    @torch.no_grad()
    def energy(self) -> Tensor:
        """A solo run's mean energy per sample at the current errors: error energy plus the log-variance term."""
        return self.error_energy() + self.log_variance_energy()

    @torch.no_grad()
    def layer_error_energies(self) -> Tensor:
        """(R, L) mean error energy per sample of each weight layer's error: where the error sits in the network."""
        B = self.X.shape[2]
        hidden = 0.5 * (self.E * self.EPS).sum(dim=(2, 3)).t() / B  # (R, H)
        if self.output_loss == "ce":
            output = self._ce_losses()
        else:
            output = 0.5 * (self.eL * self.epsL).sum(dim=(1, 2)) / B
        return torch.cat([hidden, output.unsqueeze(1)], dim=1)

    # ----------------------------------------------------------------- learning
    @torch.no_grad()
    def write_gradients(self) -> list[Tensor]:
        """dE/dtheta of each run's batch-mean energy into its parameters' ``.grad`` (views of the gradient stacks).

        Returns run 0's gradients in the order of ``Network.parameters()``."""
        if not self.bound():  # somebody replaced a .grad (zero_grad(set_to_none=True)): bind them again
            self.refresh_parameters()
        scale = -1.0 / self.X.shape[2]
        # FixedPred pairs each error with the feedforward activity below it, as backprop does
        below = self.MU if self.fixed_predictions else self.X
        outer(self.gw_in, self.G[0], self.x0, scale, self.two_d)
        batch_sum(self.gb_in, self.G[0], scale, self.two_d)
        if self.w_hid is not None:
            gw = _flat(self.gw_hid)
            torch.baddbmm(gw, _flat(self.G[1:]).transpose(1, 2), _flat(below[:-1]), beta=0.0, alpha=scale, out=gw)
            torch.sum(_flat(self.G[1:]), dim=1, out=_flat(self.gb_hid)).mul_(scale)
        outer(self.gw_out, self.epsL, below[-1], scale, self.two_d)
        batch_sum(self.gb_out, self.epsL, scale, self.two_d)
        if self.s_hid is not None:
            assert self._precision_rows is not None
            gs = _flat(self.gs_hid)
            gs.copy_(log_variance_gradient(_flat(self.E), self._precision_rows.squeeze(1), gs.shape[-1]))
        if self.s_out is not None:
            assert self.p_out is not None
            if self.two_d:
                self.gs_out[0].copy_(log_variance_gradient(self.eL[0], self.p_out[0, 0], self.gs_out.shape[-1]))
            else:
                self.gs_out.copy_(log_variance_gradient(self.eL, self.p_out.squeeze(1), self.gs_out.shape[-1]))
        return cast(list[Tensor], [p.grad for p in self.net.parameters()])  # bound to the stacks above

    @torch.no_grad()
    def feedforward_init(self, inputs: Tensor, target: Tensor) -> None:
        """x_l <- mu_l for every layer of every run, then clamp x_L to the target (``inputs`` (R, B, n_in) or, for a
        solo run, (B, n_in)). The hidden errors are now exactly zero."""
        if inputs.dim() == 2:
            inputs, target = inputs[None], target[None]
        self._allocate(inputs.shape[1], inputs)
        self.refresh_parameters()  # cheap; catches parameters moved, cast or reloaded since the last batch
        self.x0.copy_(inputs)
        self.target.copy_(target)
        affine(self.A[0], self.b_in, self.x0, self._w_in_t, self.two_d)
        self._input_current = True
        act = self.activation
        for l in range(self.H):  # sequential: each layer needs the one below
            if l > 0:
                w_hid, b_hid = cast(Tensor, self.w_hid), cast(Tensor, self.b_hid)
                affine(self.A[l], b_hid[l - 1], self.X[l - 1], w_hid[l - 1].transpose(1, 2), self.two_d)
            act.forward(self.A[l], self.MU[l])
            self.X[l].copy_(self.MU[l])
        act.derivative(self.A, self.MU, self.FP)
        affine(self.aL, self.b_out, self.X[-1], self._w_out_t, self.two_d)
        for buffer in (self.E, self.EPS, self.G):  # x_l = mu_l: the hidden errors are zero by construction
            buffer.zero_()
        if self.V is not None:
            self.V.zero_()  # inference starts at rest
        self._front = self.H  # no hidden row has moved
        self._moving = None  # every run moves again

    # ------------------------------------------- the Stepper protocol (schedule.train_batches)
    # train_batches enters no_grad once per batch; step and recompute enter it only when called outside (a context
    # per step would cost a little on every step)
    def start(self, inputs: Tensor, target: Tensor) -> Tensor:
        self.feedforward_init(inputs, target)
        if len({(m.inference.step_size, m.inference.momentum) for m in self.members}) > 1:
            self.hold([True] * self.R)  # every run moves, each with its own step size and momentum
        # the output's error (the hidden ones are exactly zero): the predictions are current from the feedforward pass
        self._errors(predict=False, lo=self.H - 1)
        if self._conjugate is not None:
            self._conjugate.start()
        return self.aL.clone()

    def step(self) -> None:
        """One inference step: a Jacobi step of descent on all hidden activities at once (``state``; moves the error
        front down a row), or one conjugate-gradient step on the errors (``error``)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.step()
        if self._conjugate is not None:
            self._front = 0  # every error moves at once: no front
            return self._conjugate.step()
        self._front = max(self._front - 1, 0) if self.tricks.error_front else 0
        self._step(self._front)
        self.recompute()

    def recompute(self) -> None:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.recompute()
        if self._conjugate is not None:
            return self._conjugate.recompute()
        self._errors(not self.fixed_predictions, lo=min(self._front, self.H - 1))

    def parameters_changed(self) -> None:
        self.refresh_parameters()

    def train_batch(
        self, inputs: Tensor, target: Tensor, apply_update: Callable[[], None], trace_energy: bool = False
    ) -> BatchResult:
        """A solo run's batch: ``schedule.train_batch`` with this engine and its inference settings."""
        return train_batch(self, self.inference, inputs, target, apply_update, trace_energy)

    def train_batches(
        self,
        inputs: Tensor,
        target: Tensor,
        apply_updates: Sequence[Callable[[], None]],
        trace_energy: bool = False,
    ) -> list[BatchResult]:
        """Every run's batch at once: ``inputs`` (R, B, n_in), ``apply_updates[r]`` steps run r's optimizer."""
        inferences = [m.inference for m in self.members]
        return train_batches(self, inferences, inputs, target, apply_updates, trace_energy)
