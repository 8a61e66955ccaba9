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
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar, cast

import torch
from torch import Tensor

from pcsweep.pc.energy import Activation, Network, log_variance_energy, log_variance_gradient, output_loss
from pcsweep.pc.kernels import Tricks, affine, batch_sum, outer
from pcsweep.pc.members import Member, check_members
from pcsweep.pc.schedule import BatchResult, Inference, train_batch, train_batches
from pcsweep.pc.solvers import Solver, solver_class
from pcsweep.pc.storage import EngineStorage, flat

T = TypeVar("T")

# the storage's tensors and views an engine shows as its own (a solo run's state, as the equations name it)
STORED = frozenset(
    "X A MU FP E EPS G x0 target aL eL epsL gradient x a mu fprime e eps g precisions p_hid p_out s_hid s_out "
    "w_in b_in w_out b_out w_hid b_hid learns_variance sizes".split()
)


class RunZero(Generic[T]):
    """A solo run's setting, as the engine's attribute: read and written on run 0's member (``pc.members.Member``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: PCEngine, owner: Optional[type] = None) -> T:
        return cast(T, getattr(engine.members[0], self.name))

    def __set__(self, engine: PCEngine, value: T) -> None:
        setattr(engine.members[0], self.name, value)


class PCEngine:
    """Inference and learning for R runs of one shape (see the module docstring); a ``schedule.Stepper``.

    ``PCEngine(network, inference, log_variance_min)`` is a solo run; ``PCEngine.of(members)`` a pack. Its numbers
    live in ``store`` (``EngineStorage``), allocated once per batch size and reused; inference moves by ``solver``
    (``pcsweep.pc.solvers``: ``inference.solver``). The per-layer lists ``x, a, mu, fprime, e, eps, g, precisions``
    (indexed by l as in the equations) are views of run 0's rows: a solo run's state, as the equations name it.
    """

    store: EngineStorage
    solver: Solver

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
        self.R, self.L = len(members), net.num_layers
        self.H = self.hidden_layers = self.L - 1
        self.activation: Activation = net.activation
        self.output_loss = net.output_loss
        self.fixed_predictions = members[0].inference.fixed_predictions
        solver = solver_class(members[0].inference.solver)  # one for all (members.check_members)
        self.two_d = self.R == 1 and solver.solo_2d_kernels  # kernels.affine: the 2-d kernels of a solo run
        self.store = EngineStorage(members, tricks)
        self.solver = solver(self)
        # The error front: hidden rows below it still hold their feedforward activities, predictions and exactly
        # zero errors, so nothing recomputes them (recomputing through another kernel could round differently).
        self.front = 0
        self.input_current = False  # a_1 = W_1 x_0 + b_1 is up to date
        self.refresh_parameters()

    def __getattr__(self, name: str) -> Any:
        """The storage's tensors (``STORED``) read as the engine's: ``engine.X``, ``engine.x[l]``."""
        if name in STORED:
            return getattr(self.__dict__["store"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------- a solo run's settings (run 0's)
    @property
    def net(self) -> Network:
        return self.members[0].network

    inference = RunZero[Inference]()
    log_variance_min = RunZero[float]()

    # ----------------------------------------------------------------- parameters
    def bound(self) -> bool:
        """Every run's parameters are still views of this engine's stacks (``EngineStorage.bound``)."""
        return self.store.bound()

    def refresh_parameters(self) -> None:
        """Re-derive what depends on the parameters alone (floors applied); call after every optimizer step."""
        self.store.refresh_parameters()
        self.input_current = False
        self.front = 0  # new parameters: every prediction is stale

    # ----------------------------------------------------------------- the math every solver shares
    def feed_input(self) -> None:
        """a_1 = W_1 x_0 + b_1, only when W_1 or b_1 changed (x_0 is clamped)."""
        if not self.input_current:
            s = self.store
            affine(s.A[0], s.b_in, s.x0, s.w_in_t, self.two_d)
            self.input_current = True

    def _predict(self, lo: int = 0) -> None:
        """a_l, mu_l and f'(a_l) for every layer from the current activities (hidden rows below ``lo`` unchanged)."""
        s = self.store
        rows = s.rows[lo]
        self.feed_input()
        s.products.predict(lo * self.R, rows.x_below, rows.a_above)
        affine(s.aL, s.b_out, s.X[-1], s.w_out_t, self.two_d)
        self.activation.forward(rows.a, rows.mu)
        self.activation.derivative(rows.a, rows.mu, rows.fp)

    def activities_changed(self) -> None:
        """Call after writing ``x`` by hand: the next ``recompute`` recomputes every prediction."""
        self.front = 0

    def errors(self, predict: bool, lo: int = 0) -> None:
        """The predictions (when ``predict``) and errors e = x - mu of the hidden rows from ``lo`` up, then their
        weighted forms and the output's errors."""
        if predict:
            self._predict(lo)
        rows = self.store.rows[lo]
        torch.sub(rows.x, rows.mu, out=rows.e)
        self.weighted_errors(lo)

    def weighted_errors(self, lo: int = 0) -> None:
        """eps = e / S and g = f'(a) eps from the errors (hidden rows from ``lo`` up), and the output's errors."""
        s = self.store
        rows = s.rows[lo]
        if s.precision_rows is not None:
            torch.mul(rows.e, s.precision_rows[lo * self.R :], out=rows.eps)
        torch.mul(rows.fp, rows.eps, out=rows.g)
        if self.output_loss == "mse":
            torch.sub(s.target, s.aL, out=s.eL)
            if s.p_out is not None:
                torch.mul(s.eL, s.p_out, out=s.epsL)
        else:  # cross-entropy: eps_L = onehot - softmax(a_L); e_L keeps the same (no variance)
            torch.softmax(s.aL, dim=-1, out=s.epsL)
            torch.sub(s.target, s.epsL, out=s.epsL)
            s.eL.copy_(s.epsL)

    def hold(self, moving: Sequence[bool]) -> None:
        """Runs that stopped (``moving[r]`` False) keep their state until the next batch starts."""
        self.solver.hold(moving)

    @torch.no_grad()
    def residuals(self) -> Tensor:
        """(R, B) |dE/dx| over every hidden activity of each sample of each run, dE/dx_l = eps_l - g_{l+1} W_{l+1}
        (left in ``store.gradient``): each sample's distance to the equilibrium whatever the solver (zero there; the
        stop compares it with its first value). One batched product."""
        s = self.store
        grad = s.gradient
        if self.front >= self.H:  # the feedforward state: every hidden error is zero, only the top layer's is not
            torch.bmm(s.epsL, s.w_out, out=grad[-1])
            return grad[-1].pow(2).sum(dim=2).sqrt()
        if self.H > 1:
            s.products.feedback_into(0, flat(s.G[1:]), flat(grad[:-1]))
        torch.bmm(s.epsL, s.w_out, out=grad[-1])
        torch.sub(s.EPS, grad, out=grad)
        return grad.pow(2).sum(dim=3).sum(dim=0).sqrt()

    # ----------------------------------------------------------------- measurements, per run (R,)
    def error_energies(self) -> Tensor:
        """(R,) mean error energy per sample of each run, sum_l e_l^2 / (2 S_l), from the current errors (e . eps,
        no temporary at R = 1): what inference lowers, comparable across twins (the log S term is constant in it)."""
        s = self.store
        B = s.X.shape[2]
        if self.two_d:
            hidden = torch.dot(s.E.view(-1), s.EPS.view(-1)).reshape(1)
        else:
            hidden = (s.E * s.EPS).sum(dim=(0, 2, 3))
        if self.output_loss == "ce":
            return 0.5 * hidden / B + self._ce_losses()
        if self.two_d:
            return 0.5 * (hidden + torch.dot(s.eL.view(-1), s.epsL.view(-1))) / B
        return 0.5 * (hidden + (s.eL * s.epsL).sum(dim=(1, 2))) / B

    def _ce_losses(self) -> Tensor:
        s = self.store
        return torch.stack([output_loss(s.aL[r], s.target[r], "ce") for r in range(self.R)])

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
        s = self.store
        B = s.X.shape[2]
        hidden = 0.5 * (s.E * s.EPS).sum(dim=(2, 3)).t() / B  # (R, H)
        if self.output_loss == "ce":
            output = self._ce_losses()
        else:
            output = 0.5 * (s.eL * s.epsL).sum(dim=(1, 2)) / B
        return torch.cat([hidden, output.unsqueeze(1)], dim=1)

    # ----------------------------------------------------------------- learning
    @torch.no_grad()
    def write_gradients(self) -> list[Tensor]:
        """dE/dtheta of each run's batch-mean energy into its parameters' ``.grad`` (views of the gradient stacks).

        Returns run 0's gradients in the order of ``Network.parameters()``."""
        if not self.bound():  # somebody replaced a .grad (zero_grad(set_to_none=True)): bind them again
            self.refresh_parameters()
        s = self.store
        scale = -1.0 / s.X.shape[2]
        # FixedPred pairs each error with the feedforward activity below it, as backprop does
        below = s.MU if self.fixed_predictions else s.X
        outer(s.gw_in, s.G[0], s.x0, scale, self.two_d)
        batch_sum(s.gb_in, s.G[0], scale, self.two_d)
        if s.w_hid is not None:
            gw = flat(s.gw_hid)
            torch.baddbmm(gw, flat(s.G[1:]).transpose(1, 2), flat(below[:-1]), beta=0.0, alpha=scale, out=gw)
            torch.sum(flat(s.G[1:]), dim=1, out=flat(s.gb_hid)).mul_(scale)
        outer(s.gw_out, s.epsL, below[-1], scale, self.two_d)
        batch_sum(s.gb_out, s.epsL, scale, self.two_d)
        if s.s_hid is not None:
            assert s.precision_rows is not None
            gs = flat(s.gs_hid)
            gs.copy_(log_variance_gradient(flat(s.E), s.precision_rows.squeeze(1), gs.shape[-1]))
        if s.s_out is not None:
            assert s.p_out is not None
            if self.two_d:
                s.gs_out[0].copy_(log_variance_gradient(s.eL[0], s.p_out[0, 0], s.gs_out.shape[-1]))
            else:
                s.gs_out.copy_(log_variance_gradient(s.eL, s.p_out.squeeze(1), s.gs_out.shape[-1]))
        return cast(list[Tensor], [p.grad for p in self.net.parameters()])  # bound to the stacks above

    @torch.no_grad()
    def feedforward_init(self, inputs: Tensor, target: Tensor) -> None:
        """x_l <- mu_l for every layer of every run, then clamp x_L to the target (``inputs`` (R, B, n_in) or, for a
        solo run, (B, n_in)). The hidden errors are now exactly zero."""
        if inputs.dim() == 2:
            inputs, target = inputs[None], target[None]
        s = self.store
        if s.allocate(inputs.shape[1], inputs):
            self.solver.allocate()
        self.refresh_parameters()  # cheap; catches parameters moved, cast or reloaded since the last batch
        s.x0.copy_(inputs)
        s.target.copy_(target)
        self.feed_input()
        act = self.activation
        for l in range(self.H):  # sequential: each layer needs the one below
            if l > 0:
                w_hid, b_hid = cast(Tensor, s.w_hid), cast(Tensor, s.b_hid)
                affine(s.A[l], b_hid[l - 1], s.X[l - 1], w_hid[l - 1].transpose(1, 2), self.two_d)
            act.forward(s.A[l], s.MU[l])
            s.X[l].copy_(s.MU[l])
        act.derivative(s.A, s.MU, s.FP)
        affine(s.aL, s.b_out, s.X[-1], s.w_out_t, self.two_d)
        for buffer in (s.E, s.EPS, s.G):  # x_l = mu_l: the hidden errors are zero by construction
            buffer.zero_()
        self.front = self.H  # no hidden row has moved

    # ------------------------------------------- the Stepper protocol (schedule.train_batches)
    # train_batches enters no_grad once per batch; step and recompute enter it only when called outside (a context
    # per step would cost a little on every step)
    def start(self, inputs: Tensor, target: Tensor) -> Tensor:
        self.feedforward_init(inputs, target)
        # the output's error (the hidden ones are exactly zero): the predictions are current from the feedforward pass
        self.errors(predict=False, lo=self.H - 1)
        self.solver.start()
        return self.store.aL.clone()

    def step(self) -> None:
        """One inference step of the solver (``inference.solver``) for every moving run; the errors current after."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.step()
        self.solver.step()

    def recompute(self) -> None:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.recompute()
        self.solver.recompute()

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
