"""Where a run trains: a free local GPU claimed by a lock file (launcher=gpus), SLURM's allocation, or the CPU."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


@contextlib.contextmanager
def gpu_slot(lock_dir: Path, count: int, poll_seconds: float = 1.0) -> Iterator[int]:
    """Claim one of ``count`` GPUs for as long as the block runs: the first whose lock file nobody holds.

    The lock is an ``flock`` on ``lock_dir/gpu<i>.lock``, so it is released even when the process is killed.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            handle = open(lock_dir / f"gpu{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                handle.write(f"{os.getpid()}\n")
                handle.flush()
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_seconds)


def in_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


@contextlib.contextmanager
def training_devices(accelerator: str, gpu_slots: bool, lock_dir: Path) -> Iterator[tuple[str, int | list[int], list]]:
    """(accelerator, devices, plugins) for the Trainer, holding a GPU slot for the duration if asked to."""
    # submitit handles SLURM's signals and requeues; Lightning's own auto-requeue would fight it
    plugins: list = [SLURMEnvironment(auto_requeue=False)] if in_slurm() else []
    if not gpu_slots:
        yield accelerator, 1, plugins
        return
    if not torch.cuda.is_available():
        log.warning("launcher=gpus but no GPU is visible here: training on the CPU")
        yield "cpu", 1, plugins
        return
    with gpu_slot(lock_dir, torch.cuda.device_count()) as index:
        log.info(f"claimed GPU {index}")
        yield "gpu", [index], plugins
