"""The engine timed alone on the bench's batches: each twin, each CPU trick switched off in turn, the plain and
the autograd references, and BP."""

from __future__ import annotations

import math
from typing import Optional

import torch

from pcsweep.bench.setup import Setup, make_batch, make_twin, median_seconds, sgd
from pcsweep.pc import Inference, PCEngine, output_loss
from pcsweep.pc.kernels import NARROW_MAX_WIDTH, PREPACK_AVAILABLE, Tricks
from pcsweep.pc.reference import ReferencePC


# ------------------------------------------------------------------------------------------------ measurements
def engine_batch(setup: Setup, twin: str, tricks: Tricks = Tricks(), reference: Optional[str] = None):
    """A callable training one batch of ``twin`` (the engine, or the plain/autograd reference), warmed up once,
    and the weight updates a batch makes."""
    mlp, log_vars, net, every = make_twin(setup, twin)
    inference = Inference(steps=setup.steps, step_size=0.05, update_every=every)
    engine: PCEngine | ReferencePC
    if reference is None:
        engine = PCEngine(net, inference, log_variance_min=-2.0, tricks=tricks)
    else:
        engine = ReferencePC(net, inference, reference)
    opt = sgd(mlp, log_vars)
    x, y = make_batch(setup)
    result = engine.train_batch(x, y, opt.step)
    return (lambda: engine.train_batch(x, y, opt.step)), result.updates


def time_engine(setup: Setup, twin: str, repeats: int, tricks: Tricks = Tricks()) -> tuple[float, int]:
    """(seconds per training batch, weight updates per batch)."""
    batch, updates = engine_batch(setup, twin, tricks)
    return median_seconds(batch, setup.device, repeats, warmup=0), updates


def time_tricks(setup: Setup, twin: str, repeats: int) -> dict[str, float]:
    """ms per batch of ``twin`` with every engine trick on, with each applicable one off in turn, and through the
    plain reference (per-layer lists, no buffers: none of the tricks). The variants take turns, ``repeats`` rounds,
    and each keeps its best round: a ratio is measured under the same drift of the machine."""
    narrow = setup.device.type == "cpu" and setup.width <= NARROW_MAX_WIDTH
    wide = setup.device.type == "cpu" and not narrow and torch.get_num_threads() > 1
    variants = {"all tricks": Tricks(), "no error front": Tricks(error_front=False)}
    if narrow:
        variants["no transposed copy"] = Tricks(transposed_copy=False)
    if wide:
        variants["no thread balance, no prepacking"] = Tricks(thread_balance=False, prepacked=False)
    if setup.device.type == "cpu" and not narrow and PREPACK_AVAILABLE:
        variants["no prepacked weights"] = Tricks(prepacked=False)
    batches = {name: engine_batch(setup, twin, tricks)[0] for name, tricks in variants.items()}
    batches["plain reference"] = engine_batch(setup, twin, reference="plain")[0]
    best = {name: math.inf for name in batches}
    for _ in range(max(repeats, 2)):
        for name, batch in batches.items():
            best[name] = min(best[name], median_seconds(batch, setup.device, 1, warmup=0) * 1e3)
    return best


def time_reference(setup: Setup, twin: str, repeats: int, gradients: str = "autograd") -> float:
    batch, _ = engine_batch(setup, twin, reference=gradients)
    return median_seconds(batch, setup.device, repeats, warmup=0)


def time_bp(setup: Setup, repeats: int) -> float:
    mlp, log_vars, _, _ = make_twin(setup, "pc")
    opt = sgd(mlp, None)
    x, y = make_batch(setup)

    def step():
        opt.zero_grad()
        output_loss(mlp(x), y, "mse").backward()
        opt.step()

    return median_seconds(step, setup.device, repeats * 5, warmup=3)
