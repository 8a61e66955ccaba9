"""The one MLP both twins train: ``depth`` hidden layers of ``width`` neurons and a linear output layer."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, cast

import torch
from torch import Tensor, nn

from pcsweep.config.settings import INITS
from pcsweep.pc.energy import Network, get_activation


class MLP(nn.Module):
    """``depth`` hidden layers (``depth + 1`` weight matrices), hidden activation, linear output.

    ``init="xavier"`` draws Glorot-uniform weights with the activation's gain (keeps an 8-layer tanh net's signal
    alive at initialisation; gain 1 for the linear output) and zero biases; ``init="torch"`` keeps ``nn.Linear``'s
    default.
    """

    layers: Sequence[nn.Linear]  # an nn.ModuleList of nn.Linear (ModuleList's stubs only know Module)

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        activation: str = "tanh",
        init: str = "xavier",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        self.activation = get_activation(activation)
        sizes = [in_features] + [width] * depth + [out_features]
        self.sizes = sizes
        self.layers = cast(
            Sequence[nn.Linear], nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        )
        if init == "xavier":
            gain = 1.0 if activation == "linear" else nn.init.calculate_gain(activation)  # type: ignore[arg-type]
            for i, layer in enumerate(self.layers):
                nn.init.xavier_uniform_(layer.weight, gain=gain if i < len(self.layers) - 1 else 1.0)
                nn.init.zeros_(layer.bias)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.activation.fn(layer(x))
        return self.layers[-1](x)

    def as_pc_network(self, log_variances: Optional[Iterable[Tensor]], output_loss: str) -> Network:
        """The same parameters, by reference, seen as a PC network (plus the twin's own log-variances)."""
        variances: list[Optional[Tensor]] = list(log_variances or [])
        variances += [None] * (self.num_layers - len(variances))  # S = 1 where none is trained (and at a CE output)
        return Network(
            weights=[layer.weight for layer in self.layers],
            biases=[layer.bias for layer in self.layers],
            log_variances=variances,
            activation=self.activation,
            output_loss=output_loss,
        )


def make_log_variances(sizes: Sequence[int], mode: str, output_loss: str, initial: float = 0.0) -> nn.ParameterList:
    """Trainable log S per weight layer: one per neuron (``mode="neuron"``) or one per layer (``"layer"``).

    The cross-entropy output has no Gaussian term, so its layer gets none: the list then covers the hidden layers.
    """
    if mode not in ("neuron", "layer"):
        raise ValueError(f"unknown variance mode {mode!r}; choose 'neuron' or 'layer'")
    layer_sizes = list(sizes[1:])
    if output_loss == "ce":
        layer_sizes = layer_sizes[:-1]
    return nn.ParameterList(
        nn.Parameter(torch.full((n if mode == "neuron" else 1,), float(initial))) for n in layer_sizes
    )
