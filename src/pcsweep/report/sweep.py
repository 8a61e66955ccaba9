"""The sweep as the report reads it: its runs (seeds of one config; folders set aside never enter), the tuning record
when there is one, and the per-run tables the figures and documents start from. Everything above builds on this."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

from pcsweep.config.compose import config_hash
from pcsweep.run.files import read_json
from pcsweep.sweep.table import checks_text, read_manifest

TWIN_ORDER = ["bp", "pc", "pc_rc2", "pc_rc3", "pc_rc23"]
SET_ASIDE = ".other-"  # a run folder trained under an earlier default, renamed by pcsweep.run.task: never reported
BATCHES = "training batches"  # the x-axis all twins share: a relax=2 twin's 32 optimizer steps per batch are one


def twin_of(label: str) -> str:
    """``pc_256_8_rc2 wd=1e-06`` -> ``pc_rc2``; ``bp_256_8`` -> ``bp``."""
    name = label.split(" ")[0]
    algo = name.split("_")[0]
    return f"{algo}_rc{name.split('_rc')[1]}" if "_rc" in name else algo


def model_order(models) -> list[str]:
    """The report's model order: by twin (``TWIN_ORDER``, unknown twins last), then by label."""

    def key(model: str):
        twin = twin_of(model)
        return (TWIN_ORDER.index(twin) if twin in TWIN_ORDER else 99, model)

    return sorted(set(models), key=key)


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict
    variant: str = ""  # set when runs of different configs share one name: they are shown apart, never pooled

    @cached_property
    def family(self) -> str:
        """The run's identity without its seed: runs of one family are seeds of one experiment."""
        return config_hash({k: v for k, v in self.config.items() if k != "seed"})

    @property
    def name(self) -> str:  # the paper's name: pc_256_8_rc2
        return self.summary["name"]

    @property
    def twin(self) -> str:
        return twin_of(self.name)

    @property
    def label(self) -> str:
        """The paper's name, plus the weight decay when there is one (Fig 6 compares the same twin with and without)."""
        decay = self.config.get("weight_decay", 0) or 0
        return self.name + (f" wd={decay:g}" if decay else "") + self.variant

    @property
    def group(self) -> tuple[str, int, int]:
        return self.summary["dataset"], self.config["width"], self.config["depth"]

    @property
    def lr(self) -> Optional[float]:
        """The learning rate it trained with (summaries before ``lr`` was written: the config's)."""
        given = self.summary.get("lr")
        return given if given is not None else (self.config.get("optimizer") or {}).get("lr")

    def columns(self) -> dict[str, Any]:
        """What every per-run table starts with."""
        return {
            "model": self.label,
            "twin": self.twin,
            "dataset": self.summary["dataset"],
            "width": self.config.get("width"),
            "depth": self.config.get("depth"),
            "seed": self.config.get("seed"),
        }


@dataclass
class Sweep:
    path: Path
    runs: list[Run]
    skipped: list[dict] = field(default_factory=list)  # duplicates and runs without a summary
    tuning: Optional[dict] = None  # <sweep>/tuning/tuning.json when the sweep was tuned (its trials are no runs)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.summary["status"] == "complete"]


def seeds_only(runs: list[Run]) -> tuple[list[Run], list[dict]]:
    """Make every group of runs a set of seeds of one config: a second run of the same config and seed is listed,
    not counted; runs of different configs under one name are told apart (``[family]`` after the name)."""
    kept: list[Run]
    skipped: list[dict]
    seen: dict[tuple[str, Any], str]  # (family, seed) -> the folder that holds it
    kept, skipped, seen = [], [], {}
    for run in runs:
        key = (run.family, run.config.get("seed"))
        if key in seen:
            skipped.append(
                {"model": run.path.name, "reason": f"same config and seed as {seen[key]}: listed, not counted"}
            )
            continue
        seen[key] = run.path.name
        kept.append(run)
    families: dict[tuple, set] = {}
    for run in kept:
        families.setdefault((run.summary["dataset"], run.label), set()).add(run.family)
    for run in kept:
        if len(families[(run.summary["dataset"], run.label)]) > 1:
            run.variant = f" [{run.family[:6]}]"
    return kept, skipped


def load_sweep(path: Path) -> Sweep:
    """Every run folder with a readable summary.json (one level down), the sweeper's skipped jobs with their reason,
    and the tuning record; a folder with no finished run is a FileNotFoundError, one line for the user."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a sweep folder")
    runs = []
    for summary_path in sorted(path.glob("*/summary.json")):  # one level: tuning/<trial>/ is never a sweep run
        if SET_ASIDE in summary_path.parent.name:
            continue
        summary = read_json(summary_path)  # an unreadable one is set aside (one line): that run is not reported
        if isinstance(summary, dict):
            runs.append(Run(summary_path.parent, summary, summary.get("config", {})))
    runs, skipped = seeds_only(runs)
    manifest = read_manifest(path)
    if manifest is not None:
        for entry in manifest["runs"]:
            if entry["status"] == "duplicate":
                skipped.append({"model": entry["model"], "reason": f"duplicate of {entry['duplicate_of']}"})
            elif not (path / entry.get("run_dir", "") / "summary.json").is_file():
                skipped.append(
                    {"model": entry.get("run_dir", entry["model"]), "reason": "no summary (failed or unfinished)"}
                )
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {path}")
    tuning = read_json(path / "tuning" / "tuning.json")
    return Sweep(path, runs, skipped, tuning if isinstance(tuning, dict) and tuning.get("families") else None)


# ------------------------------------------------------------------------------------------------ runs
def by_model(sweep: Sweep, select=None) -> dict[tuple, dict[str, list[Run]]]:
    """Finished runs by (dataset, width), then by label; several runs under one label are seeds."""
    groups: dict[tuple, dict[str, list[Run]]] = {}
    for run in sweep.finished:
        if select is None or run.label in select:
            groups.setdefault(run.group[:2], {}).setdefault(run.label, []).append(run)
    return groups


def weight_decay_models(sweep: Sweep) -> Optional[list[str]]:
    """Labels of one twin trained with and without weight decay, if the sweep has such a pair."""
    by_name: dict[str, set] = {}
    for run in sweep.finished:
        by_name.setdefault(run.name, set()).add(run.label)
    for labels in by_name.values():
        if any("wd=" in label for label in labels) and any("wd=" not in label for label in labels):
            return sorted(labels)
    return None


def load_weights(run: Run) -> list[torch.Tensor]:
    """The run's trained weight matrices (float32, input side first), from its weights.pt."""
    state = torch.load(run.path / "weights.pt", map_location="cpu")
    count = sum(1 for k in state if k.startswith("mlp.layers.") and k.endswith(".weight"))
    return [state[f"mlp.layers.{l}.weight"].float() for l in range(count)]


def last_energy(run: Run) -> Optional[list[float]]:
    """The error energy per layer (1 = input side) at the weight update, on the run's last probe batch."""
    probes = run.summary.get("conditions") or []
    return ((probes[-1] or {}).get("condition2") or {}).get("layer_energy_at_T") if probes else None


# ------------------------------------------------------------------------------------------------ tables
def summary_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per run, finished or not: the report's table of runs, and what the benchmark figure reads."""
    rows = []
    for run in sweep.runs:
        s = run.summary
        rows.append(
            {
                **run.columns(),
                "lr": run.lr,
                "lr from": s.get("lr_origin"),
                "status": s["status"],
                "val score": s.get("val_score"),
                "final acc": s.get("final_test_acc"),
                "best acc": s.get("best_test_acc"),
                "train loss": s.get("final_train_loss"),
                "test loss": s.get("final_test_loss"),
                "train time [s]": s.get("train_seconds"),
                "time to 90% [s]": s.get("time_to_90"),
                "epochs": s.get("epochs"),
                "conditions": checks_text(s.get("checks")),
                "run": run.path.name,
            }
        )
    return pd.DataFrame(rows)


def _finished(sweep: Sweep, select=None) -> list[Run]:
    return [run for run in sweep.finished if select is None or run.label in select]


def curves_frame(sweep: Sweep, select=None) -> pd.DataFrame:
    """Per epoch: test accuracy, train and test loss, at the batch where the epoch ended."""
    rows = []
    for run in _finished(sweep, select):
        for record in run.summary.get("history", []):
            rows.append(
                {
                    **run.columns(),
                    "epoch": record["epoch"] + 1,
                    BATCHES: record.get("step", record["epoch"] + 1),
                    "test accuracy": record.get("test_acc"),
                    "train loss": record.get("train_loss"),
                    "test loss": record.get("test_loss"),
                }
            )
    return pd.DataFrame(rows)


def accuracy_curve_frame(sweep: Sweep, select=None) -> pd.DataFrame:
    """Test (and validation) accuracy at every evaluation a run recorded (about ten per epoch, ``summary["curve"]``);
    a run without a curve falls back to its per-epoch records."""
    rows = []
    for run in _finished(sweep, select):
        for point in run.summary.get("curve") or run.summary.get("history", []):
            rows.append(
                {
                    **run.columns(),
                    BATCHES: point.get("step", point["epoch"] + 1),
                    "test accuracy": point.get("test_acc"),
                    "validation accuracy": point.get("val_acc"),
                }
            )
    return pd.DataFrame(rows)


def variance_frame(sweep: Sweep, labels) -> pd.DataFrame:
    """Mean log S per layer and label (seeds averaged), from each run's last variance statistics."""
    columns: dict[str, list[list[float]]] = {}  # label -> per run, each layer's mean log S
    for run in sweep.finished:
        layers = ((run.summary.get("checks") or {}).get("variance") or {}).get("layers")
        if run.label in labels and layers:
            columns.setdefault(run.label, []).append([layer["mean"] for layer in layers])
    frame = pd.DataFrame({label: [sum(col) / len(col) for col in zip(*rows)] for label, rows in columns.items()})
    frame.insert(0, "layer", [f"S{l + 1}" for l in range(len(frame))])
    return frame
