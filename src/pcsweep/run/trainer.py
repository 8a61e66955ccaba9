"""Lightning's Trainer, built in one place (``make_trainer``) as lightning-hydra-template builds it with
``instantiate(cfg.trainer, callbacks=..., logger=...)``, with its callbacks (``make_callbacks``) and loggers
(``start_logging``): pcsweep's defaults, then the user's ``trainer.NAME=value``
arguments (checked against the Trainer's signature before any work: ``check_trainer_arguments``), then what pcsweep
decides itself (``TRAINER_OWNED``: the user's value for those is dropped with a line naming the setting instead)."""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pcsweep.config.compose import locate
from pcsweep.config.settings import ConfigError, Settings
from pcsweep.model.twins import TwinModule
from pcsweep.run.interruption import MidEpochCheckpoints
from pcsweep.track.diagnostics import EnergyTraces, LayerLearning, RunConditions, WeightHistograms
from pcsweep.track.history import History
from pcsweep.track.metrics_log import ResumableCSVLogger
from pcsweep.track.wandb_run import AxesWandbLogger, run_labels

log = logging.getLogger(__name__)

# Trainer arguments pcsweep sets itself, and the setting that decides each instead
TRAINER_OWNED = {
    "max_epochs": "epochs",
    "devices": "trainer.accelerator and launcher=gpus",
    "logger": "the logger group",
    "callbacks": "the callbacks group",
    "default_root_dir": "the run's folder",
    "enable_progress_bar": "trainer.progress_bar",
    "plugins": "pcsweep's checkpointing and SLURM plugins",
}
# pcsweep's defaults, which trainer.NAME=value overrides: no model table per run, no sanity pass (a run's first
# validation is its own)
TRAINER_DEFAULTS = {"enable_model_summary": False, "num_sanity_val_steps": 0}


def check_trainer_arguments(arguments: dict) -> None:
    """Each ``trainer.NAME`` must be an argument of Lightning's Trainer (one line otherwise)."""
    accepted = inspect.signature(L.Trainer.__init__).parameters
    for key in arguments:
        if key not in accepted:
            raise ConfigError(
                f"trainer.{key} is neither a pcsweep setting nor an argument of Lightning's Trainer "
                f"(lightning {L.__version__})"
            )


def trainer_arguments(settings: Settings) -> dict[str, Any]:
    """``trainer.NAME=value`` arguments for Lightning's Trainer; those pcsweep sets itself are dropped, each with a
    line naming the setting that decides it instead."""
    passed = {}
    for key, value in settings.trainer.lightning.items():
        if key in TRAINER_OWNED:
            log.warning(f"trainer.{key}={value} is not used: pcsweep sets it from {TRAINER_OWNED[key]}")
        else:
            passed[key] = value
    return passed


def make_trainer(
    settings: Settings, run_dir: Path, accelerator: str, devices: Any, plugins: list, loggers: list, callbacks: list
) -> L.Trainer:
    """The run's Trainer: ``TRAINER_DEFAULTS``, the user's arguments, and pcsweep's own (``TRAINER_OWNED``) last.
    ``accelerator``, ``devices`` and ``plugins``: where the run trains (``pcsweep.run.devices``)."""
    owned = {
        "max_epochs": settings.epochs,
        "accelerator": accelerator,
        "precision": settings.trainer.precision,
        "devices": devices,
        "default_root_dir": str(run_dir),
        "enable_progress_bar": settings.trainer.progress_bar,
        "log_every_n_steps": settings.trainer.log_every_n_steps,
    }
    config = {"_target_": "lightning.Trainer", **TRAINER_DEFAULTS, **trainer_arguments(settings), **owned}
    # objects go in as arguments, not config (instantiate would copy them into an OmegaConf node)
    return instantiate(config, logger=loggers, callbacks=callbacks, plugins=[*plugins, AtomicCheckpointIO()])


@dataclass
class Callbacks:
    """The callbacks a run trains with, kept by name: the summary reads their records afterwards."""

    history: History
    layers: LayerLearning
    conditions: Optional[RunConditions]
    others: list

    def all(self) -> list:
        return [self.history, self.layers, *([self.conditions] if self.conditions else []), *self.others]


def make_callbacks(settings: Settings, run_dir: Path, model: TwinModule, pc: bool) -> Callbacks:
    tracking = settings.tracking
    # one file, rewritten after every epoch (save_last alone only mirrors top-k saves), after every callback's
    # epoch-end work (the condition probes) is in its state
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="last",
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    others: list[L.Callback] = [WeightHistograms(run_dir, tracking.histogram_every)]
    if pc and tracking.energy_trace:
        others.append(EnergyTraces(run_dir, tracking.energy_tolerance))
    conditions = (
        RunConditions(tracking.condition2_every, tracking.condition2_max_multiple, tracking.condition2_batches)
        if pc
        else None
    )
    # the freshly drawn weights are W0 (a resumed run redraws the same ones from the seed before loading its checkpoint)
    layers = LayerLearning([layer.weight for layer in model.mlp.layers])
    mid_epoch = MidEpochCheckpoints(run_dir / "checkpoints" / "last.ckpt", settings.checkpoint.every_minutes)
    added = [instantiate(node) for node in settings.callbacks.values()]  # conf/callbacks
    return Callbacks(History(tracking.evals_per_epoch), layers, conditions, others + added + [checkpoints, mid_epoch])


def start_logging(settings: Settings, run_dir: Path) -> tuple[list, Any]:
    """Lightning loggers: the CSV log (always: resume and the summary read it), then conf/logger's, each built from
    its ``_target_`` and given what it takes of the run's folder (``run_dir``, ``save_dir``) and W&B ``labels``;
    and the W&B run, if there is one."""
    loggers: list = [ResumableCSVLogger(run_dir)]
    if not settings.logger:  # logger=csv: no labels to compute
        return loggers, None
    runtime = {"run_dir": run_dir, "save_dir": str(run_dir), "labels": run_labels(settings)}
    for node in settings.logger.values():
        accepts = inspect.signature(locate(node["_target_"])).parameters
        build = instantiate(node, _partial_=True)
        loggers.append(build(**{k: v for k, v in runtime.items() if k in accepts and k not in node}))
    wandb_run = next((logger.experiment for logger in loggers if isinstance(logger, AxesWandbLogger)), None)
    return loggers, wandb_run


def quiet_lightning() -> None:
    """A sweep prints one table, not ten copies of Lightning's start-up chatter (warnings still show)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", ".*The `srun` command is available on your system but is not used.*")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write the checkpoint beside its final name, then rename: a kill mid-write leaves the previous one intact."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)
