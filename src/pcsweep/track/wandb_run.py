"""A run's W&B life: started without ever hanging, filed and charted, then given its summary and final weights."""

from __future__ import annotations

import dataclasses
import logging
import netrc
import os
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from pcsweep.config.compose import family_name, paper_name
from pcsweep.config.settings import Settings
from pcsweep.run.files import write_atomic
from pcsweep.sweep.tuning import lr_origin
from pcsweep.track.history import History
from pcsweep.track.metrics_log import EPOCH, SECONDS, STEP

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)


def has_api_key() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(wandb_base_url()).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def server_reachable(url: str, timeout: float) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``WANDB_MODE`` wins; ``auto`` is online with an API key and offline without."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if mode == "auto":
        return "online" if has_api_key() else "offline"
    return mode


def _wandb_id(run_dir: Path) -> str:
    """One W&B run per run folder: the id is made once and kept, so a resumed run continues its W&B run."""
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    write_atomic(path, run_id + "\n")
    return run_id


_online_failed = False  # once W&B could not be reached, the rest of this process's runs go offline at once


def start_wandb(
    run_dir: Path,
    *,
    project: str = "pcsweep",
    entity: str | None = None,
    mode: str = "auto",
    init_timeout: float = 30,
    **init_kwargs: Any,
):
    """``wandb.init`` that never hangs: no key -> offline; an unreachable server -> offline, after a bounded wait.
    ``mode``: auto (online with an API key, else offline) | online | offline | disabled; ``init_timeout``: seconds
    to reach the server before falling back to offline."""
    global _online_failed
    import wandb  # half a second to import: only runs that log to W&B pay it

    mode = resolve_wandb_mode(mode)
    if mode == "online" and _online_failed:
        mode = "offline"
    timeout = float(init_timeout)
    kwargs = dict(
        project=project, entity=entity, dir=str(run_dir), id=_wandb_id(run_dir), resume="allow", **init_kwargs
    )
    # create_new: a pack trains several runs in one process, each its own W&B run (pc.gang)
    settings = wandb.Settings(init_timeout=timeout, silent=True, reinit="create_new")
    if mode == "online" and not server_reachable(wandb_base_url(), min(timeout, 10.0)):
        log.info(f"W&B server {wandb_base_url()} unreachable: logging offline")
        mode, _online_failed = "offline", True
    try:
        # wandb's stubs take a Literal; mode is any WANDB_MODE value, which wandb.init checks itself
        run = wandb.init(mode=mode, settings=settings, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:  # wandb raises several types on network and auth trouble
        if mode != "online":
            raise
        log.info(f"W&B online start failed ({type(exc).__name__}): logging offline")
        wandb.teardown()  # the half-started online run still holds its id in W&B's service process
        mode, _online_failed = "offline", True
        run = wandb.init(mode=mode, settings=settings, **kwargs)  # type: ignore[arg-type]
    if mode == "offline":
        log.info(f"W&B offline; upload later with: wandb sync {run_dir}/wandb/offline-run-*")
    return run


# What a run's W&B summary keeps of a metric (the rest: its last value). "max,last" shows as test/acc.max and
# test/acc.last. The test loss keeps its minimum too (the best the model got, as for accuracy); a training loss is
# noisy per batch, so only its last (epoch mean or batch) value means anything.
SUMMARIES = {
    "test/acc": "max,last",
    "train/acc": "max,last",
    "test/loss": "min,last",
    "val/acc": "max,last",  # with dataset.val_fraction
    "val/loss": "min,last",
    "train/loss": "last",
    "train/loss_step": "last",
}


def define_axes(run) -> None:
    """``define_metric`` for a W&B run pcsweep started (Lightning's WandbLogger only does it for runs it starts):
    every metric against ``metrics_log.STEP``."""
    run.define_metric(STEP)
    run.define_metric("*", step_metric=STEP, step_sync=True)
    for name, summary in SUMMARIES.items():  # a metric defined by name no longer follows the glob: its axis again
        run.define_metric(name, step_metric=STEP, step_sync=True, summary=summary)


def training_seconds(trainer: L.Trainer | None) -> float | None:
    """The run's training time so far (the ``History`` callback's clock), or None without one."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, History):
            return callback.train_seconds
    return None


def axes(trainer: L.Trainer, step: int) -> dict[str, Any]:
    """The x-axis values of a row logged at ``step`` (for ``run.log`` outside Lightning's loggers)."""
    seconds = training_seconds(trainer)
    return {STEP: step, EPOCH: trainer.current_epoch, **({SECONDS: seconds} if seconds is not None else {})}


def wandb_runs(trainer: L.Trainer) -> list:
    """The W&B runs among the trainer's loggers (none when W&B is off)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class AxesWandbLogger(WandbLogger):
    """Lightning's WandbLogger on a run started by ``start_wandb``: the x-axes defined, and every row it logs carries
    the step (Lightning's), the epoch and the training seconds."""

    def __init__(self, experiment) -> None:
        super().__init__(experiment=experiment)
        define_axes(experiment)
        self._module: L.LightningModule | None = None

    def log_graph(self, model, input_array=None) -> None:
        """Lightning calls this with the LightningModule when fit starts: the epoch and the clock are read from it."""
        self._module = model
        super().log_graph(model, input_array)

    def log_metrics(self, metrics, step: int | None = None) -> None:
        module = self._module
        trainer = module._trainer if module is not None else None
        if trainer is not None:
            seconds = training_seconds(trainer)  # the clock itself: what Lightning logs of it is a float32 copy
            metrics = {EPOCH: trainer.current_epoch, **metrics, **({SECONDS: seconds} if seconds is not None else {})}
        super().log_metrics(metrics, step)


def wandb_logger(run_dir: Path, labels: dict[str, Any], **options: Any) -> AxesWandbLogger:
    """``conf/logger/wandb.yaml``'s ``_target_``: a W&B run for the run folder (``start_wandb``'s options; filed as
    ``run_labels`` says), with pcsweep's x-axes."""
    return AxesWandbLogger(start_wandb(run_dir, **options, **labels))


def run_labels(settings: Settings) -> dict[str, Any]:
    """How W&B files a run (``wandb.init`` arguments): grouped by its family (the identity without the seed: W&B
    aggregates the seeds), job type its twin, tags and flat config keys to filter by twin, size, dataset, sweep and
    seed."""
    twin, sweep, family = settings.twin, settings.tracking.group or settings.sweep_name, family_name(settings)
    tags = {
        "twin": twin,
        "width": settings.width,
        "depth": settings.depth,
        "dataset": settings.dataset.name,
        "sweep": sweep,
        "seed": settings.seed,
    }
    return {
        "name": f"{paper_name(settings)}_{settings.dataset.name}",
        "group": family,
        "job_type": twin,
        "tags": [f"{k}={v}"[:64] for k, v in tags.items()],  # W&B refuses longer tags
        "config": {
            **dataclasses.asdict(settings),
            "twin": twin,
            "family": family,
            "sweep": sweep,
            "lr_origin": lr_origin(settings),  # tuned (and how), the twin's default, or given
        },
    }


def run_summary(summary: dict) -> dict[str, Any]:
    """A finished run's ``summary.json`` as W&B summary keys: its numbers and status, each check's verdict as
    ``checks/<name>`` (the details stay in summary.json, logged with the weights)."""
    kept = {
        k: v for k, v in summary.items() if k not in ("history", "config", "curve", "conditions", "layers", "checks")
    }
    kept.update({f"checks/{name}": str(check.get("verdict")) for name, check in (summary.get("checks") or {}).items()})
    return kept


def log_final_artifacts(wandb_run, run_dir: Path, summary: dict) -> None:
    """The final weights (with the run's config and summary) as a ``model`` artifact, ``weights-<run folder>``."""
    import wandb  # half a second to import: only runs that log to W&B pay it

    run_dir = Path(run_dir)
    weights = run_dir / "weights.pt"
    if wandb_run.disabled or not weights.is_file():
        return
    artifact = wandb.Artifact(
        f"weights-{run_dir.name}",
        type="model",
        metadata={
            "status": summary.get("status"),
            "final_test_acc": summary.get("final_test_acc"),
            "seed": (summary.get("config") or {}).get("seed"),
            "family": wandb_run.group,
        },
    )
    artifact.add_file(str(weights))
    for name in ("config.yaml", "summary.json"):
        if (run_dir / name).is_file():
            artifact.add_file(str(run_dir / name))
    wandb_run.log_artifact(artifact)
