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
        lambda a, fa, out: torch.addcmul(torch.ones_like(fa[:1]), fa, fa, value=-1.0, out=out),
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
    energy_start: Tensor  # mean energy per sample right after the output is clamped
    energy_end: Tensor  # mean energy per sample after the last inference step (before the last weight update)
    updates: int  # weight updates applied
    energy_trace: Optional[Tensor] = None  # (T + 1,) mean energy per sample after each step, when asked for


class PCEngine:
    """Runs inference and learning for one network; buffers are allocated once per batch size and reused.

    ``update_every=None`` is condition 2 enforced (one weight update after ``steps`` inference steps); an integer k
    updates the weights every k steps from the current activities (relaxed). ``fixed_predictions`` holds every
    prediction at its feedforward value (Rosenbaum's FixedPred), which with ``step_size=1`` and ``>= L`` steps turns
    the weight updates into BP's gradients exactly.
    """

    def __init__(
        self,
        network: Network,
        steps: int = 256,
        step_size: float = 0.1,
        update_every: Optional[int] = None,
        log_variance_min: float = -math.inf,
        fixed_predictions: bool = False,
    ) -> None:
        if steps < 1:
            raise ValueError(f"inference steps must be >= 1, got {steps}")
        if update_every is not None and not 1 <= update_every <= steps:
            raise ValueError(f"update_every must be in [1, steps={steps}], got {update_every}")
        if step_size <= 0:
            raise ValueError(f"inference step size must be > 0, got {step_size}")
        self.net = network
        self.steps = steps
        self.step_size = step_size
        self.update_every = update_every
        self.log_variance_min = log_variance_min
        self.fixed_predictions = fixed_predictions
        self._buffers_for: Optional[tuple] = None
        self.refresh_parameters()

    # ----------------------------------------------------------------- buffers
    def _allocate(self, batch: int, like: Tensor) -> None:
        key = (batch, like.dtype, like.device)
        if self._buffers_for == key:
            return
        sizes = self.net.sizes
        L = self.net.num_layers

        def new(n: int) -> Tensor:
            return torch.empty(batch, n, dtype=like.dtype, device=like.device)

        # index l = 0..L; entries for l = 0 are unused except x[0]
        self.x = [new(n) for n in sizes]
        self.a = [None] + [new(n) for n in sizes[1:]]
        self.mu = [None] + [new(n) for n in sizes[1:L]] + [None]  # output is linear: mu_L is a_L
        self.fprime = [None] + [new(n) for n in sizes[1:L]] + [None]
        self.e = [None] + [new(n) for n in sizes[1:]]
        self.eps = [None] + [
            (new(n) if self.net.log_variances[l - 1] is not None or (l == L and self.net.output_loss == "ce") else self.e[l])
            for l, n in enumerate(sizes[1:], start=1)
        ]
        self.g = [None] + [new(n) for n in sizes[1:L]] + [self.eps[L]]
        self._buffers_for = key

    def refresh_parameters(self) -> None:
        """Re-derive what depends on the parameters alone; call after every optimizer step."""
        self.precisions: list[Optional[Tensor]] = []
        with torch.no_grad():
            for log_s in self.net.log_variances:
                if log_s is None:
                    self.precisions.append(None)
                else:
                    if self.log_variance_min > -math.inf:
                        log_s.clamp_(min=self.log_variance_min)
                    self.precisions.append(torch.exp(-log_s))
        self._input_current = False  # a_1 = W_1 x_0 + b_1 must be recomputed

    # ----------------------------------------------------------------- the loop
    @torch.no_grad()
    def _predict(self, l: int) -> None:
        """a_l and mu_l, f'(a_l) from the current activities below."""
        L = self.net.num_layers
        W, b = self.net.weights[l - 1], self.net.biases[l - 1]
        if l > 1 or not self._input_current:
            torch.addmm(b, self.x[l - 1], W.t(), out=self.a[l])
            if l == 1:
                self._input_current = True
        if l < L:
            act = self.net.activation
            act.forward(self.a[l], self.mu[l])
            act.derivative(self.a[l], self.mu[l], self.fprime[l])

    @torch.no_grad()
    def compute_errors(self, predict: bool = True) -> None:
        """e_l, eps_l and g_l for every layer at the current activities (and predictions, unless FixedPred)."""
        L = self.net.num_layers
        for l in range(1, L + 1):
            if predict:
                self._predict(l)
            prec = self.precisions[l - 1]
            if l < L:
                torch.sub(self.x[l], self.mu[l], out=self.e[l])
                if prec is not None:
                    torch.mul(self.e[l], prec, out=self.eps[l])
                torch.mul(self.fprime[l], self.eps[l], out=self.g[l])
            elif self.net.output_loss == "mse":
                torch.sub(self.x[L], self.a[L], out=self.e[L])
                if prec is not None:
                    torch.mul(self.e[L], prec, out=self.eps[L])
            else:  # cross-entropy: eps_L = onehot - softmax(a_L); e_L keeps the same (no variance)
                torch.softmax(self.a[L], dim=1, out=self.eps[L])
                torch.sub(self.x[L], self.eps[L], out=self.eps[L])
                self.e[L].copy_(self.eps[L])

    @torch.no_grad()
    def inference_step(self) -> None:
        """One Jacobi step of gradient descent on the hidden activities (errors must be current)."""
        gamma = self.step_size
        L = self.net.num_layers
        for l in range(1, L):
            self.x[l].add_(self.eps[l], alpha=-gamma)
            self.x[l].addmm_(self.g[l + 1], self.net.weights[l], alpha=gamma)

    @torch.no_grad()
    def energy(self) -> Tensor:
        """Mean energy per sample at the current errors (a 0-d tensor, no host sync)."""
        L = self.net.num_layers
        B = self.x[0].shape[0]
        total = torch.zeros((), dtype=self.x[0].dtype, device=self.x[0].device)
        for l in range(1, L + 1):
            if l == L and self.net.output_loss == "ce":
                logp = torch.log_softmax(self.a[L], dim=1)
                total = total - (self.x[L] * logp).sum() / B
                continue
            prec = self.precisions[l - 1]
            if prec is None:
                total = total + 0.5 * self.e[l].pow(2).sum() / B
            else:
                log_s = self.net.log_variances[l - 1]
                n = self.e[l].shape[1]
                total = total + 0.5 * (self.e[l].pow(2) * prec).sum() / B
                total = total + 0.5 * log_s.expand(n).sum()
        return total

    @torch.no_grad()
    def weight_gradients(self) -> list[Tensor]:
        """Write dE/dtheta into every parameter's ``.grad`` (energy averaged over the batch).

        Returns the gradients in the order of ``Network.parameters()``.
        """
        L = self.net.num_layers
        B = self.x[0].shape[0]
        for l in range(1, L + 1):
            W, b = self.net.weights[l - 1], self.net.biases[l - 1]
            for p in (W, b):
                if p.grad is None:
                    p.grad = torch.empty_like(p)
            # FixedPred pairs each error with the feedforward activity below it, as backprop does
            presynaptic = self.mu[l - 1] if self.fixed_predictions and l > 1 else self.x[l - 1]
            torch.addmm(W.grad, self.g[l].t(), presynaptic, beta=0.0, alpha=-1.0 / B, out=W.grad)
            torch.sum(self.g[l], dim=0, out=b.grad).mul_(-1.0 / B)
            log_s = self.net.log_variances[l - 1]
            if log_s is not None:
                # mean_b 0.5 * (1 - e^2 / S), summed over the neurons that share one log S
                per_neuron = 0.5 - 0.5 * (self.e[l].pow(2).mean(dim=0) * self.precisions[l - 1])
                grad = per_neuron.sum().reshape(log_s.shape) if log_s.numel() == 1 else per_neuron.reshape(log_s.shape)
                if log_s.grad is None:
                    log_s.grad = grad.clone()
                else:
                    log_s.grad.copy_(grad)
        return [p.grad for p in self.net.parameters()]

    @torch.no_grad()
    def feedforward_init(self, inputs: Tensor, target: Tensor) -> None:
        """x_l <- mu_l for every layer, then clamp x_L to the target. Hidden errors are now exactly zero."""
        self._allocate(inputs.shape[0], inputs)
        self.x[0].copy_(inputs)
        self._input_current = False
        L = self.net.num_layers
        for l in range(1, L + 1):
            self._predict(l)
            if l < L:
                self.x[l].copy_(self.mu[l])
        self.x[L].copy_(target)

    def train_batch(
        self,
        inputs: Tensor,
        target: Tensor,
        apply_update: Callable[[], None],
        trace_energy: bool = False,
    ) -> BatchResult:
        """Feedforward init, clamp, ``steps`` inference steps with weight updates on schedule.

        ``apply_update`` is called after the gradients are written to ``.grad`` (typically ``optimizer.step``).
        """
        self.feedforward_init(inputs, target)
        self.compute_errors(predict=False)  # predictions are current from the feedforward pass
        logits = self.a[self.net.num_layers].clone()
        loss = output_loss(logits, target, self.net.output_loss)
        energy_start = self.energy()
        trace = [energy_start] if trace_energy else None
        every = self.update_every or self.steps
        updates = 0
        for t in range(1, self.steps + 1):
            self.inference_step()
            self.compute_errors(predict=not self.fixed_predictions)
            if trace is not None:
                trace.append(self.energy())
            if t == self.steps:  # before the last weight update changes the parameters it depends on
                energy_end = trace[-1] if trace is not None else self.energy()
            if t % every == 0:
                self.weight_gradients()
                apply_update()
                self.refresh_parameters()
                updates += 1
                if t < self.steps:
                    self.compute_errors(predict=not self.fixed_predictions)
        return BatchResult(
            loss=loss,
            logits=logits,
            energy_start=energy_start,
            energy_end=energy_end,
            updates=updates,
            energy_trace=torch.stack(trace) if trace is not None else None,
        )
