"""Slow, obviously right PC: the functions of ``pcsweep.pc.energy`` driven by the same schedule as the fast engine.

``ReferencePC(gradients="plain")`` steps with the hand-derived gradients, ``gradients="autograd"`` with
``torch.autograd.grad`` of ``energy`` itself: a disagreement between the two is a bug in a derivation, one between
either and ``pcsweep.pc.engine`` a bug in the speed machinery. ``python -m pcsweep.bench`` times all three.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from pcsweep.pc import energy as pc
from pcsweep.pc.energy import Network
from pcsweep.pc.schedule import BatchResult, Inference, train_batch


def autograd_activity_gradients(net: Network, xs: Sequence[Tensor]) -> list[Tensor]:
    """dE_sum/dx_l for the hidden layers, by autograd of the energy."""
    with torch.enable_grad():
        hidden = [x.detach().requires_grad_(True) for x in xs[1:-1]]
        return list(torch.autograd.grad(pc.energy(net, [xs[0]] + hidden + [xs[-1]]).sum(), hidden))


def autograd_parameter_gradients(net: Network, xs: Sequence[Tensor]) -> list[Tensor]:
    """dE_mean/dtheta in the order of ``net.parameters()``, by autograd of the energy."""
    with torch.enable_grad():
        return list(torch.autograd.grad(pc.energy(net, [x.detach() for x in xs]).mean(), net.parameters()))


class ReferencePC:
    """A ``schedule.Stepper`` of one run over per-layer lists (no buffers, nothing cached); heavy ball included."""

    def __init__(self, network: Network, inference: Inference = Inference(), gradients: str = "plain") -> None:
        if gradients not in ("plain", "autograd"):
            raise ValueError(f"gradients must be 'plain' or 'autograd', got {gradients!r}")
        if inference.fixed_predictions:
            raise ValueError("the reference implements PC's own predictions only (no FixedPred)")
        self.net, self.inference, self.gradients = network, inference, gradients
        self.output_loss = network.output_loss
        self.hidden_layers = network.num_layers - 1
        self.xs: list[Tensor] = []
        self.velocity: list[Tensor] = []

    def start(self, inputs: Tensor, target: Tensor) -> Tensor:
        self.xs, logits = pc.feedforward(self.net, inputs[0], target[0])  # (1, B, n): one run
        self.velocity = [torch.zeros_like(x) for x in self.xs[1:-1]]
        return logits[None]

    def step(self) -> None:
        if self.gradients == "plain":
            grads = pc.activity_gradients(self.net, pc.errors(self.net, self.xs))
        else:
            grads = autograd_activity_gradients(self.net, self.xs)
        beta, gamma = self.inference.momentum, self.inference.step_size
        self.velocity = [beta * v - gamma * g for v, g in zip(self.velocity, grads)]
        self.xs = [self.xs[0]] + [x + v for x, v in zip(self.xs[1:-1], self.velocity)] + [self.xs[-1]]

    def recompute(self) -> None:
        pass  # errors are computed from the activities when needed

    def error_energies(self) -> Tensor:
        return pc.energy(self.net, self.xs, log_variance_term=False).mean().reshape(1)

    def residuals(self) -> Tensor:
        grads = pc.activity_gradients(self.net, pc.errors(self.net, self.xs))
        return torch.cat(grads, dim=1).norm(dim=1)[None]  # (1, B): per sample

    def hold(self, moving) -> None:
        pass  # one run: the loop ends when it stops

    def write_gradients(self) -> None:
        if self.gradients == "plain":
            grads = pc.parameter_gradients(self.net, self.xs, pc.errors(self.net, self.xs))
        else:
            grads = autograd_parameter_gradients(self.net, self.xs)
        for p, g in zip(self.net.parameters(), grads):
            p.grad = g

    def parameters_changed(self) -> None:
        pass

    def log_variance_energies(self) -> Tensor:
        return pc.log_variance_energy(self.net).reshape(1)

    def train_batch(
        self, inputs: Tensor, target: Tensor, apply_update: Callable[[], None], trace_energy: bool = False
    ) -> BatchResult:
        return train_batch(self, self.inference, inputs, target, apply_update, trace_energy)
