"""The sweep's table: one row per run, printed when a multirun (or a single run) ends and kept as summary.csv."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, cast

from pcsweep.run.files import read_json, write_atomic
from pcsweep.sweep.tuning import RECORD, TUNING_DIR
from pcsweep.track.verdicts import percent

log = logging.getLogger(__name__)

COLUMNS = [
    ("model", "model"),
    ("dataset", "dataset"),
    ("status", "status"),
    ("final_test_acc", "final acc"),
    ("best_test_acc", "best acc"),
    ("final_train_loss", "train loss"),
    ("final_test_loss", "test loss"),
    ("train_seconds", "train time [s]"),
    ("time_to_90", "time to 90% [s]"),
    ("epochs", "epochs"),
    ("lr", "lr"),
    ("lr_origin", "lr from"),
    ("checks", "conditions"),
    ("run_dir", "run folder"),
]


def checks_text(checks: Optional[dict]) -> Optional[str]:
    """The run's conditions in a table cell: ``c2 held; inference stable; S at floor 100%``."""
    if not checks:
        return None
    parts = []
    c2 = checks.get("condition2")
    if c2 and c2["verdict"] != "not measured":
        if "worst_update_error" in c2:  # the weight update's error at the stop (summaries before it: gap and cosine)
            parts.append(
                f"c2 {c2['verdict']} (update {percent(c2['worst_update_error'])} off at W{c2['worst_layer']}"
                + (f", reference short on {c2['reference_short']}" if c2.get("reference_short") else "")
                + ")"
            )
        else:
            parts.append(f"c2 {c2['verdict']} (gap {c2['worst_gap']:.2f}, cos {c2['worst_cosine']:.2f})")
    inference = checks.get("inference")
    if inference:
        gamma = inference.get("step_size_final")  # summaries before the automatic step size lack it
        used = inference.get("steps_used_per_epoch") or []  # summaries before the convergence stop lack it
        error_solver = inference.get("solver") == "error"  # summaries before the solvers lack it: state
        worst = (inference.get("residual_max_per_epoch") or [None])[-1]
        misses = (inference.get("unconverged_batches_per_epoch") or [None])[-1]
        parts.append(
            f"inference {inference['verdict']} ("
            + (
                "error solver"
                if error_solver
                else f"stiffness {inference['stiffness_worst']:.2f}/{inference['limit']:.2f}"
            )
            + (f", step {gamma:.3g}" if gamma is not None and not error_solver else "")
            + (f", T used {used[-1]:.0f}/{inference['steps']}" if inference.get("tolerance") and used else "")
            + (f", residual <= {worst:.1e}" if worst is not None else "")
            + (f", {misses:.0f} batches short of it" if misses else "")
            + ")"
        )
    variance = checks.get("variance")
    if variance:
        parts.append(
            f"S at floor {100 * variance['hidden_at_floor']:.0f}%"
            + (", uniform" if variance["verdict"].startswith("uniform") else "")
        )
    return "; ".join(parts) or None


def row_from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    row = {key: summary.get(key) for key, _ in COLUMNS}
    row["model"] = summary.get("name")
    row["checks"] = checks_text(summary.get("checks"))
    return row


MANIFEST = "sweep_runs.json"  # the sweeper's list of this sweep's jobs: launched, finished or skipped, and why


def write_manifest(sweep_dir: Path, sweep_id: str, runs: list[dict]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep_dir / MANIFEST, json.dumps({"sweep_id": sweep_id, "runs": runs}, indent=1))


def read_manifest(sweep_dir: Path) -> Optional[dict]:
    """``{"sweep_id": ..., "runs": [...]}`` of the last sweep launched into ``sweep_dir``, or None."""
    return read_json(Path(sweep_dir) / MANIFEST)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rows for the runs of the last sweep launched into ``sweep_dir`` (from the sweeper's manifest)."""
    manifest = cast(dict, read_manifest(sweep_dir))["runs"]  # the caller checked that there is one
    rows = []
    for entry in manifest:
        if entry["status"] == "duplicate":
            rows.append(
                {
                    "model": entry["model"],
                    "dataset": entry["dataset"],
                    "status": f"skipped: duplicate of {entry['duplicate_of']}",
                }
            )
            continue
        summary = read_json(sweep_dir / entry["run_dir"] / "summary.json")
        if isinstance(summary, dict):
            rows.append(row_from_summary(summary))
        else:
            # failed, interrupted, or being trained by another sweep (which holds its lock)
            rows.append(
                {"model": entry["run_dir"], "status": "unfinished (no summary.json)", "run_dir": entry["run_dir"]}
            )
    return rows


def tuning_line(sweep_dir: Path) -> str:
    """What the sweep's tuning stage took (``tuning/tuning.json``), as a line under the table; "" without one."""
    record = read_json(sweep_dir / TUNING_DIR / RECORD)
    if not isinstance(record, dict):
        return ""
    trials = sum(len(c["scores"]) for family in record["families"] for c in family["candidates"])
    return (
        f"\ntuning ({record['key']}, {record['search']}): {trials} trials of {len(record['families'])} families, "
        f"{record['trials_train_seconds']:.1f} s of training in its trials, {record['wall_seconds']:.1f} s of wall "
        f"time in its last invocation; every candidate's score: {sweep_dir / TUNING_DIR / RECORD}"
    )


def untuned_line(rows: list[dict]) -> str:
    """A line under the table when the twins it compares trained at hand-set default learning rates (not tuned on
    this data, not given): such a comparison says more about the defaults than about the twins."""
    models = sorted({str(r.get("model")) for r in rows if r.get("lr_origin") == "default"})
    if len({r.get("model") for r in rows}) < 2 or not models:
        return ""
    return (
        f"\nnot tuned: {', '.join(models)} trained at their hand-set default learning rates; a comparison of twins "
        "needs each tuned alike on validation data (add tune=lr) or given on the command line"
    )


SECONDS = ("train_seconds", "time_to_90")


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if key in SECONDS else f"{value:g}" if key == "lr" else f"{value:.4f}"
    return str(value)


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    headers = [title for _, title in COLUMNS]
    cells = [[_fmt(key, row.get(key)) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[key for key, _ in COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
