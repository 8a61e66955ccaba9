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

- **views built once** per buffer or parameter change (a view costs as much as a whole kernel at width 256);
- **the error front**: after the feedforward init the hidden errors are exactly zero and the front moves down one
  layer per step, so rows below it are not recomputed (also what keeps their errors exactly zero on every CPU);
- **the input cache**: a_1 = W_1 x_0 + b_1 changes only with W_1 and b_1 (x_0 is clamped);
- the CPU kernels of ``pcsweep.pc.kernels`` (transposed copy, thread balance, pre-packed weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, cast

import torch
from torch import Tensor

from pcsweep.pc.energy import Network, log_variance_energy, log_variance_gradient, output_loss
from pcsweep.pc.error_solver import ConjugateErrors
from pcsweep.pc.kernels import HiddenProducts, Tricks, affine, batch_sum, outer
from pcsweep.pc.members import Member, check_members
from pcsweep.pc.schedule import BatchResult, Inference, train_batch, train_batches


def _flat(t: Tensor) -> Tensor:
    """(layers, R, ...) as (layers * R, ...): one batched kernel over every layer of every run."""
    return t.flatten(0, 1)


@dataclass
class _Rows:
    """Flat views of the hidden buffers from layer row ``lo`` up (``below``: rows lo..H-2, ``above``: lo+1..H-1),
    built once per buffer change: a step would otherwise make ~25 views, each as dear as an elementwise kernel."""

    x: Tensor
    a: Tensor
    mu: Tensor
    fp: Tensor
    e: Tensor
    eps: Tensor
    g: Tensor
    x_below: Tensor
    a_above: Tensor
    g_above: Tensor
    v: Optional[Tensor]  # velocity (heavy-ball inference only)
    v_below: Optional[Tensor]


class PCEngine:
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

    @property
    def inference(self) -> Inference:
        return self.members[0].inference

    @inference.setter
    def inference(self, value: Inference) -> None:
        self.members[0].inference = value

    @property
    def log_variance_min(self) -> float:
        return self.members[0].log_variance_min

    @log_variance_min.setter
    def log_variance_min(self, value: float) -> None:
        self.members[0].log_variance_min = value

    # ----------------------------------------------------------------- parameters
    def _stack(self, pick: Callable[[Network], Sequence[Optional[Tensor]]], layer_major: bool) -> tuple[Tensor, Tensor]:
        """One tensor holding ``pick(network)`` of every run ((layers, R, ...) when ``layer_major``, else (R, ...)),
        every run's parameters bound to views of it, and its gradient stack bound to their ``.grad``. A run with None
        there (it learns no variance, beside one that does) holds zeros bound to nothing: a frozen log S = 0, which
        changes none of its numbers (exp(0) = 1 exactly)."""
        per_run = [list(pick(m.network)) for m in self.members]
        layers = len(per_run[0])
        like = [next(t for t in (p[i] for p in per_run) if t is not None) for i in range(layers)]
        values = [[torch.zeros_like(like[i]) if t is None else t.detach() for i, t in enumerate(p)] for p in per_run]
        if layer_major:
            stack = torch.stack([torch.stack([v[i] for v in values]) for i in range(layers)])
        else:
            stack = torch.stack([v[0] for v in values])
        grads = torch.zeros_like(stack)
        for r, params in enumerate(per_run):
            for i, p in enumerate(params):
                if p is not None:
                    p.data = stack[i, r] if layer_major else stack[r]
                    p.grad = grads[i, r] if layer_major else grads[r]
                    self._bindings.append((p, p.data, p.grad))
        return stack, grads

    def bound(self) -> bool:
        """Every run's parameters and gradients are still views of this engine's stacks: nothing (a device move, a
        dtype cast, another engine over the same network) has given them storage of their own since."""
        return bool(self._bindings) and all(
            p.data_ptr() == view.data_ptr()
            and p.dtype == view.dtype
            and p.grad is not None
            and p.grad.data_ptr() == grad.data_ptr()
            for p, view, grad in self._bindings
        )

    def _stack_parameters(self) -> None:
        self._bindings = []
        L, H = self.L, self.H
        self.w_in, self.gw_in = self._stack(lambda n: n.weights[:1], False)  # (R, n, n_in)
        self.b_in, self.gb_in = self._stack(lambda n: n.biases[:1], False)  # (R, n)
        self.w_out, self.gw_out = self._stack(lambda n: n.weights[L - 1 :], False)  # (R, n_out, n)
        self.b_out, self.gb_out = self._stack(lambda n: n.biases[L - 1 :], False)  # (R, n_out)
        self.w_hid: Optional[Tensor] = None  # (H-1, R, n, n)
        self.b_hid: Optional[Tensor] = None  # (H-1, R, n)
        if L > 2:
            self.w_hid, self.gw_hid = self._stack(lambda n: n.weights[1 : L - 1], True)
            self.b_hid, self.gb_hid = self._stack(lambda n: n.biases[1 : L - 1], True)
        learns = [[s is not None for s in m.network.log_variances] for m in self.members]
        self.learns_variance = [any(row) for row in learns]
        self.s_hid: Optional[Tensor] = None  # (H, R, n or 1): hidden log-variances, where any run learns them
        self.s_out: Optional[Tensor] = None  # (R, n_out or 1)
        if any(row[0] for row in learns):
            self.s_hid, self.gs_hid = self._stack(lambda n: n.log_variances[:H], True)
        if any(row[L - 1] for row in learns):
            self.s_out, self.gs_out = self._stack(lambda n: n.log_variances[L - 1 :], False)
        self._products = HiddenProducts(self.w_hid, self.b_hid, self.tricks, self._hidden_versions)
        # exp(-log S), updated in place after every update (the loop's views of it stay valid)
        self.p_hid: Optional[Tensor] = None if self.s_hid is None else torch.empty_like(self.s_hid).unsqueeze(2)
        self.p_out: Optional[Tensor] = None if self.s_out is None else torch.empty_like(self.s_out).unsqueeze(1)
        hidden = [None if self.p_hid is None else self.p_hid[l, 0, 0] for l in range(H)]
        self.precisions: list[Optional[Tensor]] = hidden + [None if self.p_out is None else self.p_out[0, 0]]
        self._views_stale = True

    def _hidden_versions(self) -> tuple:
        """The hidden weights' state: the stack's storage and every in-place change to it or to a run's weight."""
        stack = cast(Tensor, self.w_hid)
        weights = (w for m in self.members for w in m.network.weights[1:-1])
        return (stack.data_ptr(), stack._version) + tuple(w._version for w in weights)

    def _floor(self, stack: Tensor, run_dim: int) -> None:
        """Each run's floor on log S, in place (none on a frozen log S = 0: a run that learns no variance)."""
        floors = [m.log_variance_min if learns else -math.inf for m, learns in zip(self.members, self.learns_variance)]
        if not any(math.isfinite(f) for f in floors):
            return
        if self.R == 1:
            stack.clamp_(min=floors[0])
            return
        shape = [1] * stack.dim()
        shape[run_dim] = self.R
        torch.maximum(stack, torch.tensor(floors, dtype=stack.dtype, device=stack.device).view(shape), out=stack)

    def refresh_parameters(self) -> None:
        """Re-derive what depends on the parameters alone (floors applied); call after every optimizer step."""
        if not self.bound():
            self._stack_parameters()
        with torch.no_grad():
            if self.s_hid is not None:
                self._floor(self.s_hid, 1)
                torch.exp(-self.s_hid, out=cast(Tensor, self.p_hid).squeeze(2))
            if self.s_out is not None:
                self._floor(self.s_out, 0)
                torch.exp(-self.s_out, out=cast(Tensor, self.p_out).squeeze(1))
        assert self._products is not None  # made with the stacks
        self._products.refresh(None if self._buffers_for is None else self._buffers_for[0])
        if self._views_stale and self._buffers_for is not None:
            self._build_views()
        self._input_current = False  # a_1 = W_1 x_0 + b_1 must be recomputed
        # The error front: hidden rows below it still hold their feedforward activities, predictions and exactly
        # zero errors, so nothing recomputes them (recomputing through another kernel could round differently).
        self._front = 0  # new parameters: every prediction is stale

    # ----------------------------------------------------------------- buffers
    def _allocate(self, batch: int, like: Tensor) -> None:
        key = (batch, like.dtype, like.device)
        if self._buffers_for == key:
            return
        H, R, n, n_out = self.H, self.R, self.sizes[1], self.sizes[-1]

        def new(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=like.dtype, device=like.device)

        self.X, self.A, self.MU, self.FP, self.E, self.G = (new(H, R, batch, n) for _ in range(6))
        heavy_ball = self.solver == "state" and any(m.inference.momentum for m in self.members)
        self.V = new(H, R, batch, n) if heavy_ball else None  # activity velocity
        self.EPS = new(H, R, batch, n) if self.s_hid is not None else self.E
        self.x0, self.target = new(R, batch, self.sizes[0]), new(R, batch, n_out)
        self.aL, self.eL = new(R, batch, n_out), new(R, batch, n_out)
        separate = self.s_out is not None or self.output_loss == "ce"
        self.epsL = new(R, batch, n_out) if separate else self.eL
        self.feedback = new(max(H - 1, 1) * R, batch, n)  # g_{l+1} W_{l+1} when runs take different steps
        self.top_feedback = new(R, batch, n)
        self.gradient = new(H, R, batch, n)  # dE/dx, for the residual
        self._buffers_for = key
        self._conjugate = ConjugateErrors(self) if self.solver == "error" else None
        self._views_stale = True  # built by the refresh_parameters that follows

    def _build_views(self) -> None:
        """Views of the buffers and parameters the loop's kernels take, and run 0's per-layer lists."""
        H, X, V = self.H, self.X, self.V
        self._rows = [
            _Rows(
                _flat(X[lo:]),
                _flat(self.A[lo:]),
                _flat(self.MU[lo:]),
                _flat(self.FP[lo:]),
                _flat(self.E[lo:]),
                _flat(self.EPS[lo:]),
                _flat(self.G[lo:]),
                _flat(X[lo:-1]),
                _flat(self.A[lo + 1 :]),
                _flat(self.G[lo + 1 :]),
                None if V is None else _flat(V[lo:]),
                None if V is None else _flat(V[lo:-1]),
            )
            for lo in range(H)
        ]
        self._precision_rows = None if self.p_hid is None else _flat(self.p_hid)
        self._w_in_t, self._w_out_t = self.w_in.transpose(1, 2), self.w_out.transpose(1, 2)
        self._views_stale = False

        def run0(stack: Tensor) -> list:
            return [None] + [stack[l, 0] for l in range(H)]

        self.x = [self.x0[0]] + [X[l, 0] for l in range(H)] + [self.target[0]]
        self.a = run0(self.A) + [self.aL[0]]
        self.mu = run0(self.MU) + [None]  # the output is linear: mu_L is a_L
        self.fprime = run0(self.FP) + [None]
        self.e = run0(self.E) + [self.eL[0]]
        self.eps = run0(self.EPS) + [self.epsL[0]]
        self.g = run0(self.G) + [self.epsL[0]]

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
