"""A run's metrics log: ``metrics.csv`` kept across resumes, the x-axes every row carries, and logging a row now."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional, cast

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from pcsweep.run.files import write_atomic

# The x-axes. Every metric is charted against STEP, training batches seen (Lightning's ``_batches_that_stepped``
# and ``batch_step``: one per batch, however many optimizer steps PC takes in it), so BP and PC curves of one size
# overlay; EPOCH and SECONDS (training wall time, evaluation excluded: ``History.train_seconds``) ride along in every
# row, to be picked as the x-axis instead.
STEP, EPOCH, SECONDS = "trainer/global_step", "epoch", "time/train_seconds"


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; this one appends to it (same columns, new ones merged)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` writing straight into the run folder and appending across resumes."""

    def __init__(self, run_dir: Path | str) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return cast(ExperimentWriter, self._experiment)  # only ever an _AppendingWriter


def trim_metrics(
    path: Path | str, last_epoch: int, last_step: Optional[int] = None, step_epoch: Optional[int] = None
) -> None:
    """Drop the rows a resumed run will log again: everything after the epoch its checkpoint completed, except (a
    mid-epoch checkpoint) the rows of ``step_epoch`` logged at steps up to ``last_step``."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or [], list(reader)

    def keep(row: dict) -> bool:
        if row.get("epoch", "") == "":
            return False
        epoch = float(row["epoch"])
        return epoch <= last_epoch or (
            epoch == step_epoch
            and row.get("step", "") != ""
            and float(row["step"]) <= cast(int, last_step)  # given with step_epoch
        )

    kept = [row for row in rows if keep(row)]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    write_atomic(path, text.getvalue())


def batch_step(trainer: L.Trainer, batch_idx: int) -> int:
    """The STEP of batch ``batch_idx`` of the current epoch: its index among the training batches of the whole run
    (also across resumes), the step Lightning gives its loggers (``_batches_that_stepped``) for the same batch.
    Batches, not optimizer steps: a relax=2 twin takes 32 optimizer steps per batch, its curves overlay BP's."""
    # num_training_batches is inf only for a loader without a length; pcsweep's always have one
    return trainer.current_epoch * cast(int, trainer.num_training_batches) + batch_idx


def log_direct(pl_module: L.LightningModule, metrics: dict[str, float], step: int) -> None:
    """Log now to every logger, outside Lightning's every-n-steps cadence (for sparse diagnostics)."""
    metrics = {**metrics, EPOCH: pl_module.current_epoch}  # the CSV log is trimmed by epoch on resume
    for logger in pl_module.loggers:
        logger.log_metrics(metrics, step=step)
