"""Error optimization: inference over the prediction errors instead of the activities (``inference.solver=error``).

Given x_0, the map e -> x is the forward recursion ``x_l = mu_l(x_{l-1}) + e_l``: triangular, so a bijection, and
``G(e) = E(x(e))`` has exactly the minimizers of E; at e = 0 it is the feedforward pass (Goemaere, Oliviers, Bogacz,
Demeester, arXiv 2505.20137; ``shared/equilibrium-notes.md``). Its gradient is

    dG/de_l = eps_l + d_l,   d_{L-1} = dl/dx_{L-1} = -eps_L W_L,   d_{l-1} = (f'(a_l) * d_l) W_l

(d_l: the output term's gradient backpropagated to x_l through the recursion, the errors held): every layer hears
the output at every step, where state descent moves the error down one layer per step. At the minimum
``eps_l = -d_l``, the state equilibrium's condition, so the weight update there is the same.

G's Hessian is ``P + J^T H_out J`` (P the precisions, J the Jacobian of the output from the errors, rank <= n_out):
a few stiff directions beside a bulk at P. Plain gradient descent with one step size is slow there (measured: an
8-layer tanh net at width 256 has lambda_max ~ 100 at S = 1). Nonlinear conjugate gradients (Polak-Ribiere+),
each sample on its own, with the step along each direction from the Gauss-Newton curvature ``p^T (P + J^T H_out
J) p`` (one forward-mode pass), resolve those directions in a handful of steps and need no step size.
Every tensor carries the engine's run dimension: solo runs and packs alike.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pcsweep.pc.energy import output_losses
from pcsweep.pc.kernels import affine
from pcsweep.pc.solvers import Solver


def _per_sample(t: Tensor) -> Tensor:
    """(H, R, B, n) summed to (R, B): over the neurons, then over the layers in order, so that each sample's sum is
    the same arithmetic whatever R (a pack's run then follows its solo run's search to rounding)."""
    return t.sum(dim=3).sum(dim=0)


class ErrorOptimization(Solver):
    """Error optimization over an engine's buffers (a ``solvers.Solver``): the errors ``E`` are the variables, the
    activities follow from them. ``step`` is one conjugate-gradient step for every sample of every moving run."""

    solo_2d_kernels = False  # one batched kernel at any R: a pack's run follows its solo run's search to rounding

    # ------------------------------------------------------------ class facts
    @classmethod
    def min_steps(cls, hidden_layers: int, check_every: int) -> int:
        """Every layer hears the output at the first step: one check interval."""
        return check_every

    # ------------------------------------------------------------ buffers
    def allocate(self) -> None:
        like = self.engine.store.X
        self.D = torch.zeros_like(like)  # d_l: the output's gradient backpropagated to each hidden activity
        self.grad = torch.zeros_like(like)  # dG/de
        self.new_grad = torch.zeros_like(like)
        self.direction = torch.zeros_like(like)
        self.before = torch.zeros_like(like)  # the errors before a step, to undo it for a sample whose energy rose
        self.scratch = torch.zeros_like(like[0])  # (R, B, n)
        self.sq_norm = torch.zeros(like.shape[1:3], dtype=like.dtype, device=like.device)  # (R, B): |dG/de|^2
        self.moving: Optional[Tensor] = None  # (R, 1) 1 for a run that moves, 0 for a held one; None: all move
        # per sample: the energy at the current errors, and the damping of the Gauss-Newton step (see ``step``)
        self.energy = torch.zeros_like(self.sq_norm)
        self.damping = torch.ones_like(self.sq_norm)

    # ---------------------------------------------------------------- the recursion and its gradient
    def forward(self) -> None:
        """Every activity from the errors: x_l = f(W_l x_{l-1} + b_l) + e_l, l = 1..L-1, then a_L and the errors'
        precision-weighted forms (the errors themselves are the variables, never recomputed from x)."""
        self.engine.feed_input()
        eng = self.engine.store
        act, products = self.engine.activation, eng.products
        for l in range(eng.H):
            if l > 0:
                products.layer_forward(l - 1, eng.X[l - 1], eng.A[l])
            act.forward(eng.A[l], eng.MU[l])
            torch.add(eng.MU[l], eng.E[l], out=eng.X[l])
        act.derivative(eng.A, eng.MU, eng.FP)
        affine(eng.aL, eng.b_out, eng.X[-1], eng.w_out_t, two_d=False)
        self.engine.weighted_errors()

    def gradient(self, out: Tensor) -> None:
        """dG/de into ``out``: the backward chain d, then eps + d."""
        eng, D = self.engine.store, self.D
        torch.bmm(eng.epsL, eng.w_out, out=D[-1])
        D[-1].neg_()
        products = eng.products
        for l in range(eng.H - 1, 0, -1):
            torch.mul(eng.FP[l], D[l], out=self.scratch)
            products.layer_backward(l - 1, self.scratch, D[l - 1])
        torch.add(eng.EPS, D, out=out)

    def _sample_energies(self) -> Tensor:
        """(R, B) each sample's error energy at the current errors."""
        eng = self.engine.store
        hidden = 0.5 * _per_sample(eng.E * eng.EPS)
        if eng.output_loss == "ce":  # the output's energy is its loss
            return hidden + output_losses(eng.aL, eng.target, "ce")
        return hidden + 0.5 * (eng.eL * eng.epsL).sum(-1)  # the precision-weighted Gaussian: e . eps

    def _curvature(self, p: Tensor) -> Tensor:
        """(R, B) curvature of G along ``p``: the Gauss-Newton term p^T P p + (J p)^T H_out (J p), plus the hidden
        nonlinearity's own term sum_l d_l . f''(a_l) (da_l)^2 where that is positive (d_l = dl/dx_l, da_l the
        tangent of the pre-activation; a negative one would only lengthen the step past Gauss-Newton's)."""
        eng = self.engine.store
        second = self.engine.activation.second
        precision = eng.p_hid
        quad = _per_sample(p * p * precision if precision is not None else p * p)
        own = torch.zeros_like(quad)
        jp = p[0].clone()  # forward mode through the recursion: dx_l = f'(a_l) (dx_{l-1} W_l^T) + p_l
        products = eng.products
        for l in range(1, eng.H):
            products.layer_forward(l - 1, jp, self.scratch, bias=False)  # da_l
            if second is not None:
                own += (self.D[l] * second(eng.MU[l], eng.FP[l]) * self.scratch * self.scratch).sum(-1)
            jp = self.scratch.mul(eng.FP[l]).add_(p[l])
        da = torch.bmm(jp, eng.w_out.transpose(1, 2))  # the output's change (R, B, n_out)
        if eng.output_loss == "ce":
            s = torch.softmax(eng.aL, dim=-1)
            return quad + (s * da * da).sum(-1) - (s * da).sum(-1).pow(2) + own.clamp_min(0.0)
        weighted = da * da if eng.p_out is None else da * da * eng.p_out
        return quad + weighted.sum(-1) + own.clamp_min(0.0)

    # ---------------------------------------------------------------- the solver
    def start(self) -> None:
        """At the feedforward state (e = 0): the gradient, and steepest descent as the first direction."""
        self.moving = None
        self.gradient(self.grad)
        torch.neg(self.grad, out=self.direction)
        self.sq_norm = _per_sample(self.grad * self.grad)
        self.energy = self._sample_energies()
        self.damping.fill_(1.0)

    def hold(self, moving: Sequence[bool]) -> None:
        """Runs with False keep their errors as they are."""
        like = self.engine.store.X
        self.moving = torch.tensor(list(moving), dtype=like.dtype, device=like.device).view(-1, 1)

    def recompute(self) -> None:
        """After the parameters changed: the activities and the gradient at the same errors (the search goes on)."""
        self.forward()
        self.gradient(self.grad)

    def step(self) -> None:
        """One Polak-Ribiere+ step per sample: e += alpha p with alpha = -g.p / (damping * p^T H p), then
        p <- -g' + max(0, g'.(g' - g) / g.g) p (H: Gauss-Newton, or the exact curvature where larger).

        A step that raised a sample's energy is undone for that sample (its errors as before the step), which
        restarts from steepest descent with four times the damping; each step that lowers it halves the damping
        again (down to 1)."""
        self.engine.front = 0  # every error moves at once: no front
        p, g, tiny = self.direction, self.grad, torch.finfo(self.direction.dtype).tiny
        curvature = self._curvature(p) * self.damping
        slope = _per_sample(g * p)
        alpha = torch.where(curvature > 0, -slope / curvature.clamp_min(tiny), 0.0)
        if self.moving is not None:
            alpha = alpha * self.moving
        E = self.engine.store.E
        self.before.copy_(E)
        E.addcmul_(p, alpha.unsqueeze(0).unsqueeze(-1))
        self.forward()
        new = self.new_grad
        self.gradient(new)
        energy = self._sample_energies()
        # a rise beyond rounding (near the minimum the energy's last digits are noise, and a pack must decide as its
        # runs alone would)
        rose = energy > self.energy + 64 * torch.finfo(energy.dtype).eps * self.energy.abs()
        if bool(rose.any()):  # undo for those samples: back to the errors (and so the state) before the step
            torch.where(rose.unsqueeze(0).unsqueeze(-1), self.before, E, out=E)
            self.forward()
            self.gradient(new)
            energy = torch.where(rose, self.energy, self._sample_energies())
        self.damping = torch.where(rose, self.damping * 4.0, (self.damping * 0.5).clamp_min(1.0))
        new_sq = _per_sample(new * new)
        cross = _per_sample(new * g)
        beta = torch.where(self.sq_norm > 0, (new_sq - cross) / self.sq_norm.clamp_min(tiny), 0.0).clamp_min(0.0)
        beta = torch.where(rose, 0.0, beta)
        p.mul_(beta.unsqueeze(0).unsqueeze(-1)).sub_(new)
        self.grad, self.new_grad, self.sq_norm, self.energy = new, g, new_sq, energy
