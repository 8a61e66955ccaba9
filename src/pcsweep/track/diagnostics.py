"""What a run measures beyond loss and accuracy, as Lightning callbacks: weight histograms, inference energy traces,
whether every layer learned and whether the paper's conditions held."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import lightning as L
import torch

from pcsweep.pc.schedule import plateaued
from pcsweep.pc.stability import stiffness
from pcsweep.run.files import read_json, write_atomic
from pcsweep.track.conditions import combine_probes, probe_condition2, variance_statistics
from pcsweep.track.layers import layer_statistics
from pcsweep.track.metrics_log import batch_step, log_direct
from pcsweep.track.wandb_run import axes, wandb_runs

if TYPE_CHECKING:
    from pcsweep.model.twins import PCModule, TwinModule


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
            import wandb  # half a second to import: only runs that log to W&B pay it

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
            import wandb  # half a second to import: only runs that log to W&B pay it

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
    for t in range(1, len(trace)):
        if plateaued(trace[t - 1], trace[t], tolerance):
            return t
    return None


class RunConditions(L.Callback):
    """Did the paper's conditions hold in this PC run? Once every ``every`` epochs, on ``batches`` fixed probe batches
    (the first ``batches`` x ``batch_size`` training samples): the condition-2 probe (the weight update where training
    inference stops against the update at a float64 equilibrium, ``conditions.probe_condition2``, its reference run
    for up to ``max_multiple`` times T steps), the stiffness ``step_size * lambda_max`` with the current variances, and
    the per-layer log-variance statistics. Kept in the checkpoint (a resumed run reports the same) and in
    ``records``."""

    def __init__(self, every: int = 1, max_multiple: int = 16, batches: int = 2) -> None:
        self.every, self.max_multiple, self.batches = every, max_multiple, batches
        self.records: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module = cast("PCModule", pl_module)  # RunConditions is given to PC twins only
        epoch = trainer.current_epoch
        if not self.every or (epoch + 1) % self.every or pl_module.diverged:
            return
        engine = pl_module.engine
        # Lightning sets trainer.datamodule when fit is given one; its stubs do not declare it
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        size = datamodule.batch_size
        inputs, target = pl_module.probe_batch(datamodule.train_split, self.batches * size)
        schedule = engine.inference
        probe = combine_probes(
            [
                probe_condition2(
                    engine,
                    x,
                    y,
                    at_step=schedule.update_every or schedule.steps,
                    max_steps=self.max_multiple * schedule.steps,
                )
                for x, y in zip(inputs.split(size), target.split(size))
            ]
        )
        record: dict[str, Any] = {
            "epoch": epoch,
            "condition2": probe,
            "stiffness": stiffness(engine, inputs[:size], target[:size]),
            "step_size": schedule.step_size,  # moves with inference.step_size=auto
        }
        metrics = {
            "inference/step_size": schedule.step_size,
            "cond2/update_error_max": probe["update_error_max"],
            "cond2/reference_residual": probe["reference"]["residual"],
            "cond2/gap": probe["gap"],
            "cond2/min_cosine": min(probe["cosine"]),
            "cond2/steps_converged": float(probe["steps_converged"]),
            "inference/stiffness": record["stiffness"],
        }
        metrics.update({f"cond2/update_error_W{l + 1}": e for l, e in enumerate(probe["update_error"])})
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
    distance of its distribution from a Gaussian (``pcsweep.track.layers``). Kept in the checkpoint and
    in ``records``."""

    def __init__(self, initial_weights: list[torch.Tensor]) -> None:
        self.initial = [w.detach().cpu().clone() for w in initial_weights]
        self.records: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
