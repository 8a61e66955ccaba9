"""2-D loss landscapes around trained weights (Li et al. 2018), computed many grid points per forward pass.

Two random Gaussian directions, filter-normalized: each row of a direction (one neuron's incoming weights) is
rescaled to the norm of that row of the trained weights, so every neuron is perturbed in proportion to its own
scale. Biases and variances are not perturbed. The loss is the feedforward pass's output loss (the objective both
twins share) on a fixed subset of the training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from pcsweep.pc import energy
from pcsweep.pc.energy import get_activation


def filter_normalized_direction(weights: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """A Gaussian direction per weight matrix with each row rescaled to that row's norm in ``weights``."""
    directions = []
    for w in weights:
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.dtype)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12) * w.norm(dim=1, keepdim=True)
        directions.append(d.to(w.device))
    return directions


def directions(weights: Sequence[Tensor], seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """The two directions of the plane, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return filter_normalized_direction(weights, generator), filter_normalized_direction(weights, generator)


@dataclass
class Landscape:
    alphas: Tensor  # (n,)
    betas: Tensor  # (n,)
    losses: Tensor  # (n, n): losses[i, j] at alphas[i] * d1 + betas[j] * d2 (the trained model's in the middle)

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "betas": self.betas, "losses": self.losses}


@dataclass(frozen=True, eq=False)
class Objective:
    """The training loss of an MLP at fixed data, as a function of its weights: the trained weights (where the
    landscape is centered), the biases (never perturbed), a fixed data subset and the loss the twins train on."""

    weights: Sequence[Tensor]
    biases: Sequence[Tensor]
    inputs: Tensor
    target: Tensor
    activation: str = "tanh"
    loss: str = "mse"

    def at(self, weights: Sequence[Tensor]) -> Tensor:
        """The loss with ``weights`` in place of the trained ones (differentiable in ``weights``)."""
        return output_loss(weights, self.biases, self.inputs, self.target, self.activation, self.loss)

    def on_plane(self, d1: Sequence[Tensor], d2: Sequence[Tensor], alphas: Tensor, betas: Tensor) -> Tensor:
        """The loss at the trained weights + ``alphas[g] * d1 + betas[g] * d2`` for every g, shape (G,)."""
        device = self.inputs.device
        return batched_losses(
            self.weights,
            self.biases,
            d1,
            d2,
            alphas.to(device),
            betas.to(device),
            self.inputs,
            self.target,
            self.activation,
            self.loss,
        )


@torch.no_grad()
def batched_losses(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    d1: Sequence[Tensor],
    d2: Sequence[Tensor],
    alphas: Tensor,
    betas: Tensor,
    inputs: Tensor,
    target: Tensor,
    activation: str,
    loss: str,
) -> Tensor:
    """Loss at each (alphas[g], betas[g]): all G points in one batched forward pass, shape (G,)."""
    act = get_activation(activation).fn
    G = alphas.shape[0]
    h = inputs.unsqueeze(0).expand(G, *inputs.shape)
    a = alphas.view(G, 1, 1).to(inputs.dtype)
    b = betas.view(G, 1, 1).to(inputs.dtype)
    L = len(weights)
    for l, (w, bias, u, v) in enumerate(zip(weights, biases, d1, d2)):
        w_g = w.unsqueeze(0) + a * u.unsqueeze(0) + b * v.unsqueeze(0)  # (G, out, in)
        h = torch.baddbmm(bias.view(1, 1, -1), h, w_g.transpose(1, 2))
        if l < L - 1:
            h = act(h)
    # the loss the twins train on (its batch mean), per grid point: vmap maps it over the G points in one pass
    return torch.vmap(energy.output_loss, in_dims=(0, None, None))(h, target, loss)


def landscape(
    objective: Objective,
    span: float = 1.0,
    resolution: int = 41,
    seed: int = 0,
    points_per_pass: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Landscape:
    """Losses of ``objective`` on a ``resolution`` x ``resolution`` grid over [-span, span]^2 around its trained
    weights."""
    d1, d2 = directions(objective.weights, seed)
    # exactly symmetric, with an exact 0 in the middle for odd sizes (linspace leaves ~1e-17 there)
    coords = (torch.arange(resolution, dtype=torch.float64) - (resolution - 1) / 2) * (
        2 * span / max(resolution - 1, 1)
    )
    grid_a, grid_b = torch.meshgrid(coords, coords, indexing="ij")
    flat_a, flat_b = grid_a.flatten(), grid_b.flatten()
    out = torch.empty(flat_a.shape[0], dtype=torch.float64)
    total = flat_a.shape[0]
    for start in range(0, total, points_per_pass):
        stop = min(start + points_per_pass, total)
        out[start:stop] = objective.on_plane(d1, d2, flat_a[start:stop], flat_b[start:stop]).double().cpu()
        if progress is not None:
            progress(stop, total)
    return Landscape(coords, coords.clone(), out.view(resolution, resolution))


# ------------------------------------------------------------------------------------------------ shape as numbers
def output_loss(
    weights: Sequence[Tensor], biases: Sequence[Tensor], inputs: Tensor, target: Tensor, activation: str, loss: str
) -> Tensor:
    """The feedforward output loss the landscape plots (differentiable in ``weights``)."""
    act = get_activation(activation).fn
    h = inputs
    for l, (w, b) in enumerate(zip(weights, biases)):
        h = torch.addmm(b, h, w.t())
        if l < len(weights) - 1:
            h = act(h)
    return energy.output_loss(h, target, loss)


def hessian_extremes(objective: Objective, iterations: int = 40, seed: int = 0) -> dict:
    """The extreme eigenvalues of ``objective``'s Hessian over all weights at the trained point, by Lanczos on
    Hessian-vector products (full reorthogonalization; the extreme Ritz values converge first). Li et al. (2018)
    read convexity from ``|lambda_min / lambda_max|``: near 0, the loss curves up in (nearly) every direction."""
    params = [w.detach().clone().requires_grad_(True) for w in objective.weights]
    value = objective.at(params)
    grads = torch.autograd.grad(value, params, create_graph=True)
    flat_grad = torch.cat([g.flatten() for g in grads])

    def hvp(v: Tensor) -> Tensor:
        out = torch.autograd.grad(flat_grad, params, grad_outputs=v, retain_graph=True)
        return torch.cat([o.flatten() for o in out])

    n = flat_grad.numel()
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=generator, dtype=torch.float64).to(flat_grad)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for k in range(min(iterations, n)):
        w = hvp(basis[-1])
        alphas.append(float(w @ basis[-1]))
        for b in basis:  # full reorthogonalization (k is small): no ghost eigenvalues
            w = w - (w @ b) * b
        beta = float(w.norm())
        if beta < 1e-10 or k == iterations - 1:
            break
        betas.append(beta)
        basis.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(T)
    lam_min, lam_max = float(ritz[0]), float(ritz[-1])
    return {
        "lambda_min": lam_min,
        "lambda_max": lam_max,
        "ratio": abs(lam_min / lam_max) if lam_max != 0 else float("inf"),
        "iterations": len(alphas),
    }


@torch.no_grad()
def sharpness(objective: Objective, radius: float = 0.1, directions: int = 16, seed: int = 0) -> dict:
    """How fast ``objective`` grows away from the trained point: the mean loss increase at ``radius`` along random
    filter-normalized directions (the scale the landscapes are drawn in, so twins of different weight norms compare)."""
    generator = torch.Generator().manual_seed(seed)
    center = float(objective.at(objective.weights))
    rises = []
    for _ in range(directions):
        d = filter_normalized_direction(objective.weights, generator)
        moved = [w + radius * u for w, u in zip(objective.weights, d)]
        rises.append(float(objective.at(moved)) - center)
    mean = sum(rises) / len(rises)
    return {
        "radius": radius,
        "center_loss": center,
        "increase": mean,
        "relative_increase": mean / center if center > 0 else float("inf"),
    }


def plane_convexity(losses: Tensor, coords: Tensor, threshold: float = 0.1) -> dict:
    """Li et al.'s convexity map on the plotted plane: at every interior grid point, the eigenvalues of the 2x2
    finite-difference Hessian of the loss; a point is convex when ``max(-lambda_min, 0) / lambda_max`` is at most
    ``threshold``. Returns the convex fraction of the plane and the radius of the convex disc around the minimum
    (the distance to the nearest non-convex point; the half-width if there is none)."""
    z = losses.double()
    h = float(coords[1] - coords[0])
    zaa = (z[2:, 1:-1] - 2 * z[1:-1, 1:-1] + z[:-2, 1:-1]) / h**2
    zbb = (z[1:-1, 2:] - 2 * z[1:-1, 1:-1] + z[1:-1, :-2]) / h**2
    zab = (z[2:, 2:] - z[2:, :-2] - z[:-2, 2:] + z[:-2, :-2]) / (4 * h**2)
    mean, root = (zaa + zbb) / 2, torch.sqrt(((zaa - zbb) / 2) ** 2 + zab**2)
    lam_max, lam_min = mean + root, mean - root
    nonconvex = torch.where(
        lam_max > 0, (-lam_min).clamp_min(0) / lam_max.clamp_min(1e-300), torch.full_like(lam_max, float("inf"))
    )
    convex = nonconvex <= threshold
    a, b = torch.meshgrid(coords[1:-1].double(), coords[1:-1].double(), indexing="ij")
    radius = torch.sqrt(a**2 + b**2)
    span = float(coords[-1])
    return {
        "convex_fraction": float(convex.double().mean()),
        "convex_radius": float(radius[~convex].min()) if bool((~convex).any()) else span,
        "span": span,
        "threshold": threshold,
    }
