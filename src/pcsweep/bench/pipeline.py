"""The Lightning pipeline timed on the same batches: the module's epoch against the raw engine's, so the
framework's share of a batch is measured, not assumed."""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F

from pcsweep.bench.setup import TWINS, Setup, sync
from pcsweep.config.settings import InferenceSettings, Settings, TrackingSettings
from pcsweep.data.datamodule import TensorBatches, TensorDataModule
from pcsweep.data.datasets import Dataset, Split
from pcsweep.model.twins import PCModule
from pcsweep.run.trainer import quiet_lightning


def pipeline_module(setup: Setup, twin: str):
    """The Lightning PC module on the bench's workload (SGD 1e-3, plain descent, fixed floor, no tracking)."""
    every, variance = TWINS[twin]
    settings = Settings(
        width=setup.width,
        depth=setup.depth,
        seed=0,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1e-3},
        inference=InferenceSettings(
            steps=setup.steps, step_size=0.05, momentum=0.0, update_every=setup.every if every else None
        ),
        variance="neuron" if variance else "fixed",
        log_variance_min=-2.0,
        tracking=TrackingSettings(energy_trace=False, alignment_every=0),
    )
    return PCModule(settings, setup.n_in, setup.n_out)


class _EpochClock(L.Callback):
    """Wall time of the training epoch, the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.seconds = device, 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        sync(self.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def _lightning_epoch(setup: Setup, twin: str, dataset: Dataset) -> tuple[float, float]:
    """One epoch through Lightning's Trainer: its wall time, and the time the engine's ``train_batch`` took in it."""
    clock, pc_module = _EpochClock(setup.device), pipeline_module(setup, twin)
    engine_seconds, train_batch = [0.0], pc_module.engine.train_batch

    def timed_train_batch(*args, **kwargs):
        sync(setup.device)
        start = time.perf_counter()
        result = train_batch(*args, **kwargs)
        sync(setup.device)
        engine_seconds[0] += time.perf_counter() - start
        return result

    pc_module.engine.train_batch = timed_train_batch
    trainer = L.Trainer(
        max_epochs=1,
        accelerator=setup.device.type,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(pc_module, datamodule=TensorDataModule(dataset, setup.batch, seed=0))
    return clock.seconds, engine_seconds[0]


def time_pipeline(setup: Setup, twin: str, batches: int) -> tuple[float, float, float]:
    """One epoch of ``batches`` batches: through the Lightning PC module, through the raw engine, and the time the
    engine's ``train_batch`` took inside that Lightning epoch (the rest of the epoch is the pipeline's own cost,
    measured free of the machine's drift between epochs)."""
    quiet_lightning()
    n = batches * setup.batch
    gen = torch.Generator().manual_seed(1)
    split = Split(torch.rand(n, setup.n_in, generator=gen), torch.randint(0, setup.n_out, (n,), generator=gen))
    dataset = Dataset("bench", split, Split(split.inputs[: setup.batch], split.labels[: setup.batch]), setup.n_out)
    raw = pipeline_module(setup, twin).to(setup.device)
    opt = torch.optim.SGD(raw.configure_optimizers().param_groups, lr=1e-3)
    batches_on_device = TensorBatches(split.to(setup.device), setup.batch, shuffle=True, seed=0)

    def raw_epoch() -> float:
        sync(setup.device)
        start = time.perf_counter()
        for inputs, labels in batches_on_device:
            raw.engine.train_batch(inputs, F.one_hot(labels, setup.n_out).float(), opt.step)
        sync(setup.device)
        return time.perf_counter() - start

    # alternate which goes first, so that neither side gets all the warm caches or one phase of the machine's
    # drift (+-10% over minutes here): the best of three each
    raw_seconds: list[float] = []
    lightning_runs: list[tuple[float, float]] = []  # (lightning seconds, engine seconds)
    for rounds in range(3):
        for first in (True, False) if rounds % 2 == 0 else (False, True):
            if first:
                raw_seconds.append(raw_epoch())
            else:
                lightning_runs.append(_lightning_epoch(setup, twin, dataset))
    lightning_seconds, engine_seconds = min(lightning_runs)
    return lightning_seconds, min(raw_seconds), engine_seconds
