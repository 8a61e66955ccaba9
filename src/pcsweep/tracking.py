"""Loggers that survive a resume: a run's ``metrics.csv`` keeps the epochs it already finished."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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
        return self._experiment


def trim_metrics(path: Path | str, last_epoch: int) -> None:
    """Drop the rows a resumed run will log again: everything after the epoch its checkpoint completed."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [row for row in rows if row.get("epoch", "") != "" and int(row["epoch"]) <= last_epoch]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
