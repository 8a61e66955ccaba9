"""Predictive coding on an MLP, written from the energy (pure torch: no Lightning, no Hydra, no autograd).

Notation (see ``shared/paper.md``): weight layers ``l = 1..L``, activities ``x_0`` (clamped to the input) ..
``x_L`` (clamped to the target while training), pre-activations ``a_l = x_{l-1} W_l^T + b_l``, predictions
``mu_l = f_l(a_l)`` (the output layer is linear), errors ``e_l = x_l - mu_l`` and variances ``S_l`` (stored as
``log S_l``; fixed at 1 when ``log_variances[l]`` is ``None``). Per sample the energy is::

    E = sum_l sum_i [ e_{l,i}^2 / (2 S_{l,i}) + 0.5 log S_{l,i} ]

(with ``output_loss="ce"`` the output term is the cross-entropy of ``softmax(mu_L)`` instead, and ``e_L`` is its
negative gradient). Everything below uses the precision-weighted error ``eps_l = e_l / S_l = -dE/dmu_l`` and
``g_l = f'(a_l) * eps_l = -dE/da_l``, so that

- activities descend ``dE/dx_l = eps_l - g_{l+1} W_{l+1}`` (summed energy: each sample moves on its own),
- weights descend ``dE/dW_l = -g_l^T x_{l-1} / B`` (energy averaged over the batch, like the BP loss),
- log-variances descend ``dE/dlog S_l = mean_batch 0.5 (1 - e_l^2 / S_l)``.

The engine keeps every tensor of the loop preallocated and works in place; ``pcsweep.reference`` holds the same
energy written for autograd, and the tests check one against the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

OUTPUT_LOSSES = ("mse", "ce")
# CPU layers up to this width predict from a transposed weight copy (_refresh_transposed_weights); wider ones batch
# their products in multiples of the thread count (_build_param_views). Both rules measured with pcsweep.bench.
NARROW_MAX_WIDTH = 512


@dataclass(frozen=True)
class Activation:
    """A hidden nonlinearity and its derivative, both writing into ``out`` (the loop allocates nothing).

    The derivative takes ``a`` and ``f(a)`` because tanh and sigmoid are cheapest from ``f(a)``.
    """

    name: str
    fn: Callable[[Tensor], Tensor]  # differentiable, for the MLP's forward pass and autograd
    forward: Callable[[Tensor, Tensor], Tensor]  # (a, out) -> out
    derivative: Callable[[Tensor, Tensor, Tensor], Tensor]  # (a, fa, out) -> out


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(
        "tanh",
        torch.tanh,
        lambda a, out: torch.tanh(a, out=out),
        lambda a, fa, out: torch.addcmul(out.fill_(1.0), fa, fa, value=-1.0, out=out),
    ),
    "sigmoid": Activation(
        "sigmoid",
        torch.sigmoid,
        lambda a, out: torch.sigmoid(a, out=out),
        lambda a, fa, out: torch.addcmul(fa, fa, fa, value=-1.0, out=out),
    ),
    "relu": Activation(
        "relu",
        torch.relu,
        lambda a, out: torch.clamp_min(a, 0.0, out=out),
        lambda a, fa, out: out.copy_(a > 0),
    ),
    "linear": Activation("linear", lambda a: a, lambda a, out: out.copy_(a), lambda a, fa, out: out.fill_(1.0)),
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


@dataclass
class Network:
    """The parameters PC needs, by reference: ``weights[l]`` has shape (n_{l+1}, n_l) as in ``nn.Linear``.

    ``log_variances[l]`` is ``None`` (S = 1, condition 3 enforced) or a tensor broadcastable to (n_{l+1},): one value
    per neuron, or a single value per layer.
    """

    weights: Sequence[Tensor]
    biases: Sequence[Tensor]
    log_variances: Sequence[Optional[Tensor]]
    activation: Activation
    output_loss: str = "mse"

    def __post_init__(self) -> None:
        if self.output_loss not in OUTPUT_LOSSES:
            raise ValueError(f"unknown output loss {self.output_loss!r}; choose one of {OUTPUT_LOSSES}")
        if not (len(self.weights) == len(self.biases) == len(self.log_variances)):
            raise ValueError("weights, biases and log_variances need one entry per layer")
        if self.output_loss == "ce" and self.log_variances[-1] is not None:
            raise ValueError("the cross-entropy output has no variance: pass None for the last layer")

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    @property
    def sizes(self) -> list[int]:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]

    def parameters(self) -> list[Tensor]:
        params = list(self.weights) + list(self.biases)
        return params + [s for s in self.log_variances if s is not None]


def output_loss(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """The loss both twins train on, averaged over the batch: Gaussian (0.5 * squared error summed over the
    outputs) or cross-entropy, to a one-hot ``target``."""
    if kind == "mse":
        return 0.5 * (target - logits).pow(2).sum(dim=1).mean()
    if kind == "ce":
        return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    raise ValueError(f"unknown output loss {kind!r}; choose one of {OUTPUT_LOSSES}")


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


@dataclass
class _Rows:
    """Views of the hidden stacks from row ``lo`` up (``below``: rows lo..H-2, ``above``: lo+1..H-1), built once
    per buffer or parameter change: a view costs a few microseconds, as much as a whole elementwise kernel at
    width 256, and a step would otherwise make ~25 of them."""

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
    v: Optional[Tensor] = None  # velocity of rows lo.. (heavy-ball inference only)
    v_below: Optional[Tensor] = None


@dataclass
class _ParamRows:
    """The hidden parameters from row ``lo`` up, in the shapes the loop's kernels take (None without a stack)."""

    w: Optional[Tensor]  # (rows, n, n): feedback x_below += g_above @ w
    w_t: Optional[Tensor]  # its transpose: prediction a_above = b + x_below @ w_t
    b: Optional[Tensor]  # (rows, 1, n)
    precision: Optional[Tensor]  # (rows, 1, n or 1), with trainable variances
    balanced: int = 0  # batch the first this many rows only (a multiple of the CPU threads); 0: batch them all


def _reuse(buffer: Optional[Tensor], like: Tensor) -> Tensor:
    """``buffer`` if it can hold a tensor like ``like`` (shape, dtype, device), else a new empty one."""
    if buffer is not None and buffer.shape == like.shape and buffer.dtype == like.dtype and buffer.device == like.device:
        return buffer
    return torch.empty_like(like)


def _bind(params: Sequence[Tensor], stack: Optional[Tensor]) -> Tensor:
    """Make the parameters views of one stacked tensor (values kept), so that a layer-batched product reads them in
    place and the optimizer's in-place updates land in the stack. Re-binds whenever something (a device move, a
    dtype cast) gave a parameter storage of its own."""
    if stack is not None and stack.shape[0] == len(params) and all(
        p.device == stack.device and p.dtype == stack.dtype and p.data_ptr() == stack[i].data_ptr()
        for i, p in enumerate(params)
    ):
        return stack
    stack = torch.stack([p.detach() for p in params])
    for i, p in enumerate(params):
        p.data = stack[i]
    return stack


class PCEngine:
    """Runs inference and learning for one network; buffers are allocated once per batch size and reused.

    ``update_every=None`` is condition 2 enforced (one weight update after ``steps`` inference steps); an integer k
    updates the weights every k steps from the current activities (relaxed). ``fixed_predictions`` holds every
    prediction at its feedforward value (Rosenbaum's FixedPred), which with ``step_size=1`` and ``>= L`` steps turns
    the weight updates into BP's gradients exactly. ``tolerance`` (off by default: the paper's condition 2 is a fixed
    T) ends inference early once the energy stops changing. ``momentum`` (beta) turns the activity descent into the
    heavy ball, ``v <- beta v - step_size dE/dx; x <- x + v``: the same fixed points, reached in far fewer steps on
    the ill-conditioned energy of a deep network (stable while ``step_size * lambda_max < 2 (1 + beta)``).

    Speed: the hidden activities of all layers live in one (L-1, B, width) tensor and the equal-shape hidden weight
    matrices W_2 .. W_{L-1} are views of one (L-2, width, width) stack, so each inference step is a fixed handful of
    batched kernels (one ``baddbmm`` for all predictions, one for all feedbacks, fused elementwise work over all
    layers) whatever the depth. The per-layer lists ``x, a, mu, fprime, e, eps, g`` are views into those stacks.
    Until the first weight update of a batch only the layers above the error front are computed (the rest are
    exact zeros or unchanged). On a CPU, narrow layers predict from a transposed copy of the stack and wide ones
    batch their products in multiples of the thread count (``NARROW_MAX_WIDTH``); neither changes the arithmetic
    beyond float rounding.
    """

    def __init__(
        self,
        network: Network,
        steps: int = 256,
        step_size: float = 0.1,
        update_every: Optional[int] = None,
        log_variance_min: float = -math.inf,
        fixed_predictions: bool = False,
        tolerance: Optional[float] = None,
        check_every: int = 8,
        momentum: float = 0.0,
    ) -> None:
        if steps < 1:
            raise ValueError(f"inference steps must be >= 1, got {steps}")
        if update_every is not None and not 1 <= update_every <= steps:
            raise ValueError(f"update_every must be in [1, steps={steps}], got {update_every}")
        if step_size <= 0:
            raise ValueError(f"inference step size must be > 0, got {step_size}")
        if not 0 <= momentum < 1:
            raise ValueError(f"inference momentum must be in [0, 1), got {momentum}")
        hidden_sizes = set(network.sizes[1:-1])
        if len(hidden_sizes) != 1:
            raise ValueError(f"the hidden layers must share one width, got sizes {network.sizes}")
        hidden_vars = [v is None for v in network.log_variances[:-1]]
        if any(hidden_vars) and not all(hidden_vars):
            raise ValueError("hidden layers need a log-variance each, or none at all")
        self.net = network
        self.steps = steps
        self.step_size = step_size
        self.momentum = momentum
        self.V: Optional[Tensor] = None
        self.update_every = update_every
        self.log_variance_min = log_variance_min
        self.fixed_predictions = fixed_predictions
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"inference tolerance must be > 0 or None, got {tolerance}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.tolerance, self.check_every = tolerance, check_every
        self._buffers_for: Optional[tuple] = None
        self._w_stack: Optional[Tensor] = None
        self._b_stack: Optional[Tensor] = None
        self._s_stack: Optional[Tensor] = None
        self._precision_base: Optional[Tensor] = None  # exp(-log S) of the hidden layers, updated in place
        self._w_t_stack: Optional[Tensor] = None  # a contiguous copy of the stack's transpose (narrow CPU layers)
        self._w_t_version: Optional[tuple] = None  # the weights it was copied from
        self._param_views_of: Optional[tuple] = None  # the storages the loop's parameter views were made from
        self.refresh_parameters()

    # ----------------------------------------------------------------- parameters
    @property
    def _hidden_variances(self) -> bool:
        return self.net.log_variances[0] is not None

    def refresh_parameters(self) -> None:
        """Re-derive what depends on the parameters alone; call after every optimizer step."""
        L = self.net.num_layers
        with torch.no_grad():
            if L > 2:
                self._w_stack = _bind(self.net.weights[1 : L - 1], self._w_stack)
                self._b_stack = _bind(self.net.biases[1 : L - 1], self._b_stack)
                self._refresh_transposed_weights()
            if self._hidden_variances:
                self._s_stack = _bind(self.net.log_variances[: L - 1], self._s_stack)
                if self.log_variance_min > -math.inf:
                    self._s_stack.clamp_(min=self.log_variance_min)
                base = _reuse(self._precision_base, self._s_stack)
                if base is not self._precision_base:
                    self._precision_base, self._hidden_precision = base, base.unsqueeze(1)  # (L-1, 1, n or 1)
                torch.exp(-self._s_stack, out=base)
            out_var = self.net.log_variances[L - 1]
            if out_var is not None and self.log_variance_min > -math.inf:
                out_var.clamp_(min=self.log_variance_min)
            self._output_precision = None if out_var is None else torch.exp(-out_var)
        W = self.net.weights
        views_of = tuple(t.data_ptr() for t in (W[0], W[-1], self._w_stack, self._w_t_stack, self._b_stack,
                                                self._precision_base) if t is not None)
        if views_of != self._param_views_of:  # once, and again after anything moved the parameters
            self._param_views_of = views_of
            self._build_param_views()
        self.precisions: list[Optional[Tensor]] = self._hidden_precisions + [self._output_precision]
        self._input_current = False  # a_1 = W_1 x_0 + b_1 must be recomputed
        # The error front: hidden rows below it still hold their feedforward activities, predictions and exactly
        # zero errors, so nothing recomputes them (recomputing through another kernel could round differently).
        self._front = 0  # new parameters: every prediction is stale

    def _refresh_transposed_weights(self) -> None:
        """On a CPU, narrow layers predict faster from a contiguous copy of the stack's transpose (x @ W^T reads W
        against its layout: 250 vs 185 us a step at width 256); the copy is redone only when the weights changed.
        Wide layers go without: the product's layouts cost the same there and the copy is slow (28 ms at 1024)."""
        stack = self._w_stack
        if stack.device.type != "cpu" or stack.shape[-1] > NARROW_MAX_WIDTH:
            self._w_t_stack = None
            return
        version = (stack.data_ptr(), stack._version) + tuple(w._version for w in self.net.weights[1:-1])
        reused = _reuse(self._w_t_stack, stack)
        if reused is not self._w_t_stack:
            self._w_t_stack, self._w_t_version = reused, None
        if version != self._w_t_version:
            self._w_t_stack.copy_(stack.transpose(1, 2))
            self._w_t_version = version

    def _build_param_views(self) -> None:
        W, L, stack = self.net.weights, self.net.num_layers, self._w_stack
        self._w_in_t, self._w_out, self._w_out_t = W[0].t(), W[-1], W[-1].t()
        self._hidden_precisions = [
            self._hidden_precision[l, 0] if self._hidden_variances else None for l in range(L - 1)
        ]
        self._param_rows = [
            _ParamRows(
                w=None if stack is None else stack[lo:],
                w_t=None if stack is None else (
                    stack[lo:].transpose(1, 2) if self._w_t_stack is None else self._w_t_stack[lo:]),
                b=None if stack is None else self._b_stack[lo:].unsqueeze(1),
                precision=self._hidden_precision[lo:] if self._hidden_variances else None,
            )
            for lo in range(L - 1)
        ]
        # A batched product hands whole matrices to the CPU threads: 7 on 2 threads leave one idle for a seventh
        # of the time (12% per matrix, measured at width 1024). Wide layers batch a multiple of the thread count
        # and split the rest; narrow ones keep one kernel (a call costs more than the imbalance there).
        self._threads = torch.get_num_threads()
        rows = 0 if stack is None else stack.shape[0]
        if (stack is not None and stack.device.type == "cpu" and stack.shape[-1] > NARROW_MAX_WIDTH
                and self._threads > 1 and rows % self._threads and stack.shape[1] % self._threads == 0):
            self._param_rows[0].balanced = rows - rows % self._threads

    # ----------------------------------------------------------------- buffers
    def _allocate(self, batch: int, like: Tensor) -> None:
        key = (batch, like.dtype, like.device)
        if self._buffers_for == key:
            return
        sizes, L = self.net.sizes, self.net.num_layers
        H, width, n_out = L - 1, sizes[1], sizes[-1]

        def new(*shape: int) -> Tensor:
            return torch.empty(*shape, dtype=like.dtype, device=like.device)

        self.X, self.A, self.MU, self.FP, self.E, self.G = (new(H, batch, width) for _ in range(6))
        self.V = new(H, batch, width) if self.momentum else None  # activity velocity (heavy ball)
        self.EPS = new(H, batch, width) if self._hidden_variances else self.E
        self.x0, self.target = new(batch, sizes[0]), new(batch, n_out)
        self.aL, self.eL = new(batch, n_out), new(batch, n_out)
        separate = self._output_precision is not None or self.net.output_loss == "ce"
        self.epsL = new(batch, n_out) if separate else self.eL
        # per-layer views, indexed by l = 0..L as in the equations
        hidden = lambda stack: [None] + [stack[l] for l in range(H)]
        self.x = [self.x0] + [self.X[l] for l in range(H)] + [self.target]
        self.a = hidden(self.A) + [self.aL]
        self.mu = hidden(self.MU) + [None]  # the output is linear: mu_L is a_L
        self.fprime = hidden(self.FP) + [None]
        self.e = hidden(self.E) + [self.eL]
        self.eps = hidden(self.EPS) + [self.epsL]
        self.g = hidden(self.G) + [self.epsL]
        self.x_top = self.X[H - 1]
        self._rows = [
            _Rows(self.X[lo:], self.A[lo:], self.MU[lo:], self.FP[lo:], self.E[lo:], self.EPS[lo:], self.G[lo:],
                  self.X[lo:-1], self.A[lo + 1 :], self.G[lo + 1 :],
                  None if self.V is None else self.V[lo:], None if self.V is None else self.V[lo:-1])
            for lo in range(H)
        ]
        self._buffers_for = key

    # ----------------------------------------------------------------- the loop
    def _predict(self, lo: int = 0) -> None:
        """a_l, mu_l and f'(a_l) for every layer from the current activities (hidden rows below ``lo`` unchanged)."""
        b = self.net.biases
        rows, params = self._rows[lo], self._param_rows[lo]
        if not self._input_current:  # x_0 is clamped: a_1 changes only with W_1, b_1
            torch.addmm(b[0], self.x0, self._w_in_t, out=self.A[0])
            self._input_current = True
        if params.w is not None and rows.x_below.shape[0]:
            if not params.balanced:
                torch.baddbmm(params.b, rows.x_below, params.w_t, out=rows.a_above)
            else:
                n = params.balanced
                torch.baddbmm(params.b[:n], rows.x_below[:n], params.w_t[:n], out=rows.a_above[:n])
                for j in range(n, rows.x_below.shape[0]):  # the rest, each split into one row block of W per thread
                    self._predict_in_blocks(rows.x_below[j], params.w[j], params.b[j, 0], rows.a_above[j])
        torch.addmm(b[-1], self.x_top, self._w_out_t, out=self.aL)
        act = self.net.activation
        act.forward(rows.a, rows.mu)
        act.derivative(rows.a, rows.mu, rows.fp)

    def _predict_in_blocks(self, x: Tensor, w: Tensor, b: Tensor, out: Tensor) -> None:
        """out = b + x @ w^T as one batched product over ``threads`` row blocks of w, so each thread gets one."""
        blocks, (batch, n) = self._threads, out.shape
        part = torch.baddbmm(b.view(blocks, 1, n // blocks), x.expand(blocks, *x.shape),
                             w.view(blocks, n // blocks, w.shape[1]).transpose(1, 2))
        out.view(batch, blocks, n // blocks).copy_(part.transpose(0, 1))

    @torch.no_grad()
    def compute_errors(self, predict: bool = True) -> None:
        """e_l, eps_l and g_l at the current activities (and predictions, unless FixedPred), for every row at or
        above the error front; the rows below it are exactly at their feedforward values and keep e = 0."""
        self._errors(predict, lo=min(self._front, self.X.shape[0] - 1))

    @torch.no_grad()
    def inference_step(self) -> None:
        """One Jacobi step of gradient descent on all hidden activities at once (errors must be current); moves the
        error front down one row."""
        self._front = max(self._front - 1, 0)
        self._step(self._front)

    def activities_changed(self) -> None:
        """Call after writing ``x`` by hand: the next ``compute_errors`` recomputes every prediction."""
        self._front = 0

    # the loop's bodies, undecorated: train_batch enters no_grad once instead of twice per step (~5% at width 256)
    # ``lo``: the lowest hidden row (x_{lo+1}) the last step moved. After the feedforward init the hidden errors are
    # exactly zero and the error front moves down one layer per step, so for the first L-1 steps of a batch the rows
    # below it hold exact zeros (errors) and unchanged values (activities, predictions): no work is spent on them.
    def _errors(self, predict: bool, lo: int = 0) -> None:
        if predict:
            self._predict(lo)
        rows = self._rows[lo]
        torch.sub(rows.x, rows.mu, out=rows.e)
        if self._hidden_variances:
            torch.mul(rows.e, self._param_rows[lo].precision, out=rows.eps)
        torch.mul(rows.fp, rows.eps, out=rows.g)
        if self.net.output_loss == "mse":
            torch.sub(self.target, self.aL, out=self.eL)
            if self._output_precision is not None:
                torch.mul(self.eL, self._output_precision, out=self.epsL)
        else:  # cross-entropy: eps_L = onehot - softmax(a_L); e_L keeps the same (no variance)
            torch.softmax(self.aL, dim=1, out=self.epsL)
            torch.sub(self.target, self.epsL, out=self.epsL)
            self.eL.copy_(self.epsL)

    def _step(self, lo: int = 0) -> None:
        gamma, rows, params = self.step_size, self._rows[lo], self._param_rows[lo]
        # plain descent moves x by -gamma dE/dx; the heavy ball moves its velocity so, then x by the velocity
        if self.momentum:
            moved, moved_below, top = rows.v.mul_(self.momentum), rows.v_below, self.V[-1]
        else:
            moved, moved_below, top = rows.x, rows.x_below, self.x_top
        moved.add_(rows.eps, alpha=-gamma)
        if params.w is not None and rows.x_below.shape[0]:
            if not params.balanced:
                moved_below.baddbmm_(rows.g_above, params.w, alpha=gamma)
            else:
                n = params.balanced
                moved_below[:n].baddbmm_(rows.g_above[:n], params.w[:n], alpha=gamma)
                for j in range(n, rows.x_below.shape[0]):  # the rest one by one: MKL spreads one product itself
                    moved_below[j].addmm_(rows.g_above[j], params.w[j], alpha=gamma)
        top.addmm_(self.epsL, self._w_out, alpha=gamma)
        if self.momentum:
            rows.x.add_(rows.v)

    def _error_energy(self) -> Tensor:
        """Mean error energy per sample, sum_l e_l^2 / (2 S_l), from the current errors: e . eps, so no temporary."""
        B = self.X.shape[1]
        hidden = torch.dot(self.E.view(-1), self.EPS.view(-1))
        if self.net.output_loss == "ce":
            return 0.5 * hidden / B - (self.target * torch.log_softmax(self.aL, dim=1)).sum() / B
        return 0.5 * (hidden + torch.dot(self.eL.view(-1), self.epsL.view(-1))) / B

    @torch.no_grad()
    def error_energy(self) -> Tensor:
        """Mean error energy per sample at the current errors (a 0-d tensor, no host sync): what inference lowers,
        comparable across twins (the log-variance term is a constant during inference)."""
        return self._error_energy()

    @torch.no_grad()
    def log_variance_energy(self) -> Tensor:
        """0.5 sum_l sum_i log S_{l,i}: the rest of the energy (zero with fixed variances)."""
        L, n = self.net.num_layers, self.net.sizes
        total = torch.zeros((), dtype=self.net.weights[0].dtype, device=self.net.weights[0].device)
        for l, log_s in enumerate(self.net.log_variances):
            if log_s is not None:
                total = total + 0.5 * log_s.expand(n[l + 1]).sum()
        return total

    @torch.no_grad()
    def energy(self) -> Tensor:
        """Mean energy per sample at the current errors: error energy plus the log-variance term."""
        return self._error_energy() + self.log_variance_energy()

    @torch.no_grad()
    def layer_error_energies(self) -> Tensor:
        """(L,) mean error energy per sample of each weight layer's error: where the error sits in the network."""
        B = self.X.shape[1]
        hidden = 0.5 * (self.E * self.EPS).sum(dim=(1, 2))
        if self.net.output_loss == "ce":
            output = -(self.target * torch.log_softmax(self.aL, dim=1)).sum()
        else:
            output = 0.5 * torch.dot(self.eL.view(-1), self.epsL.view(-1))
        return torch.cat([hidden, output.reshape(1)]) / B

    def _grad_stack(self, params: Sequence[Tensor], name: str) -> Tensor:
        """A stacked gradient buffer whose slices are the parameters' ``.grad`` (rebuilt if anyone replaced them)."""
        stack = getattr(self, name, None)
        if stack is None or stack.shape[1:] != params[0].shape or stack.device != params[0].device or stack.dtype != params[0].dtype:
            stack = torch.zeros(len(params), *params[0].shape, dtype=params[0].dtype, device=params[0].device)
            setattr(self, name, stack)
        for i, p in enumerate(params):
            if p.grad is None or p.grad.data_ptr() != stack[i].data_ptr():
                p.grad = stack[i]
        return stack

    @staticmethod
    def _grad(p: Tensor) -> Tensor:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        return p.grad

    @torch.no_grad()
    def weight_gradients(self) -> list[Tensor]:
        """Write dE/dtheta into every parameter's ``.grad`` (energy averaged over the batch).

        Returns the gradients in the order of ``Network.parameters()``.
        """
        L, B = self.net.num_layers, self.X.shape[1]
        W, b = self.net.weights, self.net.biases
        scale = -1.0 / B
        # FixedPred pairs each error with the feedforward activity below it, as backprop does
        below = self.MU if self.fixed_predictions else self.X
        torch.addmm(self._grad(W[0]), self.G[0].t(), self.x0, beta=0.0, alpha=scale, out=W[0].grad)
        torch.sum(self.G[0], dim=0, out=self._grad(b[0])).mul_(scale)
        if self._w_stack is not None:
            gw = self._grad_stack(W[1 : L - 1], "_w_grad")
            torch.baddbmm(gw, self.G[1:].transpose(1, 2), below[:-1], beta=0.0, alpha=scale, out=gw)
            torch.sum(self.G[1:], dim=1, out=self._grad_stack(b[1 : L - 1], "_b_grad")).mul_(scale)
        torch.addmm(self._grad(W[-1]), self.epsL.t(), below[-1], beta=0.0, alpha=scale, out=W[-1].grad)
        torch.sum(self.epsL, dim=0, out=self._grad(b[-1])).mul_(scale)
        if self._hidden_variances:
            gs = self._grad_stack(self.net.log_variances[: L - 1], "_s_grad")
            # mean_b 0.5 * (1 - e^2 / S), summed over the neurons that share one log S
            per_neuron = 0.5 - 0.5 * self.E.pow(2).mean(dim=1) * self._hidden_precision.squeeze(1)
            gs.copy_(per_neuron if gs.shape[-1] == per_neuron.shape[-1] else per_neuron.sum(-1, keepdim=True))
        out_var = self.net.log_variances[L - 1]
        if out_var is not None:
            per_neuron = 0.5 - 0.5 * self.eL.pow(2).mean(dim=0) * self._output_precision
            self._grad(out_var).copy_(per_neuron.sum().reshape(out_var.shape) if out_var.numel() == 1 else per_neuron)
        return [p.grad for p in self.net.parameters()]

    @torch.no_grad()
    def feedforward_init(self, inputs: Tensor, target: Tensor) -> None:
        """x_l <- mu_l for every layer, then clamp x_L to the target. Hidden errors are now exactly zero."""
        self._allocate(inputs.shape[0], inputs)
        self.refresh_parameters()  # cheap; catches parameters moved, cast or reloaded since the last batch
        self.x0.copy_(inputs)
        self.target.copy_(target)
        W, b, act = self.net.weights, self.net.biases, self.net.activation
        torch.addmm(b[0], self.x0, W[0].t(), out=self.A[0])
        self._input_current = True
        for l in range(self.net.num_layers - 1):  # sequential: each layer needs the one below
            if l > 0:
                torch.addmm(b[l], self.X[l - 1], W[l].t(), out=self.A[l])
            act.forward(self.A[l], self.MU[l])
            self.X[l].copy_(self.MU[l])
        act.derivative(self.A, self.MU, self.FP)
        torch.addmm(b[-1], self.X[-1], W[-1].t(), out=self.aL)
        for buffer in (self.E, self.EPS, self.G):  # x_l = mu_l: the hidden errors are zero by construction
            buffer.zero_()
        if self.V is not None:
            self.V.zero_()  # inference starts at rest
        self._front = self.X.shape[0]  # no hidden row has moved

    def train_batch(
        self,
        inputs: Tensor,
        target: Tensor,
        apply_update: Callable[[], None],
        trace_energy: bool = False,
    ) -> BatchResult:
        """Feedforward init, clamp, ``steps`` inference steps with weight updates on schedule.

        ``apply_update`` is called after the gradients are written to ``.grad`` (typically ``optimizer.step``).
        With a ``tolerance``, inference ends early once the energy's relative change over ``check_every`` steps falls
        below it (one host sync per check); a last weight update is then made from the converged activities.
        """
        with torch.no_grad():
            return self._train_batch(inputs, target, apply_update, trace_energy)

    def _train_batch(self, inputs: Tensor, target: Tensor, apply_update: Callable[[], None],
                     trace_energy: bool) -> BatchResult:
        self.feedforward_init(inputs, target)
        self.compute_errors(predict=False)  # the output's error: the predictions are current from the feedforward pass
        logits = self.aL.clone()
        loss = output_loss(logits, target, self.net.output_loss)
        energy_start = self._error_energy()
        trace = [energy_start] if trace_energy else None
        every = self.update_every or self.steps
        updates, steps_used = 0, self.steps
        tolerance_ref = rise_ref = energy_start
        rises = torch.zeros((), dtype=torch.int64, device=energy_start.device)
        energy_end = energy_start
        for t in range(1, self.steps + 1):
            self.inference_step()
            self.compute_errors(predict=not self.fixed_predictions)
            if trace is not None:
                trace.append(self._error_energy())
            converged = False
            if t % self.check_every == 0 or t == self.steps:  # stability watch (and the optional tolerance)
                current = trace[-1] if trace is not None else self._error_energy()
                rises += current > rise_ref
                rise_ref = current
                if self.tolerance is not None and t % self.check_every == 0 and t < self.steps:
                    converged = bool((tolerance_ref - current).abs() <= self.tolerance * tolerance_ref.abs())
                    tolerance_ref = current
            if t == self.steps or converged:  # before the last weight update changes what the energy depends on
                energy_end = trace[-1] if trace is not None else self._error_energy()
            if t % every == 0 or converged:
                self.weight_gradients()
                apply_update()
                self.refresh_parameters()  # new weights: every prediction is stale (the front is back at row 0)
                updates += 1
                if t < self.steps and not converged:
                    self.compute_errors(predict=not self.fixed_predictions)
                    rise_ref = self._error_energy()  # rises are counted within inference, not across updates
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
            log_variance_energy=self.log_variance_energy(),
        )


@torch.no_grad()
def activity_curvature(engine: PCEngine, iterations: int = 30, seed: int = 0, unit_variance: bool = False) -> Tensor:
    """Largest eigenvalue of each sample's Gauss-Newton Hessian of E over the hidden activities, by power iteration
    at the engine's current state (shape (B,)). Gradient descent on the activities is stable while
    ``step_size * lambda_max < 2``. At the feedforward state (hidden errors zero, linear output) Gauss-Newton is the
    exact Hessian; it scales like 1/S, so a variance floor S_min multiplies it by at most 1/S_min.

    H v = sum_l J_l^T P_l J_l v, with J_l v = v_l - f'(a_l) * (v_{l-1} W_l^T) the change of e_l (x_0, x_L clamped).
    ``unit_variance``: as if every S were 1 (an upper bound on the curvature times S_min when all S >= S_min).
    """
    net, L = engine.net, engine.net.num_layers
    W, fp = net.weights, engine.fprime
    P = [None] * L if unit_variance else engine.precisions
    gen = torch.Generator(device=engine.X.device).manual_seed(seed)
    v = torch.randn(engine.X.shape, generator=gen, device=engine.X.device, dtype=engine.X.dtype)
    softmax = torch.softmax(engine.aL, dim=1) if net.output_loss == "ce" else None
    lam = torch.zeros(v.shape[1], dtype=v.dtype, device=v.device)
    for _ in range(iterations):
        v = v / v.pow(2).sum(dim=(0, 2)).sqrt().clamp_min(1e-30).view(1, -1, 1)
        r = []  # P_l J_l v for l = 1..L
        for l in range(1, L + 1):
            change = v[l - 1] if l < L else torch.zeros_like(engine.aL)
            if l > 1:
                drive = v[l - 2] @ W[l - 1].t()
                change = change - (fp[l] * drive if l < L else drive)
            if l == L and softmax is not None:  # cross-entropy: the softmax's Hessian instead of a precision
                r.append(softmax * change - softmax * (softmax * change).sum(dim=1, keepdim=True))
            else:
                r.append(change if P[l - 1] is None else P[l - 1] * change)
        hv = torch.stack([
            r[l - 1] - ((fp[l + 1] * r[l]) if l + 1 < L else r[l]) @ W[l] for l in range(1, L)
        ])
        lam = (v * hv).sum(dim=(0, 2))
        v = hv
    return lam
