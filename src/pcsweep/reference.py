"""The same PC energy written for autograd: the reference the fast engine is tested and benchmarked against.

Nothing here is hand-derived: activities and parameters get ``torch.autograd.grad`` of ``energy`` itself, so a
disagreement with ``pcsweep.pc`` is a bug in the hand-written gradients (or in this transcription of the energy).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from pcsweep.pc import BatchResult, Network, output_loss


def energy_per_sample(net: Network, activities: Sequence[Tensor], log_variance_term: bool = True) -> Tensor:
    """E for each sample (shape (B,)), predictions recomputed from ``activities`` (x_0 .. x_L); without the
    0.5 log S term when ``log_variance_term`` is False (the error energy)."""
    L = net.num_layers
    total = torch.zeros(activities[0].shape[0], dtype=activities[0].dtype, device=activities[0].device)
    for l in range(1, L + 1):
        a = activities[l - 1] @ net.weights[l - 1].t() + net.biases[l - 1]
        if l == L and net.output_loss == "ce":
            total = total - (activities[L] * torch.log_softmax(a, dim=1)).sum(dim=1)
            continue
        mu = a if l == L else net.activation.fn(a)
        e = activities[l] - mu
        log_s: Optional[Tensor] = net.log_variances[l - 1]
        if log_s is None:
            total = total + 0.5 * e.pow(2).sum(dim=1)
        else:
            n = e.shape[1]
            total = total + 0.5 * (e.pow(2) * torch.exp(-log_s)).sum(dim=1)
            if log_variance_term:
                total = total + 0.5 * log_s.expand(n).sum()
    return total


def feedforward_activities(net: Network, inputs: Tensor, target: Tensor) -> tuple[list[Tensor], Tensor]:
    """x_l <- mu_l, then x_L <- target; also returns the feedforward logits."""
    xs = [inputs]
    for l in range(1, net.num_layers + 1):
        a = xs[-1] @ net.weights[l - 1].t() + net.biases[l - 1]
        xs.append(a if l == net.num_layers else net.activation.fn(a))
    logits = xs[-1]
    xs[-1] = target
    return [x.detach() for x in xs[:-1]] + [target], logits.detach()


def activity_gradients(net: Network, activities: Sequence[Tensor]) -> list[Tensor]:
    """dE_sum/dx_l for the hidden layers (each sample's own gradient)."""
    hidden = [x.detach().requires_grad_(True) for x in activities[1:-1]]
    xs = [activities[0]] + hidden + [activities[-1]]
    return list(torch.autograd.grad(energy_per_sample(net, xs).sum(), hidden))


def parameter_gradients(net: Network, activities: Sequence[Tensor]) -> list[Tensor]:
    """dE_mean/dtheta in the order of ``net.parameters()``."""
    params = net.parameters()
    with torch.enable_grad():
        return list(torch.autograd.grad(energy_per_sample(net, activities).mean(), params))


class AutogradPC:
    """Plain PC training by autograd of the energy at every step: slow, obviously right."""

    def __init__(self, network: Network, steps: int = 256, step_size: float = 0.1, update_every: Optional[int] = None,
                 momentum: float = 0.0):
        self.net, self.steps, self.step_size, self.update_every = network, steps, step_size, update_every
        self.momentum = momentum

    def train_batch(self, inputs: Tensor, target: Tensor, apply_update: Callable[[], None]) -> BatchResult:
        with torch.no_grad():
            xs, logits = feedforward_activities(self.net, inputs, target)
        loss = output_loss(logits, target, self.net.output_loss)
        energy_start = energy_per_sample(self.net, xs, log_variance_term=False).mean().detach()
        every = self.update_every or self.steps
        updates = 0
        velocity = [torch.zeros_like(x) for x in xs[1:-1]]
        with torch.enable_grad():
            for t in range(1, self.steps + 1):
                grads = activity_gradients(self.net, xs)
                velocity = [self.momentum * v - self.step_size * g for v, g in zip(velocity, grads)]
                xs = [xs[0]] + [x + v for x, v in zip(xs[1:-1], velocity)] + [xs[-1]]
                if t == self.steps:  # after the last inference step, before the last weight update
                    energy_end = energy_per_sample(self.net, xs, log_variance_term=False).mean().detach()
                if t % every == 0:
                    for p, g in zip(self.net.parameters(), parameter_gradients(self.net, xs)):
                        p.grad = g
                    apply_update()
                    updates += 1
        return BatchResult(loss, logits, energy_start, energy_end, updates, steps_used=self.steps)
