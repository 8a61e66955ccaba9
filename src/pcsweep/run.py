"""One training run from a composed config: the Hydra task function's body, usable without Hydra's CLI.

A run's folder holds ``config.yaml`` (resolved), ``metrics.csv`` (Lightning's CSV logger), ``checkpoints/last.ckpt``
(every epoch), ``weights.pt`` (final parameters, log-variances included) and ``summary.json``; a run that blew up
also gets a ``DIVERGED`` marker.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, cast

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from pcsweep.conditions import Condition2Thresholds, condition2_verdict, preflight_stability
from pcsweep.config import config_hash, duplicate_target, find_previous_folder, locate, paper_name, settings_from
from pcsweep.data import BUNDLED, load_dataset
from pcsweep.datamodule import TensorDataModule
from pcsweep.devices import training_devices
from pcsweep.files import DiskFull, RunBusy, disk_full, read_json, run_lock, set_aside, write_atomic
from pcsweep.history import History, time_to_fraction
from pcsweep.interruption import Interrupted, MidEpochCheckpoints
from pcsweep.models import BPModule, PCModule, TwinModule
from pcsweep.pc import output_loss
from pcsweep.settings import ConfigError, Settings
from pcsweep.tracking import (
    AxesWandbLogger,
    EnergyTraces,
    LayerLearning,
    ResumableCSVLogger,
    RunConditions,
    WeightHistograms,
    log_final_artifacts,
    run_labels,
    run_summary,
    trim_metrics,
)
from pcsweep.tuning import lr_origin, trial_score

log = logging.getLogger(__name__)

FINISHED = ("complete", "diverged", "failed_to_learn")
UNIFORM_SPREAD = 1e-3  # log S spread across a layer's neurons below which the variance is one number per layer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write the checkpoint beside its final name, then rename: a kill mid-write leaves the previous one intact."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


def quiet_lightning() -> None:
    """A sweep prints one table, not ten copies of Lightning's start-up chatter (warnings still show)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", ".*The `srun` command is available on your system but is not used.*")


def resolve_data_dir(cfg: DictConfig) -> Path:
    """``dataset.data_dir`` relative to where the command was typed (also inside a SLURM job)."""
    return Path(hydra.utils.to_absolute_path(str(cfg.dataset.data_dir)))


def finished_summary(run_dir: Path) -> Optional[dict]:
    """The run's summary if it finished (an unreadable one is set aside: the run resumes or retrains)."""
    summary = read_json(Path(run_dir) / "summary.json")
    return summary if isinstance(summary, dict) and summary.get("status") in FINISHED else None


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


def learned(settings: Settings, final_test_acc: Optional[float], num_classes: int) -> bool:
    """A final accuracy more than ``tracking.chance_margin`` above chance."""
    return final_test_acc is not None and final_test_acc >= 1.0 / num_classes + settings.tracking.chance_margin


def run_checks(
    settings: Settings, summary: dict, conditions: Optional[RunConditions], stability: Optional[dict]
) -> dict:
    """Whether the run's assumptions held, each with a verdict and its numbers (the summary's ``checks``)."""
    chance = 1.0 / summary["num_classes"]
    final = summary.get("final_test_acc")
    checks: dict[str, Any] = {
        "learned": {
            "verdict": "learned" if learned(settings, final, summary["num_classes"]) else "failed to learn",
            "final_test_acc": final,
            "chance": chance,
            "margin": settings.tracking.chance_margin,
        }
    }
    if conditions is None:
        return checks
    assert stability is not None  # measured for every PC run, the only runs with conditions
    records = conditions.records
    limits = Condition2Thresholds(settings.tracking.condition2_max_gap, settings.tracking.condition2_min_cosine)
    checks["condition2"] = condition2_verdict(
        [r["condition2"] for r in records], settings.inference.update_every is not None, limits
    )
    worst = max((r["stiffness"] for r in records), default=stability["stiffness"])
    rises = [r.get("train_energy_rises") for r in summary["history"] if r.get("train_energy_rises") is not None]
    used = [r["train_inference_steps"] for r in summary["history"] if r.get("train_inference_steps") is not None]
    checks["inference"] = {
        "verdict": "stable" if worst < stability["limit"] else "unstable",
        "stiffness_initial": stability["stiffness"],
        "stiffness_worst": worst,
        "limit": stability["limit"],
        "lambda_max_initial": stability["lambda_max"],
        "step_size": settings.inference.step_size,  # auto: it followed the curvature
        "step_size_initial": stability["step_size"],
        "step_size_final": records[-1].get("step_size", stability["step_size"]) if records else stability["step_size"],
        "energy_rises_per_batch": rises,
        # per epoch, the mean inference steps a batch ran: T, or fewer where inference.tolerance saw it converge
        "steps": settings.inference.steps,
        "tolerance": settings.inference.tolerance,
        "steps_used_per_epoch": used,
    }
    if stability["log_variance_min"] is not None and records and "variance" in records[-1]:
        layers = records[-1]["variance"]
        # the output layer's variance is not a hidden one; with a cross-entropy output there is none (mlp.py)
        hidden = layers if settings.output_loss == "ce" else layers[:-1]
        at_floor = sum(layer["at_floor"] for layer in hidden) / max(len(hidden), 1)
        spread = max(layer["std"] for layer in layers)  # across the neurons of a layer
        # ∂E/∂log S is about +1/2 for every inferred neuron: Adam moves them all alike unless the data tell them apart
        verdict = (
            "hidden variances at the floor"
            if at_floor > 0.5
            else "uniform drift (not a per-neuron variance)"
            if spread < UNIFORM_SPREAD
            else "learned per neuron"
        )
        checks["variance"] = {
            "verdict": verdict,
            "spread": spread,
            "log_variance_min_initial": stability["log_variance_min"],
            "log_variance_min": records[-1]["log_variance_min"],
            "hidden_at_floor": at_floor,
            "layers": layers,
        }
    return checks


def _summary(settings: Settings, run_dir: Path, history: History, status: str, num_classes: int) -> dict[str, Any]:
    records = history.records
    last = records[-1] if records else {}
    accs = [r["test_acc"] for r in records if r.get("test_acc") is not None]
    val_accs = [r["val_acc"] for r in records if r.get("val_acc") is not None]
    if status == "complete" and not learned(settings, last.get("test_acc"), num_classes):
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
    conditions = RunConditions(tracking.condition2_every, tracking.condition2_max_multiple) if pc else None
    # the freshly drawn weights are W0 (a resumed run redraws the same ones from the seed before loading its checkpoint)
    layers = LayerLearning([layer.weight for layer in model.mlp.layers])
    mid_epoch = MidEpochCheckpoints(run_dir / "checkpoints" / "last.ckpt", settings.checkpoint.every_minutes)
    added = [hydra.utils.instantiate(node) for node in settings.callbacks.values()]  # conf/callbacks
    return Callbacks(History(tracking.evals_per_epoch), layers, conditions, others + added + [checkpoints, mid_epoch])


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
        build = hydra.utils.instantiate(node, _partial_=True)
        loggers.append(build(**{k: v for k, v in runtime.items() if k in accepts and k not in node}))
    wandb_run = next((logger.experiment for logger in loggers if isinstance(logger, AxesWandbLogger)), None)
    return loggers, wandb_run


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
        trainer = L.Trainer(
            max_epochs=settings.epochs,
            accelerator=accelerator,
            devices=device_ids,
            plugins=plugins + [AtomicCheckpointIO()],
            precision=trainer_settings.precision,  # type: ignore[arg-type]  # Lightning's Literal; settings check it
            logger=loggers,
            callbacks=callbacks,
            enable_progress_bar=trainer_settings.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=trainer_settings.log_every_n_steps,
            default_root_dir=run_dir,
        )
        log.info(f"training {run_dir.name} ({settings.epochs} epochs on {trainer.strategy.root_device}{resume})")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*is not a `torch.utils.data.DataLoader`.*")
            try:
                trainer.fit(model, datamodule=datamodule, ckpt_path=last)
            except SIGTERMException:  # Lightning's own handler (before training started): no mid-epoch state
                raise Interrupted(trainer.current_epoch, 0, signal.SIGTERM) from None


def announce(summary: dict, run_dir: Path, num_classes: int) -> None:
    """One line on how the run ended."""
    if summary["status"] == "diverged":
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
    summary["checks"] = run_checks(settings, summary, callbacks.conditions, stability)
    summary["conditions"] = callbacks.conditions.records if callbacks.conditions is not None else []
    summary["layers"] = callbacks.layers.records
    if model.diverged:
        write_atomic(run_dir / "DIVERGED", f"{model.diverged_reason}\n")
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))  # last: the run is finished once it exists
    return summary


LAUNCH_FILES = (".hydra", "pcsweep.log")  # what Hydra writes into a single run's folder before pcsweep runs


def set_aside_if_other_settings(run_dir: Path, settings: Settings) -> None:
    """A folder at this run's name whose ``config.yaml`` has another identity (a default changed since it ran: its
    name was hashed from what differed from the defaults of its day) is renamed ``<name>.other-<its hash>``: it is
    not this run, so it must neither be resumed nor answer as finished. Its settings still find it under that name."""
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return
    try:
        theirs = config_hash(cast(dict, OmegaConf.to_container(OmegaConf.load(stored))))
    except Exception:  # unreadable: the run's own checks (resume, finished) deal with it
        return
    if theirs == config_hash(settings):
        return
    aside, n = run_dir.with_name(f"{run_dir.name}.other-{theirs}"), 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.other-{theirs}.{n}")
    aside.mkdir()
    for child in run_dir.iterdir():
        if child.name not in LAUNCH_FILES:  # this launch's Hydra record and log stay with this run
            os.replace(child, aside / child.name)
    log.info(f"{run_dir.name} held a run with other settings (a default has changed since): moved to {aside.name}")


def adopt_previous_folder(run_dir: Path, settings: Settings) -> None:
    """Move this run's folder from an earlier release's naming, if there is one, so it resumes or is skipped.
    (A single run's folder may already exist, holding only what Hydra wrote into it: the old files join it.)"""
    set_aside_if_other_settings(run_dir, settings)
    previous = None if (run_dir / "config.yaml").exists() else find_previous_folder(run_dir.parent, settings)
    if previous is None:
        return
    if not run_dir.exists():
        os.replace(previous, run_dir)
    else:
        for child in previous.iterdir():
            if not (run_dir / child.name).exists():
                os.replace(child, run_dir / child.name)
        shutil.rmtree(previous)  # what is left there is Hydra's record of the earlier launch
    log.info(f"{previous.name} holds this run under an earlier folder name: renamed to {run_dir.name}")


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


def train(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train (or resume, or skip) the run ``cfg`` describes; returns its summary. Raises ``UserError`` (one line)
    for bad input, before any folder is made, and for a full disk."""
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
    run_dir = Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    done = skipped(settings, run_dir)
    if done is not None:
        return done
    dataset = load_dataset(settings.dataset)  # a missing dataset is one line (DatasetError), not a traceback
    model = build_model(settings, dataset.num_features, dataset.num_classes)
    stability = check_stability(settings, model, dataset) if isinstance(model, PCModule) else None  # before any folder
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(run_dir):
            done = finished_summary(run_dir)  # finished by another process since the check above
            return done if done is not None else train_owned(settings, run_dir, dataset, model, stability)
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
    announce(summary, run_dir, dataset.num_classes)
    return summary
