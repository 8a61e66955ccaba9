"""What every table of ``python -m pcsweep.bench`` shares: the workload (``Setup``), its twins, batches and optimizer,
and the timer (the median of repeats, synchronised on a GPU)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pcsweep.model.mlp import MLP, make_log_variances

TWINS = {  # name -> (update every k?, trainable variance?)
    "pc": (False, False),
    "pc_rc2": (True, False),
    "pc_rc3": (False, True),
    "pc_rc23": (True, True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Setup:
    width: int
    depth: int
    batch: int
    steps: int
    every: int
    n_in: int
    n_out: int
    device: torch.device

    @property
    def sizes(self) -> list[int]:
        return [self.n_in] + [self.width] * self.depth + [self.n_out]


def make_batch(setup: Setup, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(setup.batch, setup.n_in, generator=gen)
    y = F.one_hot(torch.randint(0, setup.n_out, (setup.batch,), generator=gen), setup.n_out).float()
    return x.to(setup.device), y.to(setup.device)


def make_twin(setup: Setup, twin: str, seed: int = 0):
    """(mlp, log_variances, network, update_every) for one twin, on the device."""
    every, variance = TWINS[twin]
    torch.manual_seed(seed)
    mlp = MLP(setup.n_in, setup.width, setup.depth, setup.n_out).to(setup.device)
    log_vars = make_log_variances(mlp.sizes, "neuron", "mse").to(setup.device) if variance else None
    return (
        mlp,
        log_vars,
        mlp.as_pc_network(list(log_vars) if log_vars else None, "mse"),
        (setup.every if every else None),
    )


def sgd(mlp, log_vars, lr: float = 1e-3) -> torch.optim.Optimizer:
    params = list(mlp.parameters()) + (list(log_vars) if log_vars is not None else [])
    return torch.optim.SGD(params, lr=lr)
