"""Predictive coding's math for an MLP, written from the energy: plain torch over per-layer lists, nothing cached.

Read it beside ``shared/paper.md``. Weight layers ``l = 1..L``; activities ``x_0`` (clamped to the input) .. ``x_L``
(clamped to the target while training); pre-activations ``a_l = x_{l-1} W_l^T + b_l``; predictions ``mu_l = f(a_l)``
(the output layer is linear); errors ``e_l = x_l - mu_l``; variances ``S_l``, stored as ``log S_l`` (fixed at 1 when
``log_variances[l]`` is ``None``). Per sample::

    E = sum_l sum_i [ e_{l,i}^2 / (2 S_{l,i}) + 0.5 log S_{l,i} ]

(with ``output_loss="ce"`` the output term is the cross-entropy of ``softmax(a_L)`` instead). Everything below uses
the precision-weighted error ``eps_l = e_l / S_l = -dE/dmu_l`` and ``g_l = f'(a_l) * eps_l = -dE/da_l``:

- activities descend ``dE/dx_l = eps_l - g_{l+1} W_{l+1}`` (the energy summed over the batch: samples move alone),
- weights descend ``dE/dW_l = -g_l^T x_{l-1} / B`` (the energy averaged over the batch, like BP's loss),
- log-variances descend ``dE/dlog S_l = mean_batch 0.5 (1 - e_l^2 / S_l)``.

``pcsweep.pc.engine`` computes the same quantities in preallocated layer-stacked buffers (that is all speed);
the tests check it against these functions and these against autograd of ``energy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

OUTPUT_LOSSES = ("mse", "ce")


@dataclass(frozen=True)
class Activation:
    """A hidden nonlinearity and its derivative; ``forward`` and ``derivative`` write into ``out`` (the fast engine
    allocates nothing). The derivative takes ``a`` and ``f(a)`` because tanh's and sigmoid's are cheapest from f(a)."""

    name: str
    fn: Callable[[Tensor], Tensor]  # differentiable: the MLP's forward pass, these functions, autograd
    forward: Callable[[Tensor, Tensor], Tensor]  # (a, out) -> out
    derivative: Callable[[Tensor, Tensor, Tensor], Tensor]  # (a, fa, out) -> out
    second: Optional[Callable[[Tensor, Tensor], Tensor]] = None  # (fa, f'(a)) -> f''(a); None: zero (piecewise linear)

    def prime(self, a: Tensor, fa: Tensor) -> Tensor:
        """f'(a) as a new tensor (not differentiated through: the gradients below are derived by hand)."""
        return self.derivative(a.detach(), fa.detach(), torch.empty_like(a))


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(
        "tanh",
        torch.tanh,
        lambda a, out: torch.tanh(a, out=out),
        lambda a, fa, out: torch.addcmul(out.fill_(1.0), fa, fa, value=-1.0, out=out),
        lambda fa, fp: -2.0 * fa * fp,
    ),
    "sigmoid": Activation(
        "sigmoid",
        torch.sigmoid,
        lambda a, out: torch.sigmoid(a, out=out),
        lambda a, fa, out: torch.addcmul(fa, fa, fa, value=-1.0, out=out),
        lambda fa, fp: fp * (1.0 - 2.0 * fa),
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
    per neuron, or one per layer.
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


def output_losses(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """Each sample's output loss (the last dimension is the outputs'): Gaussian (0.5 * squared error summed over
    the outputs) or cross-entropy, to a one-hot ``target``."""
    if kind == "mse":
        return 0.5 * (target - logits).pow(2).sum(dim=-1)
    if kind == "ce":
        return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    raise ValueError(f"unknown output loss {kind!r}; choose one of {OUTPUT_LOSSES}")


def output_loss(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """The loss both twins train on: ``output_losses`` averaged over the batch."""
    return output_losses(logits, target, kind).mean()


def feedforward(net: Network, inputs: Tensor, target: Tensor) -> tuple[list[Tensor], Tensor]:
    """Inference's starting point: ``x_l <- mu_l`` for every layer, then ``x_L <- target``; also the logits."""
    xs = [inputs]
    for l in range(1, net.num_layers + 1):
        a = xs[-1] @ net.weights[l - 1].t() + net.biases[l - 1]
        xs.append(a if l == net.num_layers else net.activation.fn(a))
    return xs[:-1] + [target], xs[-1]


@dataclass
class Errors:
    """Per weight layer l = 1..L (list index l - 1): a_l, mu_l, f'(a_l), e_l, eps_l = e_l / S_l and g_l = f'(a_l) eps_l.
    For a cross-entropy output, eps_L = target - softmax(a_L) = -dE/da_L, and e_L is the same."""

    a: list[Tensor]
    mu: list[Tensor]
    fprime: list[Tensor]
    e: list[Tensor]
    eps: list[Tensor]
    g: list[Tensor]


def errors(net: Network, xs: Sequence[Tensor]) -> Errors:
    """Every layer's prediction and error from the activities ``xs`` (x_0 .. x_L)."""
    L, out = net.num_layers, Errors([], [], [], [], [], [])
    for l in range(1, L + 1):
        a = xs[l - 1] @ net.weights[l - 1].t() + net.biases[l - 1]
        mu = a if l == L else net.activation.fn(a)
        fprime = torch.ones_like(a) if l == L else net.activation.prime(a, mu)
        if l == L and net.output_loss == "ce":
            e = eps = xs[L] - torch.softmax(a, dim=1)
        else:
            e = xs[l] - mu
            log_s = net.log_variances[l - 1]
            eps = e if log_s is None else e * torch.exp(-log_s)
        for name, value in zip(("a", "mu", "fprime", "e", "eps", "g"), (a, mu, fprime, e, eps, fprime * eps)):
            getattr(out, name).append(value)
    return out


def energy(net: Network, xs: Sequence[Tensor], log_variance_term: bool = True) -> Tensor:
    """E of each sample (shape (B,)); without the 0.5 log S term when ``log_variance_term`` is False (the error
    energy: what inference lowers, comparable across twins). Differentiable: the reference takes autograd of it."""
    L = net.num_layers
    total = torch.zeros(xs[0].shape[0], dtype=xs[0].dtype, device=xs[0].device)
    for l in range(1, L + 1):
        a = xs[l - 1] @ net.weights[l - 1].t() + net.biases[l - 1]
        if l == L and net.output_loss == "ce":
            total = total - (xs[L] * torch.log_softmax(a, dim=1)).sum(dim=1)
            continue
        e = xs[l] - (a if l == L else net.activation.fn(a))
        log_s: Optional[Tensor] = net.log_variances[l - 1]
        if log_s is None:
            total = total + 0.5 * e.pow(2).sum(dim=1)
            continue
        total = total + 0.5 * (e.pow(2) * torch.exp(-log_s)).sum(dim=1)
        if log_variance_term:
            total = total + 0.5 * log_s.expand(e.shape[1]).sum()
    return total


def log_variance_energy(net: Network) -> Tensor:
    """0.5 sum_l sum_i log S_{l,i}: the part of E that inference cannot change (zero with fixed variances)."""
    n, like = net.sizes, net.weights[0]
    total = torch.zeros((), dtype=like.dtype, device=like.device)
    for l, log_s in enumerate(net.log_variances):
        if log_s is not None:
            total = total + 0.5 * log_s.expand(n[l + 1]).sum()
    return total


def activity_gradients(net: Network, errs: Errors) -> list[Tensor]:
    """dE/dx_l = eps_l - g_{l+1} W_{l+1} for the hidden layers l = 1..L-1 (each sample its own)."""
    return [errs.eps[l - 1] - errs.g[l] @ net.weights[l] for l in range(1, net.num_layers)]


def parameter_gradients(net: Network, xs: Sequence[Tensor], errs: Errors) -> list[Tensor]:
    """dE/dtheta of the batch-mean energy, in the order of ``net.parameters()``: dE/dW_l = -g_l^T x_{l-1} / B,
    dE/db_l = -mean_batch g_l, dE/dlog S_l = mean_batch 0.5 (1 - e_l^2 / S_l) (summed where neurons share one S)."""
    B, L = xs[0].shape[0], net.num_layers
    weights = [-errs.g[l].t() @ xs[l] / B for l in range(L)]
    biases = [-errs.g[l].mean(dim=0) for l in range(L)]
    variances = [
        log_variance_gradient(errs.e[l], torch.exp(-log_s), log_s.shape[-1]).reshape(log_s.shape)
        for l, log_s in enumerate(net.log_variances)
        if log_s is not None
    ]
    return weights + biases + variances


def log_variance_gradient(e: Tensor, precision: Tensor, count: int) -> Tensor:
    """dE/dlog S of the batch-mean energy, mean_batch 0.5 (1 - e^2 / S) (the batch on dim -2; ``precision`` = 1/S),
    summed over the neurons that share one S when a layer has ``count`` = 1 of them."""
    per_neuron = 0.5 - 0.5 * e.pow(2).mean(dim=-2) * precision
    return per_neuron if per_neuron.shape[-1] == count else per_neuron.sum(-1, keepdim=True)
