"""Training-only wall time and the per-epoch history a run's summary is computed from.

Both live in the checkpoint (a Lightning callback's ``state_dict``), so a resumed run reports the same
time-to-90% as one that was never interrupted.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch


def time_to_fraction(history: list[dict], fraction: float = 0.9) -> Optional[dict]:
    """The paper's time to convergence: the first epoch whose test accuracy reached ``fraction`` of the FINAL one.

    Returns that epoch's record (``epoch``, ``step``, ``train_seconds``, ``test_acc``), or None for an empty history
    or a final accuracy that is not positive.
    """
    if not history:
        return None
    final = history[-1]["test_acc"]
    if final is None or not final > 0:
        return None
    for record in history:
        if record["test_acc"] is not None and record["test_acc"] >= fraction * final:
            return record
    return None  # unreachable: the last record always qualifies


class History(L.Callback):
    """Accumulates training-only wall time (validation excluded) and one record per epoch."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.records: list[dict] = []
        self._batch_start: Optional[float] = None

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if self._batch_start is not None:
            self.train_seconds += time.perf_counter() - self._batch_start
        self._batch_start = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            pl_module.log("time/train_seconds", self.train_seconds, on_epoch=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Runs after the epoch's test metrics are aggregated and before ModelCheckpoint saves."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train_seconds": self.train_seconds,
            "test_acc": float(metrics["test/acc"]) if "test/acc" in metrics else None,
            "test_loss": float(metrics["test/loss"]) if "test/loss" in metrics else None,
        }
        record.update(pl_module.epoch_train_metrics())
        self.records.append(record)

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "records": self.records}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = state_dict["train_seconds"]
        self.records = list(state_dict["records"])
