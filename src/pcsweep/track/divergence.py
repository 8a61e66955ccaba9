"""When a run has diverged, judged on plain numbers the twin hands over at its metric flush (every ``RECORD_EVERY``
batches and at the epoch's end: one host sync per flush, never one per batch). No torch, no Lightning.

A run diverged when (a) a parameter is not finite, (b) its training loss (the feedforward output loss, the same for
BP and PC) is above ``loss_factor`` times its mean over the run's first ``window`` batches in two consecutive windows
of ``window`` batches, or (c) a layer's weight norm is above ``weight_factor`` times its initial norm. A healthy
run's loss falls and its weights stay near their initial scale, so the bounds are far from where it goes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass
class DivergenceWatch:
    """The three rules, with the loss windows' running state (``state_dict``: a resumed run judges on)."""

    loss_factor: float
    window: int
    weight_factor: float
    initial_norms: Sequence[float]  # each layer's weight norm at the start
    batches: int = 0  # training losses seen over the run
    baseline: Optional[float] = None  # the mean of the first ``window`` (None until they are in)
    window_sum: float = 0.0  # the current window's (or, before the baseline, the first window's) sum so far
    window_count: int = 0
    high: Optional[float] = None  # the last complete window's mean, if it was above the bound (one strike)

    STATE = ("batches", "baseline", "window_sum", "window_count", "high")

    def losses(self, values: Sequence[float]) -> Optional[tuple[int, str]]:
        """The next batches' training losses, in order: (the index in ``values`` of the batch that completed the
        second window in a row above the bound, the reason), or None."""
        for i, value in enumerate(values):
            self.batches += 1
            self.window_sum += value
            self.window_count += 1
            if self.window_count < self.window:
                continue
            mean = self.window_sum / self.window
            self.window_sum, self.window_count = 0.0, 0
            if self.baseline is None:
                self.baseline = mean
                continue
            if mean <= self.loss_factor * self.baseline:  # (a NaN mean is above: not <=)
                self.high = None
                continue
            if self.high is None:
                self.high = mean
                continue
            return i, (
                f"training loss diverged: its mean over two windows of {self.window} batches in a row was "
                f"{self.high:.3g} then {mean:.3g}, above {self.loss_factor:g}x its mean {self.baseline:.3g} over "
                f"the first {self.window}"
            )
        return None

    def parameters(self, names: Sequence[str], norms: Sequence[float], weight_norms: Sequence[float]) -> Optional[str]:
        """Every parameter's norm (named) and each layer's weight norm, now: the reason if (a) or (c) holds, or None."""
        for name, norm in zip(names, norms):
            if not math.isfinite(norm):
                return f"parameter {name} is not finite"
        for layer, (norm, start) in enumerate(zip(weight_norms, self.initial_norms), start=1):
            if norm > self.weight_factor * start:
                return (
                    f"weights diverged: the norm of W{layer} grew from {start:.3g} to {norm:.3g}, above "
                    f"{self.weight_factor:g}x its initial norm"
                )
        return None

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for key in self.STATE:
            setattr(self, key, state[key])
