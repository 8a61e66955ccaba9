"""One training run from a composed config: the Hydra task function's body, usable without Hydra's CLI.

A run's folder holds ``config.yaml`` (resolved), ``metrics.csv`` (Lightning's CSV logger), ``checkpoints/last.ckpt``
(every epoch), ``weights.pt`` (final parameters, log-variances included) and ``summary.json``; a run that blew up
also gets a ``DIVERGED`` marker.
"""

from __future__ import annotations

import json
import logging
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

from pcsweep.config import ConfigError, duplicate_target, paper_name, twin_name, validate
from pcsweep.devices import training_devices
from pcsweep.data import DatasetError, TensorDataModule, load_dataset
from pcsweep.history import History, time_to_fraction
from pcsweep.mlp import MLP
from pcsweep.models import BPModule, PCModule, TwinModule
from pcsweep.tracking import EnergyTraces, ResumableCSVLogger, WeightHistograms, start_wandb, trim_metrics

FINISHED = ("complete", "diverged")


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
        update_every=cfg.relax.update_every,
        variance=cfg.relax.variance,
        log_variance_min=cfg.relax.log_variance_min,
        trace_energy=cfg.tracking.energy_trace,
        alignment_every=cfg.tracking.alignment_every,
    )


def _summary(cfg: DictConfig, run_dir: Path, history: History, status: str) -> dict[str, Any]:
    records = history.records
    last = records[-1] if records else {}
    accs = [r["test_acc"] for r in records if r.get("test_acc") is not None]
    t90 = time_to_fraction(records, 0.9) if status == "complete" else None
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
        "history": records,
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
        if cfg.dataset.name != "digits":
            cfg.dataset.data_dir = str(resolve_data_dir(cfg))
        dataset = load_dataset(cfg.dataset)
    except DatasetError as exc:
        fail(str(exc))

    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    model = build_model(cfg, dataset.num_features, dataset.num_classes)
    datamodule = TensorDataModule(dataset, cfg.batch_size, seed=cfg.seed)
    history = History()
    # one file, rewritten after every epoch's validation (save_last alone only mirrors top-k saves)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
    )
    callbacks = [history, WeightHistograms(run_dir, cfg.tracking.histogram_every)]
    if cfg.algo.name == "pc" and cfg.tracking.energy_trace:
        callbacks.append(EnergyTraces(run_dir, cfg.tracking.energy_tolerance))
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
        summary = _summary(cfg, run_dir, history, status)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in summary.items() if k not in ("history", "config")})
        succeeded = True
    finally:  # a failing run still closes its W&B run (marked failed), so the dashboard never shows it running
        if wandb_run is not None:
            wandb_run.finish(exit_code=0 if succeeded else 1)
    if model.diverged:
        (run_dir / "DIVERGED").write_text(f"non-finite loss or energy in epoch {trainer.current_epoch}\n")
        print(f"[pcsweep] {run_dir.name}: diverged (non-finite loss or energy); marked, the sweep goes on", flush=True)
    else:
        print(f"[pcsweep] {run_dir.name}: test accuracy {summary['final_test_acc']:.4f} after "
              f"{summary['train_seconds']:.1f} s of training", flush=True)
    return summary
