"""The engine's speed machinery: which kernel computes a product, never what it computes.

Every product takes R runs at once ((R, B, n) tensors, or flat (layers * R, B, n) rows of the hidden stacks). With
``two_d`` (a solo run of state inference) the in and out layers use the 2-d kernels a solo engine always used, so it
rounds as it always did; otherwise one batched kernel at any R, so that a pack's run rounds exactly as its solo run
(error optimization's search amplifies any difference in rounding).
The CPU tricks for the hidden stack, each switchable (``Tricks``) and measured by ``python -m pcsweep.bench``:

- **transposed copy** (width <= ``NARROW_MAX_WIDTH``): narrow layers predict from a contiguous copy of W^T (x @ W^T
  reads W against its layout), redone only when the weights changed;
- **thread-balanced batches** (wider): batched products over a multiple of the thread count, the rest split;
- **pre-packed weights** (float32, wider): each hidden weight packed once per update into oneDNN's blocked layout,
  for the prediction (W^T) and the feedback (W), and every inference step's products read the packed copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

# CPU layers up to this width predict from a transposed weight copy; wider ones batch their products in multiples of
# the thread count, or (float32) through oneDNN's pre-packed weights. pcsweep.bench.tables measures each.
NARROW_MAX_WIDTH = 512
PREPACK_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True)
class Tricks:
    """The engine's speed tricks, each switchable so that ``pcsweep.bench.tables`` measures what it buys (its "engine
    tricks" table); switched off, the engine computes the same numbers through more work."""

    error_front: bool = True  # skip the rows below the error front (the first L-1 steps of a batch)
    transposed_copy: bool = True  # CPU, width <= NARROW_MAX_WIDTH: predict from a contiguous copy of W^T
    thread_balance: bool = True  # CPU, wider: batch a multiple of the thread count, split the rest
    prepacked: bool = True  # CPU float32, wider: products through oneDNN from weights packed once per update


def affine(out: Tensor, bias: Tensor, x: Tensor, w_t: Tensor, two_d: bool) -> None:
    """out[r] = bias[r] + x[r] @ w_t[r] for every run (``bias`` (R, m))."""
    if two_d:
        torch.addmm(bias[0], x[0], w_t[0], out=out[0])
    else:
        torch.baddbmm(bias.unsqueeze(1), x, w_t, out=out)


def outer(out: Tensor, a: Tensor, b: Tensor, scale: float, two_d: bool) -> None:
    """out[r] = scale * a[r]^T b[r] for every run: a weight gradient."""
    if two_d:
        torch.addmm(out[0], a[0].t(), b[0], beta=0.0, alpha=scale, out=out[0])
    else:
        torch.baddbmm(out, a.transpose(1, 2), b, beta=0.0, alpha=scale, out=out)


def batch_sum(out: Tensor, a: Tensor, scale: float, two_d: bool) -> None:
    """out[r] = scale * sum_b a[r, b] for every run: a bias gradient."""
    if two_d:
        torch.sum(a[0], dim=0, out=out[0]).mul_(scale)
    else:
        torch.sum(a, dim=1, out=out).mul_(scale)


@dataclass
class _From:
    """The hidden weights from flat row ``row0`` up, in the shapes the products take."""

    w: Tensor  # (rows, n, n): feedback += g_above @ w
    w_t: Tensor  # its transpose: prediction a_above = b + x_below @ w_t
    b: Tensor  # (rows, 1, n)
    balanced: int = 0  # batch the first this many rows only (a multiple of the CPU threads); 0: batch them all


class HiddenProducts:
    """The products with the hidden weight stack W_2 .. W_{L-1} ((H-1, R, n, n), flat: (H-1) * R rows), for the
    predictions and the feedbacks from any flat row up. ``versions`` names the weights' state (re-copies and re-packs
    happen only when it changed)."""

    def __init__(
        self, w_hid: Optional[Tensor], b_hid: Optional[Tensor], tricks: Tricks, versions: Callable[[], tuple]
    ) -> None:
        self.tricks, self.versions = tricks, versions
        self.w = None if w_hid is None else w_hid.flatten(0, 1)
        self.b = None if b_hid is None else b_hid.flatten(0, 1)
        self.threads = torch.get_num_threads()
        cpu = self.w is not None and self.w.device.type == "cpu"
        wide = self.w is not None and self.w.shape[-1] > NARROW_MAX_WIDTH
        self.w_t_copy: Optional[Tensor] = None
        if cpu and not wide and tricks.transposed_copy:
            self.w_t_copy = torch.empty_like(_given(self.w))
        self.prepacks = (
            cpu and wide and tricks.prepacked and PREPACK_AVAILABLE and _given(self.w).dtype == torch.float32
        )
        self.balances = cpu and wide and tricks.thread_balance and self.threads > 1
        self.packed: Optional[list[tuple[Tensor, Tensor]]] = None  # per flat row: (for W^T, for W)
        self._copied_from: Optional[tuple] = None
        self._packed_from: Optional[tuple] = None
        self._views: dict[int, _From] = {}

    def refresh(self, batch: Optional[int]) -> None:
        """After the weights may have changed: the transposed copy and (once a batch size is known) the packs."""
        if self.w is None:
            return
        version = self.versions()
        if self.w_t_copy is not None and version != self._copied_from:
            self.w_t_copy.copy_(self.w.transpose(1, 2))
            self._copied_from = version
        if self.prepacks and batch is not None and version + (batch,) != self._packed_from:
            pack = torch.ops.mkldnn._reorder_linear_weight
            self.packed = [(pack(w, batch), pack(w.t(), batch)) for w in self.w.unbind(0)]
            self._packed_from = version + (batch,)

    def _from(self, row0: int) -> _From:
        views = self._views.get(row0)
        if views is None:
            w, b = _given(self.w), _given(self.b)
            w_t = w[row0:].transpose(1, 2) if self.w_t_copy is None else self.w_t_copy[row0:]
            views = _From(w[row0:], w_t, b[row0:].unsqueeze(1))
            rows = w.shape[0] - row0
            # A batched product hands whole matrices to the CPU threads: 7 on 2 threads leave one idle for a seventh
            # of the time. Wide layers batch a multiple of the thread count and split the rest; narrow ones keep one
            # kernel (a call costs more than the imbalance there).
            if self.balances and row0 == 0 and rows % self.threads and w.shape[1] % self.threads == 0:
                views.balanced = rows - rows % self.threads
            self._views[row0] = views
        return views

    def predict(self, row0: int, x_below: Tensor, a_above: Tensor) -> None:
        """a_above = b + x_below @ W^T for the flat rows from ``row0`` up."""
        if self.w is None or not x_below.shape[0]:
            return
        if self.packed is not None:
            linear, b = torch.ops.mkldnn._linear_pointwise, _given(self.b)
            for i in range(x_below.shape[0]):
                a_above[i].copy_(linear(x_below[i], self.packed[row0 + i][0], b[row0 + i], "none", [], ""))
            return
        views = self._from(row0)
        n = views.balanced
        if not n:
            torch.baddbmm(views.b, x_below, views.w_t, out=a_above)
            return
        torch.baddbmm(views.b[:n], x_below[:n], views.w_t[:n], out=a_above[:n])
        for j in range(n, x_below.shape[0]):  # the rest, each split into one row block of W per thread
            self._predict_in_blocks(x_below[j], views.w[j], views.b[j, 0], a_above[j])

    def _predict_in_blocks(self, x: Tensor, w: Tensor, b: Tensor, out: Tensor) -> None:
        """out = b + x @ w^T as one batched product over ``threads`` row blocks of w, so each thread gets one."""
        blocks, (batch, n) = self.threads, out.shape
        part = torch.baddbmm(
            b.view(blocks, 1, n // blocks),
            x.expand(blocks, *x.shape),
            w.view(blocks, n // blocks, w.shape[1]).transpose(1, 2),
        )
        out.view(batch, blocks, n // blocks).copy_(part.transpose(0, 1))

    def feedback(self, row0: int, g_above: Tensor, moved_below: Tensor, gamma: float) -> None:
        """moved_below += gamma * g_above @ W for the flat rows from ``row0`` up."""
        if self.w is None or not g_above.shape[0]:
            return
        if self.packed is not None:
            linear = torch.ops.mkldnn._linear_pointwise
            for i in range(g_above.shape[0]):
                moved_below[i].add_(linear(g_above[i], self.packed[row0 + i][1], None, "none", [], ""), alpha=gamma)
            return
        views = self._from(row0)
        n = views.balanced
        if not n:
            moved_below.baddbmm_(g_above, views.w, alpha=gamma)
            return
        moved_below[:n].baddbmm_(g_above[:n], views.w[:n], alpha=gamma)
        for j in range(n, g_above.shape[0]):  # the rest one by one: MKL spreads one product itself
            moved_below[j].addmm_(g_above[j], views.w[j], alpha=gamma)

    def feedback_into(self, row0: int, g_above: Tensor, out: Tensor) -> None:
        """out = g_above @ W for the flat rows from ``row0`` up (runs that take different steps scale it after)."""
        if self.w is None or not g_above.shape[0]:
            return
        if self.packed is not None:
            linear = torch.ops.mkldnn._linear_pointwise
            for i in range(g_above.shape[0]):
                out[i].copy_(linear(g_above[i], self.packed[row0 + i][1], None, "none", [], ""))
            return
        torch.bmm(g_above, _given(self.w)[row0 : row0 + g_above.shape[0]], out=out)

    # one hidden weight layer j (W_{j+2}) of every run at a time: error optimization's recursions go layer by layer
    def layer_forward(self, j: int, x: Tensor, out: Tensor, bias: bool = True) -> None:
        """out = b_j + x @ W_j^T (without b_j unless ``bias``) for every run: ``x``, ``out`` (R, B, n)."""
        R, linear = x.shape[0], torch.ops.mkldnn._linear_pointwise
        if self.packed is not None:
            for r in range(R):
                b = _given(self.b)[j * R + r] if bias else None
                out[r].copy_(linear(x[r], self.packed[j * R + r][0], b, "none", [], ""))
            return
        rows = slice(j * R, (j + 1) * R)
        w_t = _given(self.w)[rows].transpose(1, 2) if self.w_t_copy is None else self.w_t_copy[rows]
        if bias:
            torch.baddbmm(_given(self.b)[rows].unsqueeze(1), x, w_t, out=out)
        else:
            torch.bmm(x, w_t, out=out)

    def layer_backward(self, j: int, g: Tensor, out: Tensor) -> None:
        """out = g @ W_j for every run: ``g``, ``out`` (R, B, n)."""
        R = g.shape[0]
        self.feedback_into(j * R, g, out)


def _given(t: Optional[Tensor]) -> Tensor:
    assert t is not None  # set together with the hidden stack
    return t
