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

from pcsweep.pc import get_activation


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
    losses: Tensor  # (n, n): losses[i, j] at alphas[i] * d1 + betas[j] * d2
    center_loss: float

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "betas": self.betas, "losses": self.losses, "center_loss": self.center_loss}


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
    target_g = target.unsqueeze(0).expand(G, *target.shape)
    if loss == "mse":
        return 0.5 * (target_g - h).pow(2).sum(dim=2).mean(dim=1)
    return -(target_g * torch.log_softmax(h, dim=2)).sum(dim=2).mean(dim=1)


def landscape(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    inputs: Tensor,
    target: Tensor,
    activation: str = "tanh",
    loss: str = "mse",
    span: float = 1.0,
    resolution: int = 41,
    seed: int = 0,
    points_per_pass: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Landscape:
    """Losses on a ``resolution`` x ``resolution`` grid over [-span, span]^2 around the trained weights."""
    d1, d2 = directions(weights, seed)
    # exactly symmetric, with an exact 0 in the middle for odd sizes (linspace leaves ~1e-17 there)
    coords = (torch.arange(resolution, dtype=torch.float64) - (resolution - 1) / 2) * (2 * span / max(resolution - 1, 1))
    grid_a, grid_b = torch.meshgrid(coords, coords, indexing="ij")
    flat_a, flat_b = grid_a.flatten(), grid_b.flatten()
    out = torch.empty(flat_a.shape[0], dtype=torch.float64)
    total = flat_a.shape[0]
    for start in range(0, total, points_per_pass):
        stop = min(start + points_per_pass, total)
        out[start:stop] = batched_losses(weights, biases, d1, d2, flat_a[start:stop].to(inputs.device),
                                         flat_b[start:stop].to(inputs.device), inputs, target, activation,
                                         loss).double().cpu()
        if progress is not None:
            progress(stop, total)
    zero = torch.zeros(1, dtype=inputs.dtype, device=inputs.device)
    center = batched_losses(weights, biases, d1, d2, zero, zero, inputs, target, activation, loss).item()
    return Landscape(coords, coords.clone(), out.view(resolution, resolution), center)
