"""Every setting of a run, typed, with its default and its check: the schema Hydra composes ``conf/`` onto.

One dataclass per concept (the config group of the same name), validated once when the composed config becomes
these objects (``settings_from``), then passed whole to what uses it. A field marked ``identity=False`` never changes
a run's numbers, and ``identity="pc"`` only matters to PC twins: a run's identity
(``pcsweep.config.compose.identity``) is what differs from these defaults, minus those. Plain python: Hydra registers
it (``pcsweep.config.compose``), nothing here imports Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import torch

from pcsweep.config.checks import ConfigError, check, is_number, one_of, setting
from pcsweep.config.twins import ALGOS, RELAXATIONS, twin_name
from pcsweep.data.datasets import DATASETS
from pcsweep.pc.energy import ACTIVATIONS, OUTPUT_LOSSES
from pcsweep.pc.schedule import Inference

# inference.step_size=auto: step_size * lambda_max is held at ``inference.auto_stiffness`` of the stability limit
# 2 (1 + momentum). 0.8 (pc, rc3): the slow modes, which decide condition 2, move as fast as stability allows with a
# 25% margin (lambda_max varies 1.6% across batches and grows about 2% per 100 batches at the paper's sizes at
# lr 3e-4, faster at larger learning rates; it is re-measured every ``curvature_every`` batches and after any rise).
# 0.5 (rc2, rc23, plain descent): 1 / lambda_max, the classic step.
AUTO_STEP_FRACTION = 0.8
INITS = ("xavier", "torch")
SCHEDULER_INTERVALS = ("epoch", "step")
# keys of lr_scheduler that are Lightning's, not the scheduler class's
SCHEDULER_KEYS = ("interval", "frequency", "monitor")
PAPER_STEP_SIZE = Inference.step_size  # the paper's gamma, 0.1
VARIANCES = ("fixed", "neuron", "layer")


@dataclass
class InferenceSettings:
    """PC's inference (BP ignores it, and it is not part of a BP run's identity)."""

    steps: int = Inference.steps  # T: the paper's 256 (condition 2)
    update_every: Optional[int] = None  # null: one weight update after the T steps (condition 2); k: every k steps
    # gamma: auto = auto_stiffness of the stability limit over the measured lambda_max, followed as the weights train
    # (the paper's literal 0.1 leaves pc short of convergence and rc2 past the limit: see the README); a number is
    # rejected before training if gamma * lambda_max >= 2 (1 + momentum)
    step_size: Any = "auto"
    # step_size=auto: gamma * lambda_max as a fraction of the limit 2 (1 + momentum); 0.5 for rc2 and rc23 (conf/twin/)
    auto_stiffness: float = AUTO_STEP_FRACTION
    # heavy-ball inference (same fixed points); plain descent (0, the paper's literal reading) is far from converged
    # after T = 256 steps at the paper's sizes (see the README); the relaxed twins use 0 (conf/twin/)
    momentum: float = 0.95
    # stop at the equilibrium: the relative residual |dE/dx| / |dE/dx at the feedforward state| below this at two
    # consecutive checks (every check_every steps); null: always T steps (the paper's literal schedule)
    tolerance: Optional[float] = None
    check_every: int = Inference.check_every
    # state: descent on the activities (the paper's dynamics; step_size, momentum); error: conjugate gradients on the
    # prediction errors (the same equilibrium in a fraction of the steps; no step size). pc and rc3 default to error
    # (conf/twin/); rc2 and rc23 must keep state: their weight updates during inference are the relaxation itself
    solver: str = Inference.solver

    def __post_init__(self) -> None:
        # the rest is checked once, by what the engine runs (pc.schedule.Inference): Settings.__post_init__
        step = self.step_size
        check(step == "auto" or (is_number(step) and step > 0), "inference.step_size", "auto or > 0", step)
        check(
            is_number(self.auto_stiffness) and 0 < self.auto_stiffness < 1,
            "inference.auto_stiffness",
            "in (0, 1)",
            self.auto_stiffness,
        )


@dataclass
class DatasetSettings:
    """conf/dataset: one schema for all (a field a dataset does not use keeps its default)."""

    name: str = "digits"  # digits (bundled, offline) | digits28 | mnist | fashion_mnist
    data_dir: Optional[str] = setting(None, identity=False)  # idx files (mnist, fashion_mnist)
    download: bool = setting(False, identity=False)
    mirrors: List[str] = setting(identity=False, factory=list)
    test_fraction: float = 0.2  # digits, digits28: the fixed stratified split
    # held out of the training split for choosing hyperparameters (hydra/sweeper=optuna reads it, never the test set)
    val_fraction: float = 0.0
    train_size: Optional[int] = None  # digits28
    test_size: Optional[int] = None  # digits28
    seed: int = 0  # digits28: the distortions

    def __post_init__(self) -> None:
        one_of("dataset.name", self.name, DATASETS)
        check(
            is_number(self.val_fraction) and 0 <= self.val_fraction < 1,
            "dataset.val_fraction",
            "in [0, 1)",
            self.val_fraction,
        )


def dataset_settings(node: Any) -> DatasetSettings:
    """Dataset settings from a stored config's ``dataset`` mapping (keys a later release added keep defaults)."""
    names = {f.name for f in fields(DatasetSettings)}
    return DatasetSettings(**{k: v for k, v in dict(node).items() if k in names})


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# PC writes its gradients by hand and tests in the dtype it trains in: a mixed precision would evaluate (autocast)
# in another precision than the engine trains in, and unscale gradients Lightning did not scale
PRECISIONS = ("32-true", "32", "64-true", "64")


@dataclass
class TrainerSettings:
    # auto | cpu | gpu (checked against this machine before any folder is made); where a run trains is not what it
    # is: `auto` and `cpu` runs of the same settings share a folder
    accelerator: str = setting("auto", identity=False)
    precision: str = "32-true"  # 32-true | 64-true (mixed precisions are refused: see PRECISIONS)
    progress_bar: bool = setting(False, identity=False)
    log_every_n_steps: int = setting(10, identity=False)
    gpu_slots: bool = setting(False, identity=False)  # true (launcher=gpus): each job claims a free local GPU
    # any other argument of Lightning's Trainer, as `trainer.NAME=value` on the command line (checked against its
    # signature before any work); where pcsweep decides (pcsweep.run.trainer.TRAINER_OWNED), pcsweep's key wins
    # and the run says so
    lightning: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        one_of("trainer.accelerator", self.accelerator, ACCELERATORS)
        check(
            str(self.precision) in PRECISIONS,
            "trainer.precision",
            "32-true or 64-true (PC trains with hand-written gradients: a mixed precision would train and evaluate "
            "at different precisions)",
            self.precision,
        )

    def on_cuda(self) -> bool:
        """Whether the run trains on a GPU (``auto``: when one is visible here)."""
        return self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and torch.cuda.is_available())

    def check_devices(self) -> None:
        """An accelerator this machine does not have is a one-line error (call where the run will train)."""
        if self.accelerator in ("gpu", "cuda") and not self.gpu_slots and not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={self.accelerator} but no GPU is visible here "
                "(torch.cuda.is_available() is False): use trainer.accelerator=auto or cpu"
            )


@dataclass
class CheckpointSettings:
    """``checkpoints/last.ckpt`` is rewritten after every epoch, at a signal, and inside long epochs."""

    every_minutes: float = 5.0  # a crash or kill -9 loses at most this much training (0: epoch ends and signals only)

    def __post_init__(self) -> None:
        check(
            is_number(self.every_minutes) and self.every_minutes >= 0,
            "checkpoint.every_minutes",
            ">= 0",
            self.every_minutes,
        )


@dataclass
class TrackingSettings:
    """What a run measures of itself (never changes its numbers)."""

    histogram_every: int = 1  # epochs between weight (and variance) histograms; 0: never
    energy_trace: bool = True  # PC: energy at every inference step of each epoch's first batch
    energy_tolerance: float = 1e-4  # ... and the step at which its relative change first falls below this
    alignment_every: int = 50  # PC: every N batches, cosine(PC update, BP gradient) per layer; 0: never
    evals_per_epoch: int = 10  # test-accuracy points per epoch for time-to-90% (outside the training time)
    chance_margin: float = 0.05  # a final accuracy below chance + this is `failed_to_learn`: listed, never ranked
    # PC, state descent: error energy at the end of a batch's inference above this times its start: DIVERGED
    # ("inference unstable"; error optimization's energy only descends)
    divergence_factor: float = 100
    # every twin, checked at the metric flush (every 32 batches and at an epoch's end): DIVERGED when the training loss
    # is above divergence_loss_factor x its mean over the run's first divergence_window batches in two consecutive
    # windows of that many batches, when a layer's weight norm is above divergence_weight_factor x its initial norm, or
    # when a parameter is not finite. Far from healthy runs (the five twins on digits at their default rates, up to 60
    # epochs, rc2 at batch 8 too): every later window's loss at most 0.74x the first's, every weight norm within 1.03x
    # of its start. Adam at lr=100 moves every weight by ~100 at its first update (digits28: W1 at 7900x by batch 31)
    divergence_loss_factor: float = 10
    divergence_window: int = 20
    divergence_weight_factor: float = 100
    condition2_every: int = 1  # PC: epochs between condition-2 probes (and stiffness, variance statistics); 0: never
    condition2_batches: int = 2  # the fixed probe batches (the first batch_size training samples, the next, ...)
    # the probe's float64 reference runs to a relative residual of 1e-8 in at most max(this times T, 4000) steps
    condition2_max_multiple: int = 16
    # condition 2 held: on every probed batch, every layer's weight update where inference stopped is at most this
    # far (|u_stop - u*| / |u*|) from the update at the equilibrium (pc's and rc3's tolerance 1e-3 leaves it at
    # 0.3-0.8% at depth 8, widths 256 and 1024: docs/measurements.md) ...
    condition2_max_update_error: float = 0.01
    # ... and, with inference.tolerance, at most this share of an epoch's batches ended at T short of it (every batch's
    # residual is recorded: the probe sees a few batches an epoch)
    condition2_max_unconverged: float = 0.05
    group: Optional[str] = None  # W&B group; set by the sweeper to one id per multirun (stable when re-run)

    def __post_init__(self) -> None:
        check(self.evals_per_epoch >= 1, "tracking.evals_per_epoch", ">= 1", self.evals_per_epoch)
        check(self.condition2_batches >= 1, "tracking.condition2_batches", ">= 1", self.condition2_batches)
        error = self.condition2_max_update_error
        check(is_number(error) and 0 < error < 1, "tracking.condition2_max_update_error", "in (0, 1)", error)
        check(self.divergence_factor > 1, "tracking.divergence_factor", "> 1", self.divergence_factor)
        check(self.divergence_loss_factor > 1, "tracking.divergence_loss_factor", "> 1", self.divergence_loss_factor)
        check(self.divergence_window >= 1, "tracking.divergence_window", ">= 1", self.divergence_window)
        check(
            self.divergence_weight_factor > 1, "tracking.divergence_weight_factor", "> 1", self.divergence_weight_factor
        )


@dataclass
class ReportSettings:
    """``python -m pcsweep.report multirun/<sweep>`` builds it any time; this is the automatic one."""

    auto: bool = True  # when a multirun ends: figures, report.html and report.md in multirun/<sweep>/report/
    landscapes: bool = True
    resolution: int = 21  # landscape grid points per axis (the CLI's default is 41)
    samples: int = 300  # training samples the landscape loss uses (the CLI's default is 1000)
    spans: List[float] = field(
        default_factory=lambda: [1.0, 0.1]
    )  # wide and zoomed (the zoomed is the sharpness radius)
    claims: Dict[str, Any] = field(default_factory=dict)  # verdict thresholds: pcsweep.report.claims.ClaimRules


TRIAL_SEED_BASE = 1000  # tuning trials' first seed (a grid's seeds are small numbers: seed=0,1,2)
# tune=lr: a log grid in half-decade steps, wide enough for every twin (bp's best and pc's differ by a decade)
HALF_DECADES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
SEARCHES = ("grid", "optuna")


PACK_AUTO_CUDA = 16  # pack=auto: members per pack on a GPU (on a CPU, 1: pcsweep.bench.tables measured no gain there)


@dataclass
class PackSettings:
    """PC runs of one shape and schedule that differ only in what each member keeps its own (``pack.MEMBER_KEYS``:
    seeds, tuning candidates, pc beside rc3, rc2 beside rc23) trained side by side in one process, their batches as
    one computation (``pc.gang``); each member is still its own run (folder, summary, checkpoint, W&B run, identity).
    Never part of a run's identity."""

    size: Any = "auto"  # members per pack: auto (16 on a GPU, 1 on a CPU) or a number (1: every run alone)
    members: Optional[str] = None  # set by the sweeper on a pack's job: each member's own settings (base64 JSON)

    def __post_init__(self) -> None:
        size = self.size
        check(size == "auto" or (isinstance(size, int) and size >= 1), "pack.size", "auto or >= 1", size)

    def members_per_pack(self, cuda: bool) -> int:
        return (PACK_AUTO_CUDA if cuda else 1) if self.size == "auto" else int(self.size)


@dataclass
class TuneSettings:
    """conf/tune: a stage before a sweep's grid that gives every family (everything but the seed and ``key``) the same
    search over ``key`` on the validation split, and trains the grid at what it chose (``pcsweep.sweep.tuning``).
    Never part of a run's identity: a trial is an ordinary run of its settings, and a grid run is one at the chosen
    value."""

    key: Optional[str] = None  # the setting searched (tune=lr: optimizer.lr); null: no tuning (tune=none)
    search: str = "grid"  # grid: every candidate | optuna: `trials` values drawn by TPE between the candidates' ends
    candidates: List[float] = field(default_factory=lambda: list(HALF_DECADES))
    trials: int = 7  # search=optuna: values tried per family (the same for every family)
    # seeds per candidate: TRIAL_SEED_BASE .. + seeds-1, disjoint from the grid's (the runs reported are not the runs
    # that chose: their seed luck would lift the chosen value's scores twice)
    seeds: int = 2
    # true: the trials take seeds 0 .. seeds-1 and a grid run at one of them and the chosen value is the trial itself,
    # copied (cheaper, selection-biased: its summary's lr_origin and the table say so)
    reuse_trials: bool = False
    epochs: Optional[int] = None  # epochs per trial; null: the grid's
    last_evals: int = 5  # the score: mean validation accuracy of each trial's last N evaluations, then over seeds
    # search=grid: a choice on the edge of the candidates gets the next half-decade beyond it, until it is interior or
    # the new candidate fails, at most this many times a family (0: never)
    widen: int = 4
    origin: Optional[str] = None  # set by the sweeper on each grid run: where its value came from (summary, W&B)
    # set by the sweeper on a tuning trial, "k/N/stage start (unix s)/tuned key": its start and end lines say which
    # trial of how many, its validation score (never its test accuracy) and the time left
    progress: Optional[str] = None

    def __post_init__(self) -> None:
        one_of("tune.search", self.search, SEARCHES)
        if self.key is None:
            return
        values = self.candidates
        check(
            isinstance(values, list) and all(is_number(v) for v in values),
            "tune.candidates",
            "a list of numbers",
            values,
        )
        if self.search == "grid":
            check(len(set(values)) >= 2, "tune.candidates", "at least 2 different values to choose among", values)
        else:
            check(
                len(set(values)) >= 2, "tune.candidates", "2 values or more (optuna searches between the ends)", values
            )
            check(self.trials >= 2, "tune.trials", ">= 2 (a search needs something to compare)", self.trials)
        check(self.seeds >= 1, "tune.seeds", ">= 1", self.seeds)
        check(self.epochs is None or self.epochs >= 1, "tune.epochs", "null or >= 1", self.epochs)
        check(self.last_evals >= 1, "tune.last_evals", ">= 1", self.last_evals)
        check(self.widen >= 0, "tune.widen", ">= 0", self.widen)


@dataclass
class Settings:
    """A whole run. Top-level keys are the ones users sweep (``width=256,1024``)."""

    algo: str = "pc"  # bp | pc: the learning rule
    # none | 2 | 3 | 23: which of the paper's conditions 2 and 3 PC relaxes; with algo, it names the twin
    # (pcsweep.config.twins), whose own defaults (conf/twin/<twin>.yaml) sit under what a preset or the command
    # line sets
    relax: str = setting("none", identity="pc")
    variance: str = setting("fixed", identity="pc")  # fixed (S = 1, condition 3) | neuron | layer (trainable log S)
    # floor on log S: auto = where step_size * lambda_max / S_min is 1.8 (1 + momentum), measured at the initial
    # weights and followed as they train; a number below the stable range is rejected
    log_variance_min: Any = setting("auto", identity="pc")
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    optimizer: Any = None  # conf/optimizer: a torch.optim class for hydra.utils.instantiate (_partial_)
    # conf/lr_scheduler: a torch.optim.lr_scheduler class (_partial_) and Lightning's `interval` (epoch | step), or
    # null: a constant learning rate
    lr_scheduler: Optional[Dict[str, Any]] = None
    # conf/logger: Lightning loggers beside metrics.csv (always written), {name: {_target_: class, its arguments}}
    logger: Dict[str, Any] = setting(identity=False, factory=dict)
    seed: int = 0
    width: int = 256  # neurons per hidden layer
    depth: int = 8  # hidden layers (depth + 1 weight matrices)
    activation: str = "tanh"  # tanh | relu | sigmoid | linear (the output layer is always linear)
    init: str = "xavier"  # xavier (Glorot, activation gain) | torch (nn.Linear default)
    output_loss: str = "mse"  # mse (Gaussian energy, the paper's) | ce (cross-entropy output, both twins)
    epochs: int = 5
    batch_size: int = 64
    # per optimizer: bp's (the evidence is in conf/twin/bp.yaml); each PC twin's file sets its own, and the optimizer
    # reads its entry into optimizer.lr
    learning_rates: Dict[str, float] = setting(
        identity=False, factory=lambda: {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.01}
    )
    inference: InferenceSettings = setting(identity="pc", factory=InferenceSettings)
    weight_decay: float = 0.0  # on weight matrices (not biases)
    variance_weight_decay: float = 0.0  # on log-variances (relax 3): pulls S toward 1
    # PC: batches between re-measurements of the curvature, counted over the whole run (inference.step_size=auto and
    # log_variance_min=auto follow it; also re-measured after any batch whose inference energy rose). 30 power
    # iterations each: about 1% of a T = 256 batch at 10
    curvature_every: int = setting(10, identity="pc")
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    # conf/callbacks: more Lightning callbacks, {name: {_target_: class, its arguments}} (part of the identity: one
    # may change the numbers, as early stopping does)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointSettings = setting(identity=False, factory=CheckpointSettings)
    tracking: TrackingSettings = setting(identity=False, factory=TrackingSettings)
    report: ReportSettings = setting(identity=False, factory=ReportSettings)
    tune: TuneSettings = setting(identity=False, factory=TuneSettings)
    pack: PackSettings = setting(identity=False, factory=PackSettings)
    sweep_name: str = setting("default", identity=False)  # runs live in multirun/<sweep_name>/

    def __post_init__(self) -> None:
        self.relax = str(self.relax)  # relax=2 on the command line is the number 2
        one_of("algo", self.algo, ALGOS)
        one_of("relax", self.relax, RELAXATIONS)
        one_of("variance", self.variance, VARIANCES)
        floor = self.log_variance_min
        check(floor == "auto" or is_number(floor), "log_variance_min", "auto or a number", floor)
        check(self.width >= 1, "width", ">= 1", self.width)
        check(self.depth >= 1, "depth", ">= 1", self.depth)
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check(self.epochs >= 1, "epochs", ">= 1", self.epochs)
        lr = (self.optimizer or {}).get("lr")
        check(is_number(lr) and lr > 0, "optimizer.lr", "> 0", lr)
        check(is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        check(
            is_number(self.variance_weight_decay) and self.variance_weight_decay >= 0,
            "variance_weight_decay",
            ">= 0",
            self.variance_weight_decay,
        )
        check(self.curvature_every >= 0, "curvature_every", ">= 0", self.curvature_every)
        one_of("activation", self.activation, ACTIVATIONS)
        one_of("output_loss", self.output_loss, OUTPUT_LOSSES)
        one_of("init", self.init, INITS)
        if self.lr_scheduler is not None:
            one_of("lr_scheduler.interval", self.lr_scheduler.get("interval", "epoch"), SCHEDULER_INTERVALS)
        if self.tune.key is not None:
            fraction = self.dataset.val_fraction
            check(
                0 < fraction < 0.5,
                "dataset.val_fraction",
                "in (0, 0.5) while tuning (tuning scores on it, never on the test split)",
                fraction,
            )
        if self.algo == "pc":  # BP ignores inference
            try:
                self.schedule().check_steps(hidden_layers=self.depth)
            except ValueError as exc:
                raise ConfigError(f"inference.{exc}") from None

    @property
    def twin(self) -> str:
        """bp, pc, pc_rc2, pc_rc3 or pc_rc23."""
        return twin_name(self.algo, self.relax)

    def schedule(self) -> Inference:
        """What the PC engine runs: the inference settings with the twin's update interval (with
        ``step_size=auto``, the paper's 0.1 until the pre-flight measures the curvature: ``run.check_stability``)."""
        i = self.inference
        return Inference(
            steps=i.steps,
            step_size=PAPER_STEP_SIZE if i.step_size == "auto" else i.step_size,
            momentum=i.momentum,
            update_every=i.update_every,
            tolerance=i.tolerance,
            check_every=i.check_every,
            solver=i.solver,
        )
