"""One training run from a composed config: the Hydra task function's body, usable without Hydra's CLI.

A run's folder holds ``config.yaml`` (resolved), ``metrics.csv`` (Lightning's CSV logger), ``checkpoints/last.ckpt``
(every epoch), ``weights.pt`` (final parameters, log-variances included) and ``summary.json``; a run that blew up
also gets a ``DIVERGED`` marker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from pcsweep.conditions import Condition2Thresholds, UnstableSetting, condition2_verdict, preflight_stability
from pcsweep.config import ConfigError, duplicate_target, paper_name, twin_name, validate
from pcsweep.devices import training_devices
from pcsweep.data import BUNDLED, DatasetError, TensorDataModule, load_dataset
from pcsweep.history import History, time_to_fraction
from pcsweep.mlp import MLP
from pcsweep.models import BPModule, PCModule, TwinModule
from pcsweep.tracking import (EnergyTraces, LayerLearning, ResumableCSVLogger, RunConditions, WeightHistograms,
                              start_wandb, trim_metrics)

FINISHED = ("complete", "diverged", "failed_to_learn")
UNIFORM_SPREAD = 1e-3  # log S spread across a layer's neurons below which the variance is one number per layer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write the checkpoint beside its final name, then rename: a kill mid-write leaves the previous one intact."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


def fail(message: str) -> None:
    """One line on stderr and a non-zero exit, before any work: no traceback for a user's typo."""
    print(f"pcsweep: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


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
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") in FINISHED else None


def build_model(cfg: DictConfig, num_features: int, num_classes: int) -> TwinModule:
    """The twin ``cfg.algo.name`` on a fresh MLP; the MLP is drawn first, so both twins start from the same weights."""
    torch.manual_seed(cfg.seed)
    mlp = MLP(num_features, cfg.width, cfg.depth, num_classes, activation=cfg.activation, init=cfg.init)
    common = dict(
        mlp=mlp,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        output_loss=cfg.output_loss,
        weight_decay=cfg.weight_decay,
        variance_weight_decay=cfg.variance_weight_decay,
    )
    if cfg.algo.name == "bp":
        return BPModule(**common)
    return PCModule(
        **common,
        inference_steps=cfg.inference.steps,
        inference_step_size=cfg.inference.step_size,
        inference_tolerance=cfg.inference.tolerance,
        inference_check_every=cfg.inference.check_every,
        inference_momentum=cfg.inference.momentum,
        update_every=cfg.relax.update_every,
        variance=cfg.relax.variance,
        # "auto" is set by check_stability, from the curvature measured at the initial weights
        log_variance_min=-math.inf if cfg.relax.log_variance_min == "auto" else float(cfg.relax.log_variance_min),
        trace_energy=cfg.tracking.energy_trace,
        alignment_every=cfg.tracking.alignment_every,
        divergence_factor=cfg.tracking.divergence_factor,
        variance_floor_every=cfg.variance_floor_every,
    )


def measure_stability(cfg: DictConfig, model: PCModule, dataset) -> dict:
    """At the initial weights on the first training batch: ``preflight_stability`` (raises ``UnstableSetting``).
    The sweeper runs it for every PC job before launching any; each run again, to set its automatic floor."""
    inputs, target = model.probe_batch(dataset.train, cfg.batch_size)
    return preflight_stability(model.engine, inputs, target, cfg.relax.log_variance_min,
                               trainable_variance=model.log_variances is not None)


def check_stability(cfg: DictConfig, model: PCModule, dataset) -> dict:
    """Pre-flight: a step size or variance floor that makes inference diverge is one line, not a run;
    ``relax.log_variance_min=auto`` becomes the floor that keeps it stable."""
    try:
        stability = measure_stability(cfg, model, dataset)
    except UnstableSetting as exc:
        fail(str(exc))
    if stability["log_variance_min"] is not None:
        model.engine.log_variance_min = stability["log_variance_min"]
        model.engine.refresh_parameters()
        model.floor_stiffness = stability["floor_stiffness"]
    return stability


def learned(cfg: DictConfig, final_test_acc: Optional[float], num_classes: int) -> bool:
    """A final accuracy more than ``tracking.chance_margin`` above chance."""
    return final_test_acc is not None and final_test_acc >= 1.0 / num_classes + cfg.tracking.chance_margin


def run_checks(cfg: DictConfig, summary: dict, conditions: Optional[RunConditions], stability: Optional[dict]) -> dict:
    """Whether the run's assumptions held, each with a verdict and its numbers (the summary's ``checks``)."""
    chance = 1.0 / summary["num_classes"]
    final = summary.get("final_test_acc")
    checks: dict[str, Any] = {"learned": {"verdict": "learned" if learned(cfg, final, summary["num_classes"])
                                                     else "failed to learn", "final_test_acc": final,
                                          "chance": chance, "margin": cfg.tracking.chance_margin}}
    if conditions is None:
        return checks
    records = conditions.records
    limits = Condition2Thresholds(cfg.tracking.condition2_max_gap, cfg.tracking.condition2_min_cosine)
    checks["condition2"] = condition2_verdict([r["condition2"] for r in records], cfg.relax.update_every is not None,
                                              limits)
    worst = max((r["stiffness"] for r in records), default=stability["stiffness"])
    rises = [r.get("train_energy_rises") for r in summary["history"] if r.get("train_energy_rises") is not None]
    checks["inference"] = {"verdict": "stable" if worst < stability["limit"] else "unstable",
                           "stiffness_initial": stability["stiffness"], "stiffness_worst": worst,
                           "limit": stability["limit"], "lambda_max_initial": stability["lambda_max"],
                           "energy_rises_per_batch": rises}
    if stability["log_variance_min"] is not None and records and "variance" in records[-1]:
        layers = records[-1]["variance"]
        at_floor = sum(layer["at_floor"] for layer in layers[:-1]) / max(len(layers) - 1, 1)
        spread = max(layer["std"] for layer in layers)  # across the neurons of a layer
        # ∂E/∂log S is about +1/2 for every inferred neuron: Adam moves them all alike unless the data tell them apart
        verdict = ("hidden variances at the floor" if at_floor > 0.5 else
                   "uniform drift (not a per-neuron variance)" if spread < UNIFORM_SPREAD else "learned per neuron")
        checks["variance"] = {
            "verdict": verdict, "spread": spread,
            "log_variance_min_initial": stability["log_variance_min"],
            "log_variance_min": records[-1]["log_variance_min"], "hidden_at_floor": at_floor, "layers": layers}
    return checks


def _summary(cfg: DictConfig, run_dir: Path, history: History, status: str, num_classes: int) -> dict[str, Any]:
    records = history.records
    last = records[-1] if records else {}
    accs = [r["test_acc"] for r in records if r.get("test_acc") is not None]
    if status == "complete" and not learned(cfg, last.get("test_acc"), num_classes):
        status = "failed_to_learn"  # listed, never ranked: a time to 90% of chance means nothing
    t90 = time_to_fraction(history.curve or records, 0.9) if status == "complete" else None
    return {
        "name": paper_name(cfg),
        "dataset": cfg.dataset.name,
        "run_dir": run_dir.name,
        "status": status,
        "diverged": status == "diverged",
        "epochs": len(records),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max(accs) if accs else None,
        "final_train_loss": last.get("train_loss"),
        "final_test_loss": last.get("test_loss"),
        "train_seconds": history.train_seconds,
        "time_to_90": t90["train_seconds"] if t90 else None,
        "epoch_to_90": t90["epoch"] if t90 else None,
        "step_to_90": t90["step"] if t90 else None,
        "epochs_to_90": t90.get("epochs") if t90 else None,
        "num_classes": num_classes,
        "history": records,
        "curve": history.curve,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def train(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train (or resume, or skip) the run ``cfg`` describes; returns its summary."""
    quiet_lightning()
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        validate(cfg)
    except ConfigError as exc:
        fail(str(exc))
    target = duplicate_target(cfg)
    if target is not None:
        print(f"[pcsweep] skipped {paper_name(cfg)} relax={cfg.relax.name}: duplicate of {target}", flush=True)
        return {"name": paper_name(cfg), "dataset": cfg.dataset.name, "status": "duplicate", "duplicate_of": target}
    if run_dir is None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir = Path(run_dir)
    done = finished_summary(run_dir)
    if done is not None:
        print(f"[pcsweep] {run_dir.name}: already {done['status']}, nothing to train", flush=True)
        return done

    try:  # before any training: a missing dataset is one line, not a traceback (load_dataset checks the files)
        if cfg.dataset.name not in BUNDLED:
            cfg.dataset.data_dir = str(resolve_data_dir(cfg))
        dataset = load_dataset(cfg.dataset)
    except DatasetError as exc:
        fail(str(exc))

    model = build_model(cfg, dataset.num_features, dataset.num_classes)
    stability = check_stability(cfg, model, dataset) if isinstance(model, PCModule) else None  # before any folder
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    datamodule = TensorDataModule(dataset, cfg.batch_size, seed=cfg.seed)
    history = History(cfg.tracking.evals_per_epoch)
    # one file, rewritten after every epoch's validation (save_last alone only mirrors top-k saves)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False,
        save_on_train_epoch_end=True,  # after every callback's epoch-end work (the condition probes) is in its state
    )
    # the freshly drawn weights are W0 (a resumed run redraws the same ones from the seed before loading its checkpoint)
    layer_learning = LayerLearning([layer.weight for layer in model.mlp.layers])
    callbacks = [history, WeightHistograms(run_dir, cfg.tracking.histogram_every), layer_learning]
    if cfg.algo.name == "pc" and cfg.tracking.energy_trace:
        callbacks.append(EnergyTraces(run_dir, cfg.tracking.energy_tolerance))
    conditions = None
    if stability is not None:
        conditions = RunConditions(cfg.tracking.condition2_every, cfg.tracking.condition2_max_multiple)
        callbacks.append(conditions)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = ""
    if last.is_file():
        # mmap: only the epoch is read here; Lightning loads the tensors once, in fit
        completed_epoch = torch.load(last, map_location="cpu", weights_only=False, mmap=True)["epoch"]
        trim_metrics(run_dir / "metrics.csv", last_epoch=completed_epoch)
        resume = f", resuming after epoch {completed_epoch} from {last.relative_to(run_dir)}"

    loggers: list = [ResumableCSVLogger(run_dir)]
    wandb_run = None
    if cfg.logger.name == "wandb":
        name = f"{paper_name(cfg)}_{cfg.dataset.name}"
        wandb_run = start_wandb(
            cfg.logger, run_dir, name=name, group=cfg.tracking.group or cfg.sweep_name, job_type=twin_name(cfg),
            tags=[cfg.dataset.name, f"width={cfg.width}", f"depth={cfg.depth}", f"relax={cfg.relax.name}"],
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        loggers.append(L.pytorch.loggers.WandbLogger(experiment=wandb_run))
    succeeded = False
    try:
        # holds a GPU slot (launcher=gpus) until training ends
        with training_devices(cfg.trainer.accelerator, cfg.trainer.gpu_slots, run_dir.parent / ".gpu_slots") as (
            accelerator, device_ids, plugins
        ):
            trainer = L.Trainer(
                max_epochs=cfg.epochs,
                accelerator=accelerator,
                devices=device_ids,
                plugins=plugins + [AtomicCheckpointIO()],
                precision=cfg.trainer.precision,
                logger=loggers,
                callbacks=callbacks + [checkpoints],
                enable_progress_bar=cfg.trainer.progress_bar,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                log_every_n_steps=cfg.trainer.log_every_n_steps,
                default_root_dir=run_dir,
            )
            print(f"[pcsweep] training {run_dir.name} ({cfg.epochs} epochs on {trainer.strategy.root_device}{resume})",
                  flush=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*does not have many workers.*")
                warnings.filterwarnings("ignore", ".*is not a `torch.utils.data.DataLoader`.*")
                trainer.fit(model, datamodule=datamodule, ckpt_path=last if last.is_file() else None)

        status = "diverged" if model.diverged else "complete"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(("train_", "test_"))},
                   run_dir / "weights.pt")
        summary = _summary(cfg, run_dir, history, status, dataset.num_classes)
        summary["diverged_reason"] = model.diverged_reason
        summary["checks"] = run_checks(cfg, summary, conditions, stability)
        summary["conditions"] = conditions.records if conditions is not None else []
        summary["layers"] = layer_learning.records
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in summary.items()
                                      if k not in ("history", "config", "curve", "conditions", "layers")})
        succeeded = True
    finally:  # a failing run still closes its W&B run (marked failed), so the dashboard never shows it running
        if wandb_run is not None:
            wandb_run.finish(exit_code=0 if succeeded else 1)
    if model.diverged:
        (run_dir / "DIVERGED").write_text(f"{model.diverged_reason}\n")
        print(f"[pcsweep] {run_dir.name}: diverged ({model.diverged_reason}); marked, the sweep goes on", flush=True)
    elif summary["status"] == "failed_to_learn":
        print(f"[pcsweep] {run_dir.name}: failed to learn (test accuracy {summary['final_test_acc']:.4f}, chance "
              f"{1 / dataset.num_classes:.2f}); listed, not ranked", flush=True)
    else:
        print(f"[pcsweep] {run_dir.name}: test accuracy {summary['final_test_acc']:.4f} after "
              f"{summary['train_seconds']:.1f} s of training", flush=True)
    return summary
