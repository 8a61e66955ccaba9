"""The two twins as LightningModules: a thin layer over the shared MLP (BP) and the PC engine (PC)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, cast

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.types import LRSchedulerConfigType, OptimizerLRSchedulerConfig
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MaxMetric, MeanMetric, Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from pcsweep.config.compose import settings_from_container
from pcsweep.config.settings import SCHEDULER_KEYS, Settings
from pcsweep.model.mlp import MLP, make_log_variances
from pcsweep.pc import PCEngine, output_loss
from pcsweep.pc.gang import Seat
from pcsweep.pc.stability import CurvatureTargets, curvature_due, follow_curvature
from pcsweep.track.divergence import DivergenceWatch
from pcsweep.track.metrics_log import batch_step, log_direct


def batch_mean() -> MeanMetric:
    """A per-epoch mean updated every batch. Its own NaN scan is off: ``check_finite`` stops a diverged run
    before anything is recorded, and the scan is four kernels per metric per batch."""
    return MeanMetric(nan_strategy="disable")


class TwinModule(L.LightningModule):
    """What both twins share: the MLP, the output loss, the feedforward test pass and the optimizer set-up."""

    def __init__(self, settings: Settings | dict, num_features: int, num_classes: int) -> None:
        """A fresh MLP drawn from ``settings.seed`` (so both twins of a seed start from the same weights).
        ``settings`` may be the plain dict a checkpoint holds: ``PCModule.load_from_checkpoint(path)`` rebuilds."""
        super().__init__()
        if not isinstance(settings, Settings):
            settings = settings_from_container(settings)
        # plain types only: a checkpoint then loads without unpickling pcsweep's classes
        self.save_hyperparameters(
            {"settings": dataclasses.asdict(settings), "num_features": num_features, "num_classes": num_classes}
        )
        torch.manual_seed(settings.seed)
        shape = (num_features, settings.width, settings.depth, num_classes)
        self.mlp = MLP(*shape, activation=settings.activation, init=settings.init)
        self.settings = settings
        self.loss_kind = settings.output_loss
        self.log_variances: Optional[torch.nn.ParameterList] = None
        # per-epoch training means; recorded in groups of batches, logged once per epoch (self.log per batch is costly)
        self.train_means = torch.nn.ModuleDict({"loss": batch_mean()})
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self._unrecorded: list[tuple[Tensor, Tensor, dict[str, Tensor]]] = []  # batches not yet in the metrics
        # torchmetrics takes its dtype from torch's default when the module moves to its device; Lightning's 64-bit
        # precision changes that default (process-wide) around every step, which in a pack's threads is any moment
        self.metric_dtype = torch.get_default_dtype()
        self.diverged = False
        self.diverged_reason: Optional[str] = None
        tracking = settings.tracking
        with torch.no_grad():  # the norms the weight rule compares with: drawn from the seed, so the same on a resume
            initial = [float(layer.weight.norm()) for layer in self.mlp.layers]
        self.divergence = DivergenceWatch(
            tracking.divergence_loss_factor, tracking.divergence_window, tracking.divergence_weight_factor, initial
        )
        self._last_batch = -1  # the batch index of the last batch recorded (the divergence reason names it)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.mlp(inputs)

    def state_dict(self, *args, **kwargs):
        """Every tensor on storage of its own: the PC engine's parameters are views of its stacks (a pack's hold every
        member's), and ``torch.save`` writes a view's whole storage, so a member's weights.pt and checkpoint would
        hold its whole pack's weights."""
        state = super().state_dict(*args, **kwargs)
        for key, value in state.items():
            if isinstance(value, Tensor) and value.untyped_storage().nbytes() > value.numel() * value.element_size():
                state[key] = value.clone()
        return state

    def configure_model(self) -> None:
        """The precision's dtype before anything is loaded: Lightning restores a checkpoint's weights before its
        precision plugin converts the module (docs/measurements.md, fixes). Converting again later is a no-op.
        Without a Trainer (``load_from_checkpoint`` calls this too) the checkpoint's dtype stays."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            return
        trainer.precision_plugin.convert_module(self)

    def on_fit_start(self) -> None:
        for metric in self.modules():
            if isinstance(metric, MeanMetric):  # (the accuracies count in integers)
                metric.set_dtype(self.metric_dtype)  # the dtype it has alone (see __init__)

    def one_hot(self, labels: Tensor) -> Tensor:
        return F.one_hot(labels, self.mlp.sizes[-1]).to(self.mlp.layers[0].weight.dtype)

    def probe_batch(self, split, size: int) -> tuple[Tensor, Tensor]:
        """The first ``size`` samples of ``split`` as (inputs in the weights' dtype, one-hot target): the fixed batch
        the stability pre-flight and the per-epoch condition probes measure on."""
        return split.inputs[:size].to(self.mlp.layers[0].weight.dtype), self.one_hot(split.labels[:size])

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig | torch.optim.Optimizer:
        """The optimizer (weight decay on the weight matrices, the variances' own), and the ``lr_scheduler`` if one is
        set, in Lightning's form (``interval``: epoch or step, a training batch)."""
        groups = [
            {"params": [layer.weight for layer in self.mlp.layers], "weight_decay": self.settings.weight_decay},
            {"params": [layer.bias for layer in self.mlp.layers], "weight_decay": 0.0},
        ]
        if self.log_variances is not None:
            groups.append({"params": list(self.log_variances), "weight_decay": self.settings.variance_weight_decay})
        optimizer = hydra.utils.instantiate(self.settings.optimizer)(groups)
        node = self.settings.lr_scheduler
        if node is None:
            return optimizer
        lightning_keys = {k: node[k] for k in SCHEDULER_KEYS if k in node}
        build = hydra.utils.instantiate({k: v for k, v in node.items() if k not in SCHEDULER_KEYS})
        scheduler = {"interval": "epoch", **lightning_keys, "scheduler": build(optimizer)}
        return {"optimizer": optimizer, "lr_scheduler": cast(LRSchedulerConfigType, scheduler)}

    def check_finite(self, batch_idx: int, *values: Tensor) -> None:
        """Stop the run cleanly (not the sweep) when training blows up."""
        if not all(torch.isfinite(v).all() for v in values):
            self.stop_diverged("non-finite loss or energy", batch_idx)

    def stop_diverged(self, reason: str, batch_idx: int) -> None:
        """Stop the run cleanly (not the sweep): ``DIVERGED`` and ``summary.json`` say why, and where."""
        self.diverged = True
        self.diverged_reason = f"{reason} (epoch {self.current_epoch}, batch {batch_idx})"
        self.trainer.should_stop = True

    RECORD_EVERY = 32  # batches per metric update: a torchmetrics call per batch is dear (docs/measurements.md)

    def record_train(self, batch_idx: int, loss: Tensor, logits: Tensor, labels: Tensor, **means: Tensor) -> None:
        """Accumulate this batch into the epoch's means; log the step loss every ``log_every_n_steps`` batches.

        Batches reach the metrics in groups (the same means and accuracy as one update per batch)."""
        self._unrecorded.append((logits.detach().argmax(dim=1), labels, {"loss": loss.detach(), **means}))
        self._last_batch = batch_idx
        if len(self._unrecorded) >= self.RECORD_EVERY:
            self._record_pending()
        # set by Lightning's logger connector at Trainer.__init__; the stubs do not declare it
        if batch_idx % self.trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)

    def _record_pending(self) -> None:
        if not self._unrecorded:
            return
        predictions, labels, means = zip(*self._unrecorded)
        self.train_acc.update(torch.cat(predictions), torch.cat(labels))
        for name in means[0]:
            cast(Metric, self.train_means[name]).update(torch.stack([m[name].detach() for m in means]).to(self.device))
        self._unrecorded.clear()
        if not self.diverged:
            self.check_divergence(self._last_batch, torch.stack([m["loss"].detach() for m in means]))

    def check_divergence(self, batch_idx: int, losses: Optional[Tensor] = None) -> bool:
        """The divergence rules (``pcsweep.track.divergence``) on the parameters now and on ``losses``, the batches
        just recorded (the last is ``batch_idx``); True if the run diverged. One host sync, at the metric flush (every
        ``RECORD_EVERY`` batches and at the epoch's end), never once per batch."""
        named = list(self.named_parameters())
        with torch.no_grad():  # float64 norms: one overflows only if an entry is not finite
            norms = torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64) for _, p in named])
            values = (norms if losses is None else torch.cat([losses.to(norms), norms])).tolist()
        n = 0 if losses is None else len(losses)
        fired = self.divergence.losses(values[:n]) if n else None
        if fired is not None:
            self.stop_diverged(fired[1], batch_idx - (n - 1 - fired[0]))
            return True
        norm_of = dict(zip((name for name, _ in named), values[n:]))
        layers = [norm_of[f"mlp.layers.{i}.weight"] for i in range(len(self.mlp.layers))]
        reason = self.divergence.parameters(list(norm_of), list(norm_of.values()), layers)
        if reason is not None:
            self.stop_diverged(reason, batch_idx)
        return self.diverged

    def _train_metrics(self) -> dict:
        return {"acc": self.train_acc, **self.train_means}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The epoch's running means as they are (and the batches not yet added to them, in their groups): a run
        resumed from a mid-epoch checkpoint then ends the epoch with the means of an uninterrupted one, bit for bit."""
        checkpoint["train_metrics"] = {
            name: ({k: getattr(m, k) for k in m._defaults}, m._update_count)
            for name, m in self._train_metrics().items()
        }
        checkpoint["unrecorded_batches"] = list(self._unrecorded)
        checkpoint["divergence"] = {**self.divergence.state_dict(), "last_batch": self._last_batch}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "divergence" in checkpoint:  # (a checkpoint of an earlier release starts the loss windows afresh)
            state = dict(checkpoint["divergence"])
            self._last_batch = state.pop("last_batch")
            self.divergence.load_state_dict(state)
        if "mid_epoch" not in checkpoint:  # an epoch's end: the next epoch starts its means afresh
            return
        for name, (state, count) in checkpoint["train_metrics"].items():
            metric = self._train_metrics()[name]
            for key, value in state.items():
                setattr(metric, key, value)
            metric._update_count, metric._computed = count, None
        self._unrecorded = list(checkpoint["unrecorded_batches"])

    def epoch_train_metrics(self) -> dict[str, float]:
        """This epoch's training means so far (``train_loss``, ``train_acc``, ...): what ``on_train_epoch_end`` logs."""
        self._record_pending()
        metrics: dict[str, Metric] = {f"train_{name}": cast(Metric, m) for name, m in self.train_means.items()}
        metrics["train_acc"] = self.train_acc
        return {name: float(m.compute()) for name, m in metrics.items() if m.update_count > 0}

    def on_train_epoch_end(self) -> None:
        values = self.epoch_train_metrics()
        self.log_dict({f"train/{name[len('train_') :]}": value for name, value in values.items()}, on_epoch=True)
        for metric in [self.train_acc, *self.train_means.values()]:
            cast(Metric, metric).reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Dataloader 0 is the test split, 1 the validation split (``dataset.val_fraction``), if any."""
        inputs, labels = batch
        logits = self.mlp(inputs)
        loss = output_loss(logits, self.one_hot(labels), self.loss_kind)
        split, accuracy = ("test", self.test_acc) if dataloader_idx == 0 else ("val", self.val_acc)
        accuracy(logits, labels)
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=True, add_dataloader_idx=False)
        self.log(f"{split}/acc", accuracy, on_epoch=True, prog_bar=True, add_dataloader_idx=False)


class BPModule(TwinModule):
    """Backpropagation: Lightning's automatic optimization on the output loss."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Optional[Tensor]:
        inputs, labels = batch
        logits = self.mlp(inputs)
        loss = output_loss(logits, self.one_hot(labels), self.loss_kind)
        self.check_finite(batch_idx, loss)
        if self.diverged:
            return None  # skips the optimizer step
        self.record_train(batch_idx, loss, logits, labels)
        return loss


class PCModule(TwinModule):
    """Predictive coding: manual optimization; the engine writes local gradients, the optimizer applies them."""

    def __init__(self, settings: Settings | dict, num_features: int, num_classes: int) -> None:
        super().__init__(settings, num_features, num_classes)
        settings, mlp = self.settings, self.mlp
        self.automatic_optimization = False
        if settings.variance != "fixed":
            self.log_variances = make_log_variances(mlp.sizes, settings.variance, settings.output_loss)
        # log_variance_min=auto: no floor until the pre-flight measures one (run.check_stability)
        floor = settings.log_variance_min
        self.engine = PCEngine(
            mlp.as_pc_network(self.log_variances, settings.output_loss),
            settings.schedule(),
            log_variance_min=-math.inf if floor == "auto" else float(floor),
        )
        tracking = settings.tracking
        self.divergence_factor = tracking.divergence_factor  # state descent's energy rise: "inference unstable"
        # inference.step_size=auto and log_variance_min=auto: the stiffness each keeps (set by the pre-flight),
        # re-measured every ``curvature_every`` batches of the run and after a rise (pc.stability.curvature_due)
        self.curvature_targets = CurvatureTargets()
        self.curvature_every = settings.curvature_every
        self.energy_rose = False  # the last batch's inference energy rose at a check: re-measure before the next
        self.train_means["energy"] = batch_mean()  # after the last inference step: did inference converge?
        self.train_means["energy_start"] = batch_mean()  # right after the output is clamped
        self.train_means["inference_steps"] = batch_mean()  # T, or fewer with an inference tolerance
        self.train_means["inference_steps_max"] = MaxMetric(nan_strategy="disable")  # the epoch's longest batch
        self.train_means["energy_rises"] = batch_mean()  # checks per batch at which the error energy had risen
        # |dE/dx| relative to its feedforward value where inference stopped, every batch: the distance to the
        # equilibrium the weights were updated at (its mean and its worst), and the batches that ended at T without
        # meeting inference.tolerance (a count and a share)
        self.train_means["residual"] = batch_mean()
        self.train_means["residual_max"] = MaxMetric(nan_strategy="disable")
        if settings.inference.tolerance is not None:
            self.train_means["unconverged_batches"] = SumMetric(nan_strategy="disable")
            self.train_means["unconverged"] = batch_mean()
        if self.log_variances is not None:
            self.train_means["log_variance_energy"] = batch_mean()  # 0.5 sum log S: the rest of the energy
        self.trace_energy, self.alignment_every = tracking.energy_trace, tracking.alignment_every
        self.latest_energy_trace: Optional[Tensor] = None  # picked up by diagnostics.EnergyTraces
        self.seat: Optional[Seat] = None  # in a pack (pc.gang): its batches are computed with the other members'

    def step_scheduler(self, interval: str, count: int) -> None:
        """Manual optimization steps no scheduler: PC steps its own at Lightning's ``interval`` (every ``frequency``
        epochs or batches, ``count`` of them done; a ``monitor`` metric feeds ReduceLROnPlateau)."""
        node = self.settings.lr_scheduler
        if node is None or node.get("interval", "epoch") != interval:
            return
        if count % node.get("frequency", 1):
            return
        scheduler = cast(LRScheduler, self.lr_schedulers())
        monitor = node.get("monitor")
        if monitor:
            scheduler.step(self.trainer.callback_metrics[monitor])  # type: ignore[arg-type]  # ReduceLROnPlateau's
        else:
            scheduler.step()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.step_scheduler("step", batch_step(self.trainer, batch_idx) + 1)  # batches, not optimizer steps (rc2)

    def on_train_end(self) -> None:
        """In a pack, leave it as soon as training ends: the others' batches do not wait while this run writes its
        files and uploads to W&B (leaving again later, when the member's thread ends, changes nothing)."""
        if self.seat is not None:
            self.seat.leave()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.step_scheduler("epoch", self.current_epoch + 1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["log_variance_min"] = self.engine.log_variance_min  # the floor in force (it moves with "auto")
        checkpoint["inference_step_size"] = self.engine.inference.step_size  # likewise the step size
        checkpoint["energy_rose"] = self.energy_rose  # a resumed run re-measures where an uninterrupted one would

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "log_variance_min" in checkpoint:
            self.engine.log_variance_min = checkpoint["log_variance_min"]
        self.energy_rose = bool(checkpoint.get("energy_rose", False))
        if "inference_step_size" in checkpoint:
            step_size = checkpoint["inference_step_size"]
            self.engine.inference = dataclasses.replace(self.engine.inference, step_size=step_size)

    def bp_gradients(self, inputs: Tensor, target: Tensor) -> list[Tensor]:
        """BP's gradient of the same loss for every weight matrix, at the current weights (nothing is updated)."""
        weights = [layer.weight for layer in self.mlp.layers]
        with torch.enable_grad():
            return list(torch.autograd.grad(output_loss(self.mlp(inputs), target, self.loss_kind), weights))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        target = self.one_hot(labels)
        optimizer = cast(LightningOptimizer, self.optimizers())  # configure_optimizers returns one optimizer
        align = self.alignment_every > 0 and batch_idx % self.alignment_every == 0
        bp_grads = self.bp_gradients(inputs, target) if align else None
        first_update: list[Tensor] = []

        def apply_update() -> None:
            if align and not first_update:  # the first PC update starts from the same weights as BP's gradient
                # the engine wrote every weight's .grad before calling apply_update
                first_update.extend(cast(Tensor, layer.weight.grad).clone() for layer in self.mlp.layers)
            optimizer.step()

        seen = batch_step(self.trainer, batch_idx)  # batches over the whole run
        if self.curvature_targets and curvature_due(seen, self.curvature_every, self.energy_rose):
            # the weights first (a host sync the re-measurement makes anyway): its power iteration overflows on weights
            # that blew up (lr=1e9: a curvature of 0, a step size of inf)
            if self.check_divergence(batch_idx):
                return
            follow_curvature(self.engine, inputs, target, self.curvature_targets)
        trace = self.trace_energy and batch_idx == 0
        train = self.engine.train_batch if self.seat is None else self.seat.train_batch  # alone, or in a pack
        result = train(inputs, target, apply_update=apply_update, trace_energy=trace)
        self.check_finite(batch_idx, result.loss, result.energy_end)
        if not self.diverged:
            start, end = float(result.energy_start), float(result.energy_end)
            if end > self.divergence_factor * max(start, 1e-12):
                self.stop_diverged(
                    f"inference unstable: the error energy rose from {start:.3g} to {end:.3g} during inference, "
                    f"above {self.divergence_factor:g}x its start (step size too large for the curvature)",
                    batch_idx,
                )
        if self.diverged:
            return
        assert result.energy_rises is not None  # schedule.train_batch always sets it (and log_variance_energy)
        self.energy_rose = bool(result.energy_rises > 0)  # the curvature is re-measured before the next batch
        extra = {} if self.log_variances is None else {"log_variance_energy": cast(Tensor, result.log_variance_energy)}
        residual = cast(Tensor, result.residual)  # schedule.train_batch always sets it
        extra.update(residual=residual, residual_max=residual)
        if result.converged is not None:
            unconverged = torch.tensor(0.0 if result.converged else 1.0)
            extra.update(unconverged_batches=unconverged, unconverged=unconverged)
        self.record_train(
            batch_idx,
            result.loss,
            result.logits,
            labels,
            energy=result.energy_end,
            energy_start=result.energy_start,
            inference_steps=torch.tensor(float(result.steps_used)),
            inference_steps_max=torch.tensor(float(result.steps_used)),
            energy_rises=result.energy_rises.float(),
            **extra,
        )
        if trace:
            self.latest_energy_trace = result.energy_trace
        if align:
            self.log_alignment(bp_grads, first_update, result.logits, target, batch_idx)

    def log_alignment(self, bp_grads, pc_grads, logits, target, batch_idx) -> None:
        """Condition 1 and the result, measured: cos(PC gradient, BP gradient) per layer, and the output error."""
        metrics = {
            f"align/cos_W{l + 1}": float(F.cosine_similarity(pc.flatten(), bp.flatten(), dim=0))
            for l, (pc, bp) in enumerate(zip(pc_grads, bp_grads))
        }
        metrics["align/output_error"] = float((target - logits).norm(dim=1).mean())
        log_direct(self, metrics, step=batch_step(self.trainer, batch_idx))
