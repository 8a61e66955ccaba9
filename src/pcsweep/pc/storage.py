"""Where the engine keeps its numbers: every run's parameters bound to views of (R, ...) stacks (so each run's own
optimizer updates them in place), and the (H, R, B, n) activity buffers with the views the loop's kernels take,
built once per batch size or parameter change. ``PCEngine`` (``pcsweep.pc.engine``) and its solver compute on them;
a solver's own buffers (a velocity, a search direction) are its own."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, cast

import torch
from torch import Tensor

from pcsweep.pc.energy import Network
from pcsweep.pc.kernels import HiddenProducts, Tricks
from pcsweep.pc.members import Member


def flat(t: Tensor) -> Tensor:
    """(layers, R, ...) as (layers * R, ...): one batched kernel over every layer of every run."""
    return t.flatten(0, 1)


@dataclass
class _Rows:
    """Flat views of the hidden buffers from layer row ``lo`` up (``below``: rows lo..H-2, ``above``: lo+1..H-1),
    built once per buffer change (a step would otherwise make its views anew, each as dear as an elementwise kernel)."""

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


class EngineStorage:
    """The parameter stacks and buffers of R runs of one shape (``members``), owned by one ``PCEngine``."""

    def __init__(self, members: list[Member], tricks: Tricks) -> None:
        net = members[0].network
        self.members, self.tricks = members, tricks
        self.R, self.L, self.sizes = len(members), net.num_layers, net.sizes
        self.H = self.L - 1
        self.output_loss = net.output_loss
        self.buffers_for: Optional[tuple] = None  # (batch, dtype, device) of the buffers, once allocated
        self._bindings: list[tuple[Tensor, Tensor, Tensor]] = []
        self._views_stale = True

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
        self.products = HiddenProducts(self.w_hid, self.b_hid, self.tricks, self._hidden_versions)
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
        """Re-derive what depends on the parameters alone (floors applied, the products' copies and the views)."""
        if not self.bound():
            self._stack_parameters()
        with torch.no_grad():
            if self.s_hid is not None:
                self._floor(self.s_hid, 1)
                torch.exp(-self.s_hid, out=cast(Tensor, self.p_hid).squeeze(2))
            if self.s_out is not None:
                self._floor(self.s_out, 0)
                torch.exp(-self.s_out, out=cast(Tensor, self.p_out).squeeze(1))
        self.products.refresh(None if self.buffers_for is None else self.buffers_for[0])
        if self._views_stale and self.buffers_for is not None:
            self._build_views()

    # ----------------------------------------------------------------- buffers
    def allocate(self, batch: int, like: Tensor) -> bool:
        """Buffers for ``batch`` samples like ``like``; False when the ones there already fit."""
        key = (batch, like.dtype, like.device)
        if self.buffers_for == key:
            return False
        H, R, n, n_out = self.H, self.R, self.sizes[1], self.sizes[-1]

        def new(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=like.dtype, device=like.device)

        self.X, self.A, self.MU, self.FP, self.E, self.G = (new(H, R, batch, n) for _ in range(6))
        self.EPS = new(H, R, batch, n) if self.s_hid is not None else self.E
        self.x0, self.target = new(R, batch, self.sizes[0]), new(R, batch, n_out)
        self.aL, self.eL = new(R, batch, n_out), new(R, batch, n_out)
        separate = self.s_out is not None or self.output_loss == "ce"
        self.epsL = new(R, batch, n_out) if separate else self.eL
        self.feedback = new(max(H - 1, 1) * R, batch, n)  # g_{l+1} W_{l+1} when runs take different steps
        self.top_feedback = new(R, batch, n)
        self.gradient = new(H, R, batch, n)  # dE/dx, for the residual
        self.buffers_for = key
        self._views_stale = True  # built by the refresh_parameters that follows
        return True

    def _build_views(self) -> None:
        """Views of the buffers and parameters the loop's kernels take, and run 0's per-layer lists."""
        H, X = self.H, self.X
        self.rows = [
            _Rows(
                flat(X[lo:]),
                flat(self.A[lo:]),
                flat(self.MU[lo:]),
                flat(self.FP[lo:]),
                flat(self.E[lo:]),
                flat(self.EPS[lo:]),
                flat(self.G[lo:]),
                flat(X[lo:-1]),
                flat(self.A[lo + 1 :]),
                flat(self.G[lo + 1 :]),
            )
            for lo in range(H)
        ]
        self.precision_rows = None if self.p_hid is None else flat(self.p_hid)
        self.w_in_t, self.w_out_t = self.w_in.transpose(1, 2), self.w_out.transpose(1, 2)
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
