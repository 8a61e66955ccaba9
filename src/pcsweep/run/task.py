"""One training run from a composed config: the Hydra task function's body, usable without Hydra's CLI.

A run's folder holds ``config.yaml`` (resolved), ``metrics.csv`` (Lightning's CSV logger), ``checkpoints/last.ckpt``
(every epoch), ``weights.pt`` (final parameters, log-variances included) and ``summary.json``; a run that blew up
also gets a ``DIVERGED`` marker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, cast

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from pcsweep.config.compose import duplicate_target, paper_name, settings_from
from pcsweep.config.settings import ConfigError, Settings
from pcsweep.data.datamodule import TensorDataModule
from pcsweep.data.datasets import BUNDLED, load_dataset
from pcsweep.model.twins import BPModule, PCModule, TwinModule
from pcsweep.pc import output_loss
from pcsweep.pc.stability import preflight_stability
from pcsweep.run.devices import training_devices
from pcsweep.run.files import DiskFull, RunBusy, disk_full, run_lock, set_aside, write_atomic
from pcsweep.run.folder import adopt_previous_folder, finished_summary
from pcsweep.run.interruption import Interrupted
from pcsweep.run.trainer import Callbacks, make_callbacks, make_trainer, quiet_lightning, start_logging
from pcsweep.sweep.tuning import lr_origin, trial_line, trial_score
from pcsweep.track.history import History, time_to_fraction
from pcsweep.track.metrics_log import trim_metrics
from pcsweep.track.verdicts import judged_accuracy, learned, run_checks
from pcsweep.track.wandb_run import log_final_artifacts, run_summary

log = logging.getLogger(__name__)


def resolve_data_dir(cfg: DictConfig) -> Path:
    """``dataset.data_dir`` relative to where the command was typed (also inside a SLURM job)."""
    return Path(hydra.utils.to_absolute_path(str(cfg.dataset.data_dir)))


def build_model(settings: Settings, num_features: int, num_classes: int) -> TwinModule:
    """The twin ``settings.algo`` on a fresh MLP drawn from the seed (both twins start from the same weights)."""
    return (BPModule if settings.algo == "bp" else PCModule)(settings, num_features, num_classes)


def seconds_per_batch(settings: Settings, dataset) -> float:
    """Wall time of one training batch of ``settings`` on this machine (one warm-up, then one timed; the optimizer's
    learning rate 0 leaves the weights alone): what the tuning stage projects its cost from."""
    model = build_model(settings, dataset.num_features, dataset.num_classes)
    inputs, target = model.probe_batch(dataset.train, settings.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def batch() -> None:
        if isinstance(model, PCModule):
            model.engine.train_batch(inputs, target, apply_update=optimizer.step)
            return
        optimizer.zero_grad()
        output_loss(model.mlp(inputs), target, settings.output_loss).backward()
        optimizer.step()

    batch()
    start = time.perf_counter()
    batch()
    return time.perf_counter() - start


def measure_stability(settings: Settings, model: PCModule, dataset) -> dict:
    """At the initial weights on the first training batch: ``preflight_stability`` (raises ``UnstableSetting``).
    The sweeper runs it for every PC job before launching any; each run again, to set its automatic floor."""
    inputs, target = model.probe_batch(dataset.train, settings.batch_size)
    return preflight_stability(
        model.engine,
        inputs,
        target,
        settings.log_variance_min,
        trainable_variance=model.log_variances is not None,
        step_setting=settings.inference.step_size,
        auto_stiffness=settings.inference.auto_stiffness,
    )


def check_stability(settings: Settings, model: PCModule, dataset) -> dict:
    """Pre-flight: a step size or variance floor that makes inference diverge is one line (``UnstableSetting``), not
    a run; ``inference.step_size=auto`` and ``log_variance_min=auto`` become the step size and the floor that
    keep it stable (the engine's step size is set by ``measure_stability``)."""
    stability = measure_stability(settings, model, dataset)
    if stability["log_variance_min"] is not None:
        model.engine.log_variance_min = stability["log_variance_min"]
        model.engine.refresh_parameters()
    model.curvature_targets = stability["targets"]
    return stability


def _summary(settings: Settings, run_dir: Path, history: History, status: str, num_classes: int) -> dict[str, Any]:
    records = history.records
    last = records[-1] if records else {}
    accs = [r["test_acc"] for r in records if r.get("test_acc") is not None]
    val_accs = [r["val_acc"] for r in records if r.get("val_acc") is not None]
    if status == "complete" and not learned(settings, judged_accuracy(last), num_classes):
        status = "failed_to_learn"  # listed, never ranked: a time to 90% of chance means nothing
    t90 = time_to_fraction(history.curve or records, 0.9) if status == "complete" else None
    return {
        "name": paper_name(settings),
        "dataset": settings.dataset.name,
        "run_dir": run_dir.name,
        "status": status,
        "diverged": status == "diverged",
        "epochs": len(records),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max(accs) if accs else None,
        "final_train_acc": last.get("train_acc"),
        "final_train_loss": last.get("train_loss"),
        "final_test_loss": last.get("test_loss"),
        "final_val_acc": last.get("val_acc"),
        "best_val_acc": max(val_accs) if val_accs else None,
        # what tuning and the report choose by: the last evaluations' mean (one evaluation is noise)
        "val_score": trial_score({"curve": history.curve, "history": records}, settings.tune.last_evals),
        "lr": (settings.optimizer or {}).get("lr"),
        "lr_origin": lr_origin(settings),
        "train_seconds": history.train_seconds,
        "time_to_90": t90["train_seconds"] if t90 else None,
        "epoch_to_90": t90["epoch"] if t90 else None,
        "step_to_90": t90["step"] if t90 else None,
        "epochs_to_90": t90.get("epochs") if t90 else None,
        "num_classes": num_classes,
        "history": records,
        "curve": history.curve,
        "config": dataclasses.asdict(settings),
    }


def resume_point(run_dir: Path) -> tuple[Optional[Path], str]:
    """The checkpoint to resume from (metrics.csv trimmed to match) and a note saying so; (None, "") if fresh.
    An unloadable checkpoint is set aside (the run starts over); a fresh start never appends to the metrics of a
    dead attempt (they are set aside too)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    state = None
    if last.is_file():
        try:  # mmap: only the loop counters are read here; Lightning loads the tensors once, in fit
            state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
            if not isinstance(state, dict) or not {"epoch", "loops"} <= state.keys():
                raise ValueError("not a Lightning checkpoint")
        except Exception as exc:  # truncated, zero-filled, not a checkpoint: whatever torch says
            state = None
            set_aside(last, f"cannot be loaded ({type(exc).__name__}); the run starts over")
    metrics = run_dir / "metrics.csv"
    if state is None:
        if metrics.is_file():
            set_aside(metrics, "is from an attempt with no checkpoint to resume", suffix="abandoned")
        return None, ""
    mid_epoch = state.get("mid_epoch")
    if mid_epoch is None:
        trim_metrics(metrics, last_epoch=state["epoch"])
        return last, f", resuming after epoch {state['epoch']} from {last.relative_to(run_dir)}"
    trained = state["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
    trim_metrics(metrics, last_epoch=mid_epoch["epoch"] - 1, last_step=trained, step_epoch=mid_epoch["epoch"])
    return last, (
        f", resuming in epoch {mid_epoch['epoch']} after batch {mid_epoch['batches']} from {last.relative_to(run_dir)}"
    )


def fit(
    settings: Settings,
    run_dir: Path,
    model: TwinModule,
    datamodule,
    callbacks: list,
    loggers: list,
    last: Optional[Path],
    resume: str,
) -> None:
    """Lightning's fit on the configured devices, from the checkpoint ``last`` if there is one."""
    trainer_settings = settings.trainer
    # holds a GPU slot (launcher=gpus) until training ends
    with training_devices(trainer_settings.accelerator, trainer_settings.gpu_slots, run_dir.parent / ".gpu_slots") as (
        accelerator,
        device_ids,
        plugins,
    ):
        trainer = make_trainer(settings, run_dir, accelerator, device_ids, plugins, loggers, callbacks)
        where = f"({settings.epochs} epochs on {trainer.strategy.root_device}{resume})"
        if settings.tune.progress:  # a tuning trial: which of how many (pcsweep.sweep.tuning.trial_line)
            log.info(f"{trial_line(settings.tune.progress, settings, run_dir.name)} {where}")
        else:
            log.info(f"training {run_dir.name} {where}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*is not a `torch.utils.data.DataLoader`.*")
            try:
                trainer.fit(model, datamodule=datamodule, ckpt_path=last)
            except SIGTERMException:  # Lightning's own handler (before training started): no mid-epoch state
                raise Interrupted(trainer.current_epoch, 0, signal.SIGTERM) from None


def announce(summary: dict, run_dir: Path, num_classes: int, settings: Settings) -> None:
    """One line on how the run ended (a tuning trial's: its validation score, never its test accuracy)."""
    if settings.tune.progress:
        log.info(trial_line(settings.tune.progress, settings, run_dir.name, summary))
    elif summary["status"] == "diverged":
        log.info(f"{run_dir.name}: diverged ({summary['diverged_reason']}); marked, the sweep goes on")
    elif summary["status"] == "failed_to_learn":
        log.info(
            f"{run_dir.name}: failed to learn (test accuracy {summary['final_test_acc']:.4f}, chance "
            f"{1 / num_classes:.2f}); listed, not ranked"
        )
    else:
        log.info(
            f"{run_dir.name}: test accuracy {summary['final_test_acc']:.4f} after "
            f"{summary['train_seconds']:.1f} s of training"
        )


def finish(
    settings: Settings,
    run_dir: Path,
    model: TwinModule,
    callbacks: Callbacks,
    stability: Optional[dict],
    num_classes: int,
) -> dict[str, Any]:
    """Final weights, ``summary.json`` (with the run's checks) and, for a diverged run, its ``DIVERGED`` marker."""
    status = "diverged" if model.diverged else "complete"
    weights = run_dir / "weights.pt.partial"
    torch.save(
        {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(("train_", "test_", "val_"))},
        weights,
    )
    os.replace(weights, run_dir / "weights.pt")
    summary = _summary(settings, run_dir, callbacks.history, status, num_classes)
    summary["diverged_reason"] = model.diverged_reason
    records = callbacks.conditions.records if callbacks.conditions is not None else None
    summary["checks"] = run_checks(settings, summary, records, stability)
    summary["conditions"] = callbacks.conditions.records if callbacks.conditions is not None else []
    summary["layers"] = callbacks.layers.records
    if model.diverged:
        write_atomic(run_dir / "DIVERGED", f"{model.diverged_reason}\n")
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))  # last: the run is finished once it exists
    return summary


def skipped(settings: Settings, run_dir: Path) -> Optional[dict]:
    """The summary of a run that needs no training (a BP duplicate, or finished in its folder), or None."""
    target = duplicate_target(settings)
    if target is not None:
        log.info(f"skipped {paper_name(settings)} relax={settings.relax}: duplicate of {target}")
        return {
            "name": paper_name(settings),
            "dataset": settings.dataset.name,
            "status": "duplicate",
            "duplicate_of": target,
        }
    adopt_previous_folder(run_dir, settings)
    done = finished_summary(run_dir)
    if done is not None:
        log.info(f"{run_dir.name}: already {done['status']}, nothing to train")
    return done


def task_settings(cfg: DictConfig) -> Settings:
    """The task's config, read once into typed settings (bad input: one line, before any folder is made)."""
    quiet_lightning()
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [cast(str, k) for k in cfg.keys() if k != "hydra"])
    if cfg.dataset.name not in BUNDLED:
        cfg.dataset.data_dir = str(resolve_data_dir(cfg))
    settings = settings_from(cfg)
    settings.trainer.check_devices()
    if settings.tune.key is not None and settings.tune.origin is None:
        raise ConfigError(
            f"tune.key={settings.tune.key}: tuning searches before a sweep's grid trains; run it with -m "
            "(pcsweep -m ... tune=lr)"
        )
    return settings


def train(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train (or resume, or skip) the run ``cfg`` describes; returns its summary. Raises ``UserError`` (one line)
    for bad input, before any folder is made, and for a full disk."""
    settings = task_settings(cfg)
    return train_settings(settings, Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir))


def prepare(settings: Settings, dataset) -> tuple[TwinModule, Optional[dict]]:
    """The run's model on a fresh MLP, and (PC) its stability pre-flight: before any folder is made."""
    model = build_model(settings, dataset.num_features, dataset.num_classes)
    return model, check_stability(settings, model, dataset) if isinstance(model, PCModule) else None


def train_settings(settings: Settings, run_dir: Path) -> dict[str, Any]:
    done = skipped(settings, run_dir)
    if done is not None:
        return done
    dataset = load_dataset(settings.dataset)  # a missing dataset is one line (DatasetError), not a traceback
    model, stability = prepare(settings, dataset)
    return in_folder(settings, run_dir, lambda: train_owned(settings, run_dir, dataset, model, stability))


def in_folder(settings: Settings, run_dir: Path, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``work`` (the training) in the run's folder, which this process then owns (another process training it, or a
    full disk, is one line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(run_dir):
            done = finished_summary(run_dir)  # finished by another process since the check above
            return done if done is not None else work()
    except RunBusy as exc:
        log.info(f"{run_dir.name}: {exc} is training it; skipped here (re-run the command later to pick up its result)")
        return {
            "name": paper_name(settings),
            "dataset": settings.dataset.name,
            "status": "busy",
            "run_dir": run_dir.name,
        }
    except OSError as exc:
        full = disk_full(exc)
        if full is None:
            raise
        raise DiskFull(
            f"{run_dir.name}: no space left on the device writing {full.filename or run_dir}; free some "
            "and run the same command again (it resumes from the last checkpoint)"
        ) from None


def train_owned(
    settings: Settings, run_dir: Path, dataset, model: TwinModule, stability: Optional[dict]
) -> dict[str, Any]:
    """The training itself, in a run folder this process owns."""
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(dataclasses.asdict(settings)))
    callbacks = make_callbacks(settings, run_dir, model, stability is not None)
    last, resume = resume_point(run_dir)
    loggers, wandb_run = start_logging(settings, run_dir)
    succeeded = False
    try:
        fit(
            settings,
            run_dir,
            model,
            TensorDataModule(dataset, settings.batch_size, seed=settings.seed),
            callbacks.all(),
            loggers,
            last,
            resume,
        )
        summary = finish(settings, run_dir, model, callbacks, stability, dataset.num_classes)
        if wandb_run is not None:
            wandb_run.summary.update(run_summary(summary))
            log_final_artifacts(wandb_run, run_dir, summary)
        succeeded = True
    finally:  # a failing run still closes its W&B run (marked failed), so the dashboard never shows it running
        if wandb_run is not None:
            wandb_run.finish(exit_code=0 if succeeded else 1)
    announce(summary, run_dir, dataset.num_classes, settings)
    return summary
