"""Training-only wall time and the per-epoch history a run's summary is computed from.

Both live in the checkpoint (a Lightning callback's ``state_dict``), so a resumed run reports the same
time-to-90% as one that was never interrupted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional, cast

import lightning as L
import torch

from pcsweep.track.metrics_log import batch_step

if TYPE_CHECKING:
    from pcsweep.model.twins import TwinModule


def time_to_fraction(history: list[dict], fraction: float = 0.9) -> Optional[dict]:
    """The paper's time to convergence: the first evaluation whose test accuracy reached ``fraction`` of the FINAL one.

    ``history`` is the accuracy curve (``History.curve``: several points per epoch) or the per-epoch records.
    Returns that point (``epoch``, ``step``, ``train_seconds``, ``test_acc``), or None for an empty history or a final
    accuracy that is not positive.
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


@torch.no_grad()
def test_accuracy(pl_module: TwinModule, split, chunk: int = 2048) -> float:
    """Feedforward accuracy on a whole split (the test prediction of both twins)."""
    dtype = pl_module.mlp.layers[0].weight.dtype
    correct = 0
    for start in range(0, len(split), chunk):
        logits = pl_module.mlp(split.inputs[start : start + chunk].to(dtype))
        correct += int((logits.argmax(dim=1) == split.labels[start : start + chunk]).sum())
    return correct / max(len(split), 1)


class History(L.Callback):
    """Accumulates training-only wall time (validation excluded), one record per epoch, and the test-accuracy curve
    time-to-90% is read from: the epoch-end validations plus ``evals_per_epoch - 1`` evaluations inside each epoch
    (outside the timed batches), so its resolution is a fraction of an epoch."""

    def __init__(self, evals_per_epoch: int = 10) -> None:
        self.train_seconds = 0.0
        self.records: list[dict] = []
        self.curve: list[dict] = []
        self.evals_per_epoch = evals_per_epoch
        self._batch_start: Optional[float] = None

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if self._batch_start is not None:
            self.train_seconds += time.perf_counter() - self._batch_start
        self._batch_start = None
        batches = trainer.num_training_batches
        every = max(1, batches // max(self.evals_per_epoch, 1))
        if (
            self.evals_per_epoch > 1
            and (batch_idx + 1) % every == 0
            and batch_idx + 1 < batches
            and not getattr(pl_module, "diverged", False)
        ):
            datamodule = trainer.datamodule
            val = datamodule.val_split
            self._point(
                trainer,
                batch_idx + 1,
                test_accuracy(pl_module, datamodule.test_split),
                test_accuracy(pl_module, val) if val is not None else None,
            )

    def _point(
        self, trainer: L.Trainer, batches_done: int, test_acc: Optional[float], val_acc: Optional[float] = None
    ) -> None:
        point = {
            "epoch": trainer.current_epoch,
            "epochs": trainer.current_epoch + batches_done / trainer.num_training_batches,
            "step": batch_step(trainer, batches_done - 1),  # the last batch trained
            "train_seconds": self.train_seconds,
            "test_acc": test_acc,
        }
        if val_acc is not None:  # dataset.val_fraction > 0: what tuning scores (pcsweep.sweep.tuning.trial_score)
            point["val_acc"] = val_acc
        self.curve.append(point)

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
            "step": batch_step(trainer, cast(int, trainer.num_training_batches) - 1),  # the epoch's last batch
            "train_seconds": self.train_seconds,
            "test_acc": float(metrics["test/acc"]) if "test/acc" in metrics else None,
            "test_loss": float(metrics["test/loss"]) if "test/loss" in metrics else None,
        }
        if "val/acc" in metrics:  # dataset.val_fraction > 0
            record.update(val_acc=float(metrics["val/acc"]), val_loss=float(metrics["val/loss"]))
        record.update(cast("TwinModule", pl_module).epoch_train_metrics())
        self.records.append(record)
        self._point(trainer, cast(int, trainer.num_training_batches), record["test_acc"], record.get("val_acc"))

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "records": self.records, "curve": self.curve}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = state_dict["train_seconds"]
        self.records = list(state_dict["records"])
        self.curve = list(state_dict.get("curve", []))
