"""Read back what an offline W&B run wrote (its ``run-<id>.wandb`` file), without the network or a W&B server.

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic, version), then records in 32 KiB blocks, each
with a 7-byte header (crc32, length, type: full/first/middle/last); every record is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, chunks, pending = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too small for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:
            pos += left - HEADER
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            chunks.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            chunks.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(c) for c in chunks]


def metric(record) -> dict:
    """A ``define_metric`` record: {"step_metric": str, "step_sync": bool, "summary": {"max", ...}}."""
    ops = ("min", "max", "mean", "last", "first", "none", "copy")
    return {
        "step_metric": record.step_metric,
        "step_sync": record.options.step_sync,
        "summary": {op for op in ops if getattr(record.summary, op)},
    }


def artifact(record) -> dict:
    """A logged artifact: {"name", "type", "metadata": {...}, "files": [paths in the artifact]}."""
    return {
        "name": record.name,
        "type": record.type,
        "metadata": json.loads(record.metadata or "{}"),
        "files": sorted(entry.path for entry in record.manifest.contents),
    }


def read_run(run_file: Path) -> dict:
    """{"run": RunRecord, "config": {...}, "history": [rows], "summary": {...}, "exit_code": int | None,
    "metrics": {name or glob: metric(...)}, "artifacts": [artifact(...)]}."""
    out = {"run": None, "config": {}, "history": [], "summary": {}, "exit_code": None, "metrics": {}, "artifacts": []}
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "metric":
            out["metrics"][record.metric.name or record.metric.glob_name] = metric(record.metric)
        elif kind == "artifact":
            out["artifacts"].append(artifact(record.artifact))
        elif kind == "run":
            out["run"] = record.run
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append(
                {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
