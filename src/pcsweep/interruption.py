"""Checkpoints inside an epoch: every few minutes, and at a signal.

SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (``scancel``, ``kill``, Ctrl-C, SLURM's warning before a time limit or a
preemption): the run finishes its batch, saves a resumable mid-epoch checkpoint, says so in one line and exits with
128 + the signal's number. Under submitit, the warning signal (USR2, its default) then goes on to submitit's own
handler, which requeues the job: the requeued run resumes from that state.
A long epoch is also checkpointed every ``every_minutes`` (a crash or a kill -9 loses at most that much). Resuming
from a mid-epoch checkpoint continues with the next batch and gives the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, cast

import lightning as L

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # whoever handled these before (submitit) requeues the job


class Interrupted(Exception):
    """A run stopped by a signal after checkpointing; re-running the same command resumes it."""

    def __init__(self, epoch: int, batch: int, signum: int) -> None:
        self.epoch, self.batch, self.signum = epoch, batch, signum
        super().__init__(
            f"interrupted ({signal.Signals(signum).name}) in epoch {epoch} at batch {batch}; "
            "re-run the same command to resume"
        )


class MidEpochCheckpoints(L.Callback):
    """See the module docstring. The signal handlers are installed when training starts, after Lightning's own
    SIGTERM handler (which would end the run with exit status 0 and lose the epoch), and removed when it ends."""

    def __init__(self, checkpoint: Path, every_minutes: float) -> None:  # checkpoint.every_minutes: its default
        self.checkpoint, self.every_seconds = Path(checkpoint), 60.0 * every_minutes
        self.signum: Optional[int] = None
        self.previous: dict[int, Any] = {}
        self.last_save = time.monotonic()
        self._saving: Optional[dict] = None  # set while this callback saves: what the checkpoint is

    def _save(self, trainer: L.Trainer, batch_idx: int) -> None:
        self._saving = {"epoch": trainer.current_epoch, "batches": batch_idx + 1}
        try:
            trainer.save_checkpoint(self.checkpoint)
        finally:
            self._saving, self.last_save = None, time.monotonic()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._saving is not None:
            checkpoint["mid_epoch"] = dict(self._saving)  # read by run.resume_point

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            _FOLLOWERS.add(self)  # only the main thread may install handlers: a pack's forwards them (forwarding)
            return
        for signum in SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        assert trainer.train_dataloader is not None  # set while training
        trainer.train_dataloader.trained = (trainer.current_epoch, batch_idx + 1)  # what a checkpoint resumes after
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if last_batch:
            return  # the epoch's end (validation, condition probes) runs first, then its own checkpoint
        if self.signum is not None:
            self._save(trainer, batch_idx)
            self._stop(trainer, batch_idx + 1)
        if self.every_seconds > 0 and time.monotonic() - self.last_save >= self.every_seconds:
            self._save(trainer, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.signum is not None:  # a signal during the epoch's last batch or its end: save the epoch's checkpoint
            trainer.save_checkpoint(self.checkpoint)  # (ModelCheckpoint, which Lightning calls last, would be too late)
            self._stop(trainer, cast(int, trainer.num_training_batches))

    def _stop(self, trainer: L.Trainer, batches: int) -> None:
        signum, self.signum = self.signum, None
        assert signum is not None  # called only once a signal was caught
        previous = self.previous.get(signum)
        self.restore()
        if signum in REQUEUE_SIGNALS and callable(previous):
            previous(signum, None)  # submitit's: requeue (and exit the process)
        raise Interrupted(trainer.current_epoch, batches, signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _FOLLOWERS.discard(self)
        self.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        _FOLLOWERS.discard(self)
        self.restore()


_FOLLOWERS: set[MidEpochCheckpoints] = set()  # runs training in threads of this process (a pack's members)


@contextlib.contextmanager
def forwarding() -> Iterator[dict[int, Any]]:
    """In a pack's main thread while its members train in threads: a signal reaches every member (each checkpoints
    and stops at its next batch end, as alone). Yields the handlers it replaced: after the members stopped, the
    caller hands a requeue signal on to them (submitit's requeue)."""

    def handle(signum: int, frame: Any) -> None:
        for follower in list(_FOLLOWERS):
            follower._handle(signum, frame)

    previous: dict[int, Any] = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield previous
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
