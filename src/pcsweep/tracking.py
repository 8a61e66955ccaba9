"""What a run records: the CSV log (kept across resumes), W&B (never hangs), histograms and PC diagnostics."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import netrc
import os
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from pcsweep.files import read_json, write_atomic
from pcsweep.settings import Settings
from pcsweep.tuning import lr_origin

if TYPE_CHECKING:
    from pcsweep.models import PCModule, TwinModule

log = logging.getLogger(__name__)


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
        return cast(ExperimentWriter, self._experiment)  # only ever an _AppendingWriter


def trim_metrics(
    path: Path | str, last_epoch: int, last_step: Optional[int] = None, step_epoch: Optional[int] = None
) -> None:
    """Drop the rows a resumed run will log again: everything after the epoch its checkpoint completed, except (a
    mid-epoch checkpoint) the rows of ``step_epoch`` logged at steps up to ``last_step``."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or [], list(reader)

    def keep(row: dict) -> bool:
        if row.get("epoch", "") == "":
            return False
        epoch = float(row["epoch"])
        return epoch <= last_epoch or (
            epoch == step_epoch
            and row.get("step", "") != ""
            and float(row["step"]) <= cast(int, last_step)  # given with step_epoch
        )

    kept = [row for row in rows if keep(row)]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    write_atomic(path, text.getvalue())


# ------------------------------------------------------------------------------------------------ W&B
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
    import wandb

    mode = resolve_wandb_mode(mode)
    if mode == "online" and _online_failed:
        mode = "offline"
    timeout = float(init_timeout)
    kwargs = dict(
        project=project, entity=entity, dir=str(run_dir), id=_wandb_id(run_dir), resume="allow", **init_kwargs
    )
    settings = wandb.Settings(init_timeout=timeout, silent=True)
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


# W&B's x-axes. Every metric is charted against STEP, training batches seen (Lightning's ``_batches_that_stepped``
# and ``batch_step``: one per batch, however many optimizer steps PC takes in it), so BP and PC curves of one size
# overlay; EPOCH and SECONDS (training wall time, evaluation excluded: ``History.train_seconds``) ride along in every
# row, to be picked as the x-axis instead.
STEP, EPOCH, SECONDS = "trainer/global_step", "epoch", "time/train_seconds"
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
    """``define_metric`` for a W&B run pcsweep started (Lightning's WandbLogger only does it for runs it starts)."""
    run.define_metric(STEP)
    run.define_metric("*", step_metric=STEP, step_sync=True)
    for name, summary in SUMMARIES.items():  # a metric defined by name no longer follows the glob: its axis again
        run.define_metric(name, step_metric=STEP, step_sync=True, summary=summary)


def training_seconds(trainer: L.Trainer | None) -> float | None:
    """The run's training time so far (the ``History`` callback's clock), or None without one."""
    from pcsweep.history import History

    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, History):
            return callback.train_seconds
    return None


def axes(trainer: L.Trainer, step: int) -> dict[str, Any]:
    """The x-axis values of a row logged at ``step`` (for ``run.log`` outside Lightning's loggers)."""
    seconds = training_seconds(trainer)
    return {STEP: step, EPOCH: trainer.current_epoch, **({SECONDS: seconds} if seconds is not None else {})}


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
    from pcsweep.config import family_name, paper_name

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
    import wandb

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


# ------------------------------------------------------------------------------------------------ callbacks
def batch_step(trainer: L.Trainer, batch_idx: int) -> int:
    """The x-axis of per-batch logs: training batches seen so far (also across resumes); the step Lightning gives
    its loggers (``_batches_that_stepped``) for the same batch, whatever the number of optimizer steps in it."""
    # num_training_batches is inf only for a loader without a length; pcsweep's always have one
    return trainer.current_epoch * cast(int, trainer.num_training_batches) + batch_idx


def log_direct(pl_module: L.LightningModule, metrics: dict[str, float], step: int) -> None:
    """Log now to every logger, outside Lightning's every-n-steps cadence (for sparse diagnostics)."""
    metrics = {**metrics, EPOCH: pl_module.current_epoch}  # the CSV log is trimmed by epoch on resume
    for logger in pl_module.loggers:
        logger.log_metrics(metrics, step=step)


def wandb_runs(trainer: L.Trainer) -> list:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def histogram(values: torch.Tensor, bins: int = 64) -> dict[str, Any]:
    values = values.detach().double().flatten().cpu()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return {"min": 0.0, "max": 1.0, "counts": [0] * bins}
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-9 * max(1.0, abs(lo)):
        lo, hi = lo - 1e-6 * max(1.0, abs(lo)), hi + 1e-6 * max(1.0, abs(hi))
    return {"min": lo, "max": hi, "counts": torch.histc(values, bins=bins, min=lo, max=hi).long().tolist()}


class WeightHistograms(L.Callback):
    """Every ``every`` epochs: a histogram of each layer's weights (and variances Σ for rc3/rc23) to W&B and to
    ``histograms.json`` in the run folder."""

    def __init__(self, run_dir: Path, every: int = 1) -> None:
        self.path, self.every = Path(run_dir) / "histograms.json", every

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module = cast("TwinModule", pl_module)
        epoch = trainer.current_epoch
        if not self.every or (epoch + 1) % self.every or trainer.sanity_checking or pl_module.diverged:
            return
        tensors = {f"weights/W{l + 1}": layer.weight for l, layer in enumerate(pl_module.mlp.layers)}
        if pl_module.log_variances is not None:
            tensors.update({f"variances/S{l + 1}": torch.exp(s) for l, s in enumerate(pl_module.log_variances)})
        hists = {name: histogram(t) for name, t in tensors.items()}
        record = {"epoch": epoch, **hists}
        history = read_json(self.path) or []
        history = [h for h in history if h["epoch"] < epoch] + [record]  # a resumed epoch replaces its old entry
        write_atomic(self.path, json.dumps(history))
        runs = wandb_runs(trainer)
        if runs:
            import wandb

            # from our own bins: numpy's refuses a range as narrow as a barely-trained variance's
            data = {
                # wandb's annotation says ndarrays; it takes lists (it calls .tolist() only where there is one)
                name: wandb.Histogram(
                    np_histogram=(  # type: ignore[arg-type]
                        h["counts"],
                        torch.linspace(h["min"], h["max"], len(h["counts"]) + 1).tolist(),
                    )
                )
                for name, h in hists.items()
            }
            for run in runs:  # at the epoch's last batch, with the other end-of-epoch rows
                run.log({**data, **axes(trainer, batch_step(trainer, cast(int, trainer.num_training_batches) - 1))})


class EnergyTraces(L.Callback):
    """Condition 2 measured: the inference energy at every step of each epoch's first batch (PC twins), with the
    step at which its relative change first fell below ``tolerance``; kept in ``energy_traces.json`` and plotted
    in W&B as one line per epoch."""

    def __init__(self, run_dir: Path, tolerance: float = 1e-4) -> None:
        self.path, self.tolerance = Path(run_dir) / "energy_traces.json", tolerance
        self.traces: dict[str, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trace = getattr(pl_module, "latest_energy_trace", None)
        if trace is None:
            return
        pl_module.latest_energy_trace = None
        values = trace.detach().cpu().tolist()
        epoch = trainer.current_epoch
        self.traces[str(epoch)] = values
        write_atomic(self.path, json.dumps({"tolerance": self.tolerance, "traces": self.traces}))
        converged = steps_to_tolerance(values, self.tolerance)
        log_direct(
            pl_module,
            {
                "inference/steps_to_tolerance": float(converged if converged is not None else len(values)),
                "inference/energy_first": values[0],
                "inference/energy_last": values[-1],
            },
            step=batch_step(trainer, batch_idx),
        )
        runs = wandb_runs(trainer)
        if runs:
            import wandb

            epochs = sorted(self.traces, key=int)
            plot = wandb.plot.line_series(
                xs=list(range(len(values))),
                ys=[self.traces[e] for e in epochs],
                keys=[f"epoch {e}" for e in epochs],
                title="Inference energy, first batch",
                xname="inference step",
            )
            for run in runs:
                run.log({"inference/energy_trace": plot, **axes(trainer, batch_step(trainer, batch_idx))})

    def state_dict(self) -> dict:
        return {"traces": self.traces}

    def load_state_dict(self, state_dict: dict) -> None:
        self.traces = dict(state_dict["traces"])


def steps_to_tolerance(trace: list[float], tolerance: float) -> Optional[int]:
    """The first inference step whose relative energy change is below ``tolerance`` (None if none is)."""
    from pcsweep.pc.schedule import plateaued

    for t in range(1, len(trace)):
        if plateaued(trace[t - 1], trace[t], tolerance):
            return t
    return None


class RunConditions(L.Callback):
    """Did the paper's conditions hold in this PC run? Once every ``every`` epochs, on a fixed probe batch (the first
    ``batch_size`` training samples): the condition-2 probe (inference at the twin's update point against inference
    run up to ``max_multiple`` times T), the stiffness ``step_size * lambda_max`` with the current variances, and the
    per-layer log-variance statistics. Kept in the checkpoint (a resumed run reports the same) and in ``records``."""

    def __init__(self, every: int = 1, max_multiple: int = 16, tolerance: float = 1e-6) -> None:
        self.every, self.max_multiple, self.tolerance = every, max_multiple, tolerance
        self.records: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from pcsweep.conditions import probe_condition2, stiffness, variance_statistics

        pl_module = cast("PCModule", pl_module)  # RunConditions is given to PC twins only
        epoch = trainer.current_epoch
        if not self.every or (epoch + 1) % self.every or pl_module.diverged:
            return
        engine = pl_module.engine
        # Lightning sets trainer.datamodule when fit is given one; its stubs do not declare it
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        inputs, target = pl_module.probe_batch(datamodule.train_split, datamodule.batch_size)
        schedule = engine.inference
        probe = probe_condition2(
            engine,
            inputs,
            target,
            at_step=schedule.update_every or schedule.steps,
            max_steps=self.max_multiple * schedule.steps,
            tolerance=self.tolerance,
        )
        record: dict[str, Any] = {
            "epoch": epoch,
            "condition2": probe,
            "stiffness": stiffness(engine, inputs, target),
            "step_size": schedule.step_size,  # moves with inference.step_size=auto
        }
        metrics = {
            "inference/step_size": schedule.step_size,
            "cond2/gap": probe["gap"],
            "cond2/min_cosine": min(probe["cosine"]),
            "cond2/steps_converged": float(probe["steps_converged"]),
            "inference/stiffness": record["stiffness"],
        }
        metrics.update({f"cond2/cos_W{l + 1}": c for l, c in enumerate(probe["cosine"])})
        metrics.update({f"cond2/norm_ratio_W{l + 1}": r for l, r in enumerate(probe["norm_ratio"])})
        metrics.update({f"layers/E{l + 1}": e for l, e in enumerate(probe["layer_energy_at_T"])})
        if pl_module.log_variances is not None:
            record["log_variance_min"] = engine.log_variance_min
            record["variance"] = variance_statistics(list(pl_module.log_variances), engine.log_variance_min)
            metrics["variance/log_variance_min"] = engine.log_variance_min
            for l, stats in enumerate(record["variance"]):
                metrics.update({f"variance/logS{l + 1}_{k}": v for k, v in stats.items()})
        self.records = [r for r in self.records if r["epoch"] < epoch] + [record]
        log_direct(pl_module, metrics, step=batch_step(trainer, cast(int, trainer.num_training_batches) - 1))

    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = list(state_dict["records"])


class LayerLearning(L.Callback):
    """Did every layer learn? Each epoch, per weight layer: the relative change from the initial weights and the
    distance of its distribution from a Gaussian (``pcsweep.layers``). Kept in the checkpoint and in ``records``."""

    def __init__(self, initial_weights: list[torch.Tensor]) -> None:
        self.initial = [w.detach().cpu().clone() for w in initial_weights]
        self.records: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from pcsweep.layers import layer_statistics

        pl_module = cast("TwinModule", pl_module)
        if pl_module.diverged:
            return
        epoch = trainer.current_epoch
        stats = layer_statistics([layer.weight.detach().cpu() for layer in pl_module.mlp.layers], self.initial)
        self.records = [r for r in self.records if r["epoch"] < epoch] + [{"epoch": epoch, **stats}]
        metrics = {f"layers/W{l + 1}_change": v for l, v in enumerate(stats["change"])}
        metrics.update({f"layers/W{l + 1}_gaussian_distance": v for l, v in enumerate(stats["gaussian_distance"])})
        log_direct(pl_module, metrics, step=batch_step(trainer, cast(int, trainer.num_training_batches) - 1))

    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = list(state_dict["records"])
