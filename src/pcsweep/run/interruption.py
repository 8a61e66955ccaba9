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
    """A run stopped by a signal after checkpointing (``saved``), or at once by a second Ctrl-C (a pack's member:
    what it trained since its last checkpoint is lost); re-running the same command resumes it."""

    def __init__(self, epoch: int, batch: int, signum: int, saved: bool = True) -> None:
        self.epoch, self.batch, self.signum, self.saved = epoch, batch, signum, saved
        name = signal.Signals(signum).name
        what = f"interrupted ({name})" if saved else f"stopped (a second {name})"
        lost = "" if saved else ", unsaved since its last checkpoint"
        super().__init__(f"{what} in epoch {epoch} at batch {batch}{lost}; re-run the same command to resume")


class MidEpochCheckpoints(L.Callback):
    """See the module docstring. The signal handlers are installed when training starts, after Lightning's own
    SIGTERM handler (which would end the run with exit status 0 and lose the epoch), and removed when it ends."""

    def __init__(self, checkpoint: Path, every_minutes: float) -> None:  # checkpoint.every_minutes: its default
        self.checkpoint, self.every_seconds = Path(checkpoint), 60.0 * every_minutes
        self.signum: Optional[int] = None
        self.stop_now = False  # a pack's member after a second Ctrl-C: stop at the next batch, without saving
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
        self.signum, self.stop_now = None, False
        if threading.current_thread() is not threading.main_thread():
            # only the main thread may install handlers: a pack's forwards them, and what came before this member
            # started training (while it set up) reaches it now
            _FOLLOWERS.add(self)
            self.signum, self.stop_now = _FORWARDED["signum"], bool(_FORWARDED["stop_now"])
            return
        for signum in SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self.stop_now:
            self._stop_now(trainer, batch_idx)

    def _stop_now(self, trainer: L.Trainer, batches: int) -> None:
        self.restore()
        raise Interrupted(trainer.current_epoch, batches, signal.SIGINT, saved=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        assert trainer.train_dataloader is not None  # set while training
        if self.stop_now:
            self._stop_now(trainer, batch_idx + 1)
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
        if self.stop_now:
            self._stop_now(trainer, cast(int, trainer.num_training_batches))
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
_FORWARDED: dict[str, Any] = {"signum": None, "stop_now": False}  # what a pack's main thread has caught so far


@contextlib.contextmanager
def forwarding() -> Iterator[dict[int, Any]]:
    """In a pack's main thread while its members train in threads: a signal reaches every member, those training
    and those still setting up (each checkpoints and stops at its next batch end, as alone). A second Ctrl-C stops
    every member at its next batch without saving; a third raises KeyboardInterrupt here (the members are daemon
    threads: the process ends). Yields the handlers it replaced: after the members stopped, the caller hands a
    requeue signal on to them (submitit's requeue)."""

    def handle(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and _FORWARDED["stop_now"]:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and _FORWARDED["signum"] is not None:
            _FORWARDED["stop_now"] = True
        _FORWARDED["signum"] = _FORWARDED["signum"] or signum
        for follower in list(_FOLLOWERS):
            follower.signum = follower.signum or signum
            follower.stop_now = bool(_FORWARDED["stop_now"])

    _FORWARDED.update(signum=None, stop_now=False)
    previous: dict[int, Any] = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield previous
    finally:
        _FORWARDED.update(signum=None, stop_now=False)
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
