"""The fast PC engine: the math of ``pcsweep.pc.energy`` in preallocated, layer-stacked buffers, worked in place.

Nothing here changes the arithmetic beyond float rounding; every trick is measured by ``python -m pcsweep.bench``
(its "engine tricks" table) and the engine is tested against the plain functions and autograd in float64:

- **stacks**: the hidden activities of all layers live in one (L-1, B, width) tensor and the equal-shape hidden
  weight matrices W_2 .. W_{L-1} are views of one (L-2, width, width) stack, so an inference step is a fixed handful
  of batched kernels (one ``baddbmm`` for all predictions, one for all feedbacks, fused elementwise work over all
  layers) whatever the depth;
- **views built once** per buffer or parameter change (a view costs as much as a whole kernel at width 256);
- **the error front**: after the feedforward init the hidden errors are exactly zero and the front moves down one
  layer per step, so rows below it are not recomputed (also what keeps their errors exactly zero on every CPU);
- **transposed copy** (CPU, width <= ``NARROW_MAX_WIDTH``): narrow layers predict from a contiguous copy of W^T;
- **thread-balanced batches** (CPU, wider): batched products over a multiple of the thread count, the rest split;
- **pre-packed weights** (CPU, float32, wider): each hidden weight packed once per update into oneDNN's blocked
  layout, for the prediction (W^T) and the feedback (W), and every inference step's products read the packed copies
  (measured on a 2-core AVX-512 EPYC at width 1024, batch 64: 0.61 ms a product against 1.04 ms for ``torch.mm``; a
  packing costs about 2 ms a layer, once per weight update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, cast

import torch
from torch import Tensor

from pcsweep.pc.energy import Network, log_variance_energy
from pcsweep.pc.schedule import BatchResult, Inference, train_batch

# CPU layers up to this width predict from a transposed weight copy (_refresh_transposed_weights); wider ones batch
# their products in multiples of the thread count (_build_param_views), or (float32) through oneDNN's pre-packed
# weights (_refresh_packed_weights). pcsweep.bench measures each.
NARROW_MAX_WIDTH = 512
PREPACK_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True)
class Tricks:
    """The engine's speed tricks, each switchable so that ``pcsweep.bench`` measures what it buys (its "engine
    tricks" table); switched off, the engine computes the same numbers through more work."""

    error_front: bool = True  # skip the rows below the error front (the first L-1 steps of a batch)
    transposed_copy: bool = True  # CPU, width <= NARROW_MAX_WIDTH: predict from a contiguous copy of W^T
    thread_balance: bool = True  # CPU, wider: batch a multiple of the thread count, split the rest
    prepacked: bool = True  # CPU float32, wider: products through oneDNN from weights packed once per update


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
    if (
        buffer is not None
        and buffer.shape == like.shape
        and buffer.dtype == like.dtype
        and buffer.device == like.device
    ):
        return buffer
    return torch.empty_like(like)


def _bind(params: Sequence[Tensor], stack: Optional[Tensor]) -> Tensor:
    """Make the parameters views of one stacked tensor (values kept), so that a layer-batched product reads them in
    place and the optimizer's in-place updates land in the stack. Re-binds whenever something (a device move, a
    dtype cast) gave a parameter storage of its own."""
    if (
        stack is not None
        and stack.shape[0] == len(params)
        and all(
            p.device == stack.device and p.dtype == stack.dtype and p.data_ptr() == stack[i].data_ptr()
            for i, p in enumerate(params)
        )
    ):
        return stack
    stack = torch.stack([p.detach() for p in params])
    for i, p in enumerate(params):
        p.data = stack[i]
    return stack


class PCEngine:
    """Runs inference and learning for one network (a ``Stepper`` of ``pcsweep.pc.schedule``); buffers are
    allocated once per batch size and reused. The per-layer lists ``x, a, mu, fprime, e, eps, g`` (indexed by l as
    in the equations) are views into the stacks. ``log_variance_min`` is a floor on log S (the run may move it).
    """

    def __init__(
        self,
        network: Network,
        inference: Inference = Inference(),
        log_variance_min: float = -math.inf,
        tricks: Tricks = Tricks(),
    ) -> None:
        hidden_sizes = set(network.sizes[1:-1])
        if len(hidden_sizes) != 1:
            raise ValueError(f"the hidden layers must share one width, got sizes {network.sizes}")
        hidden_vars = [v is None for v in network.log_variances[:-1]]
        if any(hidden_vars) and not all(hidden_vars):
            raise ValueError("hidden layers need a log-variance each, or none at all")
        self.net, self.inference, self.log_variance_min, self.tricks = network, inference, log_variance_min, tricks
        self.V: Optional[Tensor] = None
        self._buffers_for: Optional[tuple] = None
        self._w_stack: Optional[Tensor] = None
        self._b_stack: Optional[Tensor] = None
        self._s_stack: Optional[Tensor] = None
        self._grad_stacks: dict[str, Tensor] = {}
        self._precision_base: Optional[Tensor] = None  # exp(-log S) of the hidden layers, updated in place
        self._w_t_stack: Optional[Tensor] = None  # a contiguous copy of the stack's transpose (narrow CPU layers)
        self._w_t_version: Optional[tuple] = None  # the weights it was copied from
        self._param_views_of: Optional[tuple] = None  # the storages the loop's parameter views were made from
        self._packed: Optional[list[tuple[Tensor, Tensor]]] = None  # per hidden stack row: (for W^T, for W)
        self._packed_version: Optional[tuple] = None  # the weights and batch size they were packed from
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
                self._refresh_packed_weights()
            if self._hidden_variances:
                # every hidden layer has a log-variance (checked in __init__)
                self._s_stack = _bind(cast(Sequence[Tensor], self.net.log_variances[: L - 1]), self._s_stack)
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
        views_of = tuple(
            t.data_ptr()
            for t in (W[0], W[-1], self._w_stack, self._w_t_stack, self._b_stack, self._precision_base)
            if t is not None
        )
        if views_of != self._param_views_of:  # once, and again after anything moved the parameters
            self._param_views_of = views_of
            self._build_param_views()
        self.precisions: list[Optional[Tensor]] = self._hidden_precisions + [self._output_precision]
        self._input_current = False  # a_1 = W_1 x_0 + b_1 must be recomputed
        # The error front: hidden rows below it still hold their feedforward activities, predictions and exactly
        # zero errors, so nothing recomputes them (recomputing through another kernel could round differently).
        self._front = 0  # new parameters: every prediction is stale

    def _refresh_transposed_weights(self) -> None:
        """On a CPU, narrow layers may predict faster from a contiguous copy of the stack's transpose (x @ W^T reads
        W against its layout); the copy is redone only when the weights changed. Wide layers go without: the copy
        itself is slow there. ``pcsweep.bench`` measures what it buys on the machine at hand."""
        stack = self._w_stack
        assert stack is not None  # called only after refresh_parameters bound the stack (L > 2)
        if not self.tricks.transposed_copy or stack.device.type != "cpu" or stack.shape[-1] > NARROW_MAX_WIDTH:
            self._w_t_stack = None
            return
        version = (stack.data_ptr(), stack._version) + tuple(w._version for w in self.net.weights[1:-1])
        reused = _reuse(self._w_t_stack, stack)
        if reused is not self._w_t_stack:
            self._w_t_stack, self._w_t_version = reused, None
        if version != self._w_t_version:
            self._w_t_stack.copy_(stack.transpose(1, 2))
            self._w_t_version = version

    def _packs(self) -> bool:
        """Whether the hidden products go through oneDNN's pre-packed weights (CPU, float32, wide layers)."""
        stack = self._w_stack
        return (
            self.tricks.prepacked
            and stack is not None
            and stack.device.type == "cpu"
            and stack.dtype == torch.float32
            and stack.shape[-1] > NARROW_MAX_WIDTH
            and PREPACK_AVAILABLE
        )

    def _refresh_packed_weights(self) -> None:
        """Pack each hidden weight for oneDNN (both orientations), once per change of the weights or batch size."""
        if not self._packs() or self._buffers_for is None:
            self._packed = None
            return
        stack = cast(Tensor, self._w_stack)
        batch = self._buffers_for[0]
        version = (stack.data_ptr(), stack._version, batch) + tuple(w._version for w in self.net.weights[1:-1])
        if version == self._packed_version:
            return
        pack = torch.ops.mkldnn._reorder_linear_weight
        self._packed = [(pack(w, batch), pack(w.t(), batch)) for w in stack.unbind(0)]
        self._packed_version = version

    def _build_param_views(self) -> None:
        W, L, stack = self.net.weights, self.net.num_layers, self._w_stack
        self._w_in_t, self._w_out, self._w_out_t = W[0].t(), W[-1], W[-1].t()
        self._hidden_precisions = [
            self._hidden_precision[l, 0] if self._hidden_variances else None for l in range(L - 1)
        ]
        self._param_rows = [
            _ParamRows(
                w=None if stack is None else stack[lo:],
                w_t=None
                if stack is None
                else (stack[lo:].transpose(1, 2) if self._w_t_stack is None else self._w_t_stack[lo:]),
                b=None if stack is None else cast(Tensor, self._b_stack)[lo:].unsqueeze(1),  # bound with the W stack
                precision=self._hidden_precision[lo:] if self._hidden_variances else None,
            )
            for lo in range(L - 1)
        ]
        # A batched product hands whole matrices to the CPU threads: 7 on 2 threads leave one idle for a seventh
        # of the time. Wide layers batch a multiple of the thread count and split the rest; narrow ones keep one
        # kernel (a call costs more than the imbalance there). pcsweep.bench measures what it buys.
        self._threads = torch.get_num_threads()
        rows = 0 if stack is None else stack.shape[0]
        if (
            self.tricks.thread_balance
            and stack is not None
            and stack.device.type == "cpu"
            and stack.shape[-1] > NARROW_MAX_WIDTH
            and self._threads > 1
            and rows % self._threads
            and stack.shape[1] % self._threads == 0
        ):
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
        self.V = new(H, batch, width) if self.inference.momentum else None  # activity velocity (heavy ball)
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
            _Rows(
                self.X[lo:],
                self.A[lo:],
                self.MU[lo:],
                self.FP[lo:],
                self.E[lo:],
                self.EPS[lo:],
                self.G[lo:],
                self.X[lo:-1],
                self.A[lo + 1 :],
                self.G[lo + 1 :],
                None if self.V is None else self.V[lo:],
                None if self.V is None else self.V[lo:-1],
            )
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
        if params.w is not None and rows.x_below.shape[0] and self._packed is not None:
            linear, b_stack = torch.ops.mkldnn._linear_pointwise, cast(Tensor, self._b_stack)
            for j in range(lo, self.X.shape[0] - 1):  # row j of the stack predicts hidden row j + 1
                self.A[j + 1].copy_(linear(self.X[j], self._packed[j][0], b_stack[j], "none", [], ""))
        elif params.w is not None and rows.x_below.shape[0]:
            assert params.b is not None and params.w_t is not None  # set together with w
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
        part = torch.baddbmm(
            b.view(blocks, 1, n // blocks),
            x.expand(blocks, *x.shape),
            w.view(blocks, n // blocks, w.shape[1]).transpose(1, 2),
        )
        out.view(batch, blocks, n // blocks).copy_(part.transpose(0, 1))

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
        if self._hidden_variances:
            torch.mul(rows.e, cast(Tensor, self._param_rows[lo].precision), out=rows.eps)
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
        gamma, beta, rows, params = (
            self.inference.step_size,
            self.inference.momentum,
            self._rows[lo],
            self._param_rows[lo],
        )
        # plain descent moves x by -gamma dE/dx; the heavy ball moves its velocity so, then x by the velocity
        if beta:
            assert rows.v is not None and rows.v_below is not None and self.V is not None  # allocated with momentum
            moved, moved_below, top = rows.v.mul_(beta), rows.v_below, self.V[-1]
        else:
            moved, moved_below, top = rows.x, rows.x_below, self.x_top
        moved.add_(rows.eps, alpha=-gamma)
        if params.w is not None and rows.x_below.shape[0] and self._packed is not None:
            linear = torch.ops.mkldnn._linear_pointwise
            for i, j in enumerate(range(lo, self.X.shape[0] - 1)):  # x_j takes g_{j+1} W_{j+1}: stack row j
                moved_below[i].add_(linear(self.G[j + 1], self._packed[j][1], None, "none", [], ""), alpha=gamma)
        elif params.w is not None and rows.x_below.shape[0]:
            if not params.balanced:
                moved_below.baddbmm_(rows.g_above, params.w, alpha=gamma)
            else:
                n = params.balanced
                moved_below[:n].baddbmm_(rows.g_above[:n], params.w[:n], alpha=gamma)
                for j in range(n, rows.x_below.shape[0]):  # the rest one by one: MKL spreads one product itself
                    moved_below[j].addmm_(rows.g_above[j], params.w[j], alpha=gamma)
        top.addmm_(self.epsL, self._w_out, alpha=gamma)
        if beta:
            rows.x.add_(cast(Tensor, rows.v))

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
        return log_variance_energy(self.net)

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
        stack = self._grad_stacks.get(name)
        if (
            stack is None
            or stack.shape[1:] != params[0].shape
            or stack.device != params[0].device
            or stack.dtype != params[0].dtype
        ):
            stack = torch.zeros(len(params), *params[0].shape, dtype=params[0].dtype, device=params[0].device)
            self._grad_stacks[name] = stack
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
    def write_gradients(self) -> list[Tensor]:
        """Write dE/dtheta into every parameter's ``.grad`` (energy averaged over the batch).

        Returns the gradients in the order of ``Network.parameters()``.
        """
        L, B = self.net.num_layers, self.X.shape[1]
        W, b = self.net.weights, self.net.biases
        scale = -1.0 / B
        # FixedPred pairs each error with the feedforward activity below it, as backprop does
        below = self.MU if self.inference.fixed_predictions else self.X
        torch.addmm(self._grad(W[0]), self.G[0].t(), self.x0, beta=0.0, alpha=scale, out=W[0].grad)
        torch.sum(self.G[0], dim=0, out=self._grad(b[0])).mul_(scale)
        if self._w_stack is not None:
            gw = self._grad_stack(W[1 : L - 1], "_w_grad")
            torch.baddbmm(gw, self.G[1:].transpose(1, 2), below[:-1], beta=0.0, alpha=scale, out=gw)
            torch.sum(self.G[1:], dim=1, out=self._grad_stack(b[1 : L - 1], "_b_grad")).mul_(scale)
        torch.addmm(self._grad(W[-1]), self.epsL.t(), below[-1], beta=0.0, alpha=scale, out=W[-1].grad)
        torch.sum(self.epsL, dim=0, out=self._grad(b[-1])).mul_(scale)
        if self._hidden_variances:
            gs = self._grad_stack(cast(Sequence[Tensor], self.net.log_variances[: L - 1]), "_s_grad")
            # mean_b 0.5 * (1 - e^2 / S), summed over the neurons that share one log S
            per_neuron = 0.5 - 0.5 * self.E.pow(2).mean(dim=1) * self._hidden_precision.squeeze(1)
            gs.copy_(per_neuron if gs.shape[-1] == per_neuron.shape[-1] else per_neuron.sum(-1, keepdim=True))
        out_var = self.net.log_variances[L - 1]
        if out_var is not None:
            per_neuron = 0.5 - 0.5 * self.eL.pow(2).mean(dim=0) * cast(Tensor, self._output_precision)
            self._grad(out_var).copy_(per_neuron.sum().reshape(out_var.shape) if out_var.numel() == 1 else per_neuron)
        return cast(list[Tensor], [p.grad for p in self.net.parameters()])  # every .grad was written above

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

    # ------------------------------------------- the Stepper protocol (schedule.train_batch)
    # train_batch enters no_grad once per batch; step and recompute enter it only when called outside (a context per
    # step would cost a little on every step)
    def start(self, inputs: Tensor, target: Tensor) -> Tensor:
        self.feedforward_init(inputs, target)
        # the output's error (the hidden ones are exactly zero): the predictions are current from the feedforward pass
        self._errors(predict=False, lo=self.X.shape[0] - 1)
        return self.aL.clone()

    def step(self) -> None:
        """One Jacobi step of gradient descent on all hidden activities at once; moves the error front down a row."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.step()
        self._front = max(self._front - 1, 0) if self.tricks.error_front else 0
        self._step(self._front)
        self.recompute()

    def recompute(self) -> None:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.recompute()
        self._errors(not self.inference.fixed_predictions, lo=min(self._front, self.X.shape[0] - 1))

    def parameters_changed(self) -> None:
        self.refresh_parameters()

    def train_batch(
        self, inputs: Tensor, target: Tensor, apply_update: Callable[[], None], trace_energy: bool = False
    ) -> BatchResult:
        """``schedule.train_batch`` with this engine and its inference settings."""
        return train_batch(self, self.inference, inputs, target, apply_update, trace_energy)


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
    P: list[Optional[Tensor]] = [None] * L if unit_variance else engine.precisions
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
                r.append(change if P[l - 1] is None else cast(Tensor, P[l - 1]) * change)
        hv = torch.stack([r[l - 1] - ((fp[l + 1] * r[l]) if l + 1 < L else r[l]) @ W[l] for l in range(1, L)])
        lam = (v * hv).sum(dim=(0, 2))
        v = hv
    return lam
