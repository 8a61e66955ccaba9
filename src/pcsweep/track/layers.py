"""What each weight layer learned (pure torch): the paper's Fig 5 as numbers.

- **Relative change** ``||W - W0|| / ||W0||`` from the initial weights: a layer that "fails to update" stays near 0.
- **Distance from a Gaussian**: the 1-D Wasserstein distance between the standardized weights and N(0, 1), so it
  does not depend on the layer's scale or size (a Gaussian layer of 65k weights gives ~0.004; the uniform
  distribution Xavier's initialization draws gives 0.15, a Laplace one 0.14).
- **Distance between two layers' distributions** (a PC twin's against BP's): the 1-D Wasserstein distance in weight
  units, from the quantile functions.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

QUANTILES = 1000  # quantile-function resolution of the distances (exact for samples of this size)


def relative_change(weight: Tensor, initial: Tensor) -> float:
    return float((weight.double() - initial.double()).norm() / initial.double().norm().clamp_min(1e-30))


def _quantiles(values: Tensor, n: int = QUANTILES) -> Tensor:
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.quantile(values.double().flatten().cpu()[: 2**24], levels)


def wasserstein1(a: Tensor, b: Tensor) -> float:
    """W1 between the empirical distributions of ``a`` and ``b`` (any sizes): the mean gap of their quantiles."""
    return float((_quantiles(a) - _quantiles(b)).abs().mean())


def gaussian_distance(weight: Tensor) -> float:
    """W1 between the standardized values and N(0, 1): 0 for a Gaussian, scale-free."""
    values = weight.double().flatten().cpu()
    z = (values - values.mean()) / values.std().clamp_min(1e-30)
    levels = (torch.arange(QUANTILES, dtype=torch.float64) + 0.5) / QUANTILES
    return float((_quantiles(z) - torch.special.ndtri(levels)).abs().mean())


def layer_statistics(weights: Sequence[Tensor], initial: Sequence[Tensor]) -> dict[str, list[float]]:
    """Per weight layer (input side first): relative change from ``initial`` and distance from a Gaussian."""
    return {
        "change": [relative_change(w, w0) for w, w0 in zip(weights, initial)],
        "gaussian_distance": [gaussian_distance(w) for w in weights],
    }
