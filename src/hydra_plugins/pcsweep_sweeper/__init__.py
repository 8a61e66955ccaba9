"""Hydra's basic and Optuna sweepers, plus what a pcsweep grid needs before anything is launched.

Every job's config is composed and checked first (an invalid number anywhere stops the sweep before any training),
BP duplicates (``algo=bp relax=2`` trains what ``relax=none`` trains) and runs already finished in their folder are
dropped with one line each, and the list of this sweep's runs is written for the summary callback. It wraps
whatever launcher is configured, so the same filtering happens locally and on SLURM.

``hydra/sweeper=optuna`` (registered here by ``register_optuna``: Optuna's options plus ``objective``) tunes one
twin with Hydra's Optuna sweeper behind the same checks: every trial is a normal run folder, a trial whose run
already finished is answered from its ``summary.json``, and the objective is read from the run's summary (a
validation metric: never the test set).

``tune=lr`` (``TuningStage``, ``pcsweep.tuning``) is pcsweep's own stage before a grid: every family of the grid gets
the same search on the validation split, and the grid trains at each family's choice.

Hydra imports this module whenever any Hydra application starts (plugin discovery): pcsweep's heavy modules (torch,
Lightning, the run) are imported inside the methods that run a pcsweep sweep, never at the top.
"""

import hashlib
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, cast

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pcsweep.errors import UserError, release_stderr
from pcsweep.errors import exit_with as fail
from pcsweep.tuning import (
    RECORD,
    TUNING_DIR,
    Family,
    batches_per_epoch,
    candidate_record,
    choose,
    cost_line,
    decayed_arms,
    families_of,
    follow,
    lr_origin,
    override_key,
    reuse_trial,
    to_widen,
    trial_overrides,
    trial_seeds,
)

if TYPE_CHECKING:
    from pcsweep.models import PCModule

log = logging.getLogger(__name__)


@dataclass
class PcsweepSweeperConf:
    _target_: str = "hydra_plugins.pcsweep_sweeper.PcsweepSweeper"
    max_batch_size: Optional[int] = None
    # the default sweep, the five twins; the same keys given on the command line replace these
    params: Optional[Dict[str, str]] = field(default_factory=lambda: {"algo": "bp,pc", "relax": "none,2,3,23"})
    # more jobs: each entry replaces some of the grid's keys (experiment=paper adds pc_rc23 with weight decay)
    also: Optional[List[Dict[str, Any]]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="pcsweep", node=PcsweepSweeperConf, provider="pcsweep")


class FilteringLauncher(Launcher):
    """Launches only the jobs that still need training; see the module docstring."""

    def __init__(self, inner: Launcher, sweeper: "SweepRecord") -> None:
        self.inner, self.sweeper = inner, sweeper
        self.stability = StabilityPreflight()
        self.tuning = False  # launching a tuning stage's trials (they are not the sweep's runs)
        self.entries: List[dict] = []  # the last launch's plan, one entry per job
        self.launched_groups: List[List[int]] = []  # which of the launched entries each launched job trains
        self.packing: Dict[tuple, tuple] = {}  # a planned job's overrides -> (its settings if PC, members per pack)

    def setup(self, **kwargs: Any) -> None:  # pragma: no cover - the inner launcher is already set up
        self.inner.setup(**kwargs)

    def plan(self, overrides: Sequence[str], seen: Dict[str, str]) -> dict:
        """One job's manifest entry: ``launched``, or skipped as a duplicate or finished run (with one line why).
        Every job is composed and checked here, so bad input anywhere stops the sweep before any training."""
        from hydra.errors import ConfigCompositionException

        from pcsweep.config import duplicate_target, paper_name, run_dir_name, settings_from
        from pcsweep.data import BUNDLED, check_available
        from pcsweep.run import resolve_data_dir
        from pcsweep.run_folder import adopt_previous_folder, finished_summary

        label = " ".join(overrides)
        try:
            cfg = self.sweeper.hydra_context.config_loader.load_sweep_config(self.sweeper.config, list(overrides))
            if cfg.dataset.name not in BUNDLED:
                cfg.dataset.data_dir = str(resolve_data_dir(cfg))
            settings = settings_from(cfg)
            if not self.slurm:  # a login node need not have the compute nodes' GPUs
                settings.trainer.check_devices()
            # data_dir is set above unless the dataset is bundled (then check_available does not read it)
            check_available(settings.dataset.name, cast(str, settings.dataset.data_dir), settings.dataset.download)
        except ConfigCompositionException as exc:
            fail(f"{label}: {str(exc.__cause__ or exc).splitlines()[0]}")
        except UserError as exc:
            fail(f"{label}: {exc}")
        entry: Dict[str, Any] = {
            "overrides": list(overrides),
            "model": paper_name(settings),
            "dataset": settings.dataset.name,
            "twin": settings.twin,
            "lr_origin": lr_origin(settings),
        }
        self.check(label, settings)
        target, run_dir = duplicate_target(settings), run_dir_name(settings)
        if target is not None:
            entry["model"] += f" relax={settings.relax}"
            log.info(f"skipped {entry['model']}: duplicate of {target} (BP has no conditions to relax)")
            return {**entry, "status": "duplicate", "duplicate_of": target}
        if run_dir in seen:
            log.info(f"skipped {label}: same run as {seen[run_dir]}")
            return {**entry, "status": "duplicate", "duplicate_of": run_dir}
        seen[run_dir] = label
        entry["run_dir"] = run_dir
        path = Path(cfg.hydra.sweep.dir) / run_dir  # a tuning trial's is <sweep>/tuning
        adopt_previous_folder(path, settings)
        if settings.tune.reuse_trials and not (path / "summary.json").exists():  # the trial itself, copied (biased)
            trial_dir = Path(self.sweeper.config.hydra.sweep.dir) / TUNING_DIR / run_dir
            reuse_trial(path, trial_dir, finished_summary(trial_dir), settings.tune.origin)
        done = finished_summary(path)
        if done is not None:
            (log.debug if self.tuning else log.info)(f"skipped {label}: already {done['status']} in {run_dir}")
            return {**entry, "status": "finished"}
        if settings.algo == "pc":
            try:  # a step size or floor past the stability limit stops the sweep before its first job
                self.stability(settings)
            except UserError as exc:
                fail(f"{label}: {exc}")
        self.packing[tuple(overrides)] = (settings if settings.algo == "pc" else None, self.members_per_pack(settings))
        return {**entry, "status": "launched"}

    def members_per_pack(self, settings: Any) -> int:
        """``pack.size``: auto packs on a GPU (where one run leaves the device idle), not on a CPU; on SLURM, the
        GPUs each job requests decide, not the login node's (``pcsweep.pack.job_has_gpu``)."""
        from pcsweep.pack import job_has_gpu

        return int(settings.pack.members_per_pack(job_has_gpu(settings, self.sweeper.config.hydra.launcher)))

    def plan_all(self, job_overrides: Sequence[Sequence[str]]) -> List[dict]:
        """Every job's plan (``plan``), kept as ``self.entries``; a job planned by the last call is not planned
        again (the tuning stage plans its trials to project their cost, then launches them)."""
        if self.entries and [e["overrides"] for e in self.entries] == [list(o) for o in job_overrides]:
            return self.entries
        seen: Dict[str, str] = {}
        self.entries = [self.plan(overrides, seen) for overrides in job_overrides]
        return self.entries

    def check(self, label: str, settings: Any) -> None:
        """More checks of one job's settings, before anything is launched (``fail`` in one line)."""

    @property
    def slurm(self) -> bool:
        return "SlurmLauncher" in str(self.sweeper.config.hydra.launcher.get("_target_", ""))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Plans every job, records the plan (the sweep's manifest; a tuning stage's trials in ``self.entries``
        only), and launches what needs training."""
        slurm = self.slurm
        if slurm and shutil.which("sbatch") is None:
            fail(
                "launcher=slurm needs SLURM, and there is no `sbatch` here: run on a cluster's login node "
                "(or launcher=local)"
            )
        entries = self.plan_all(job_overrides)
        launched = [entry for entry in entries if entry["status"] == "launched"]
        group = f"++tracking.group={self.sweeper.sweep_id}"  # a tuning trial comes with its family's
        to_launch = [
            list(entry["overrides"])
            + ([] if any(o.startswith("++tracking.group=") for o in entry["overrides"]) else [group])
            for entry in launched
        ]
        self.launched_groups = [[i] for i in range(len(launched))]
        if launched:  # PC runs of one shape and schedule train as packs (pcsweep.pack)
            from pcsweep.pack import pack_groups, pack_jobs

            plans = [self.packing[tuple(entry["overrides"])] for entry in launched]
            own, sizes = [plan[0] for plan in plans], [plan[1] for plan in plans]
            self.launched_groups = pack_groups(own, sizes)
            to_launch = pack_jobs(to_launch, own, sizes)
        if not self.tuning:
            self.sweeper.manifest.extend(entries)
            self.sweeper.write_manifest()
            untuned = sorted({e["twin"] for e in entries if e.get("lr_origin") == "default"})
            if len({e.get("twin") for e in entries}) > 1 and untuned:
                log.info(
                    f"not tuned: {', '.join(untuned)} train at their hand-set default learning rates; comparing twins "
                    "needs each tuned alike on validation data (add tune=lr) or the rates given: the claims say "
                    "'not tested' until then"
                )
        if not to_launch:
            return []
        if not slurm:
            return self.inner.launch(to_launch, initial_job_idx=initial_job_idx)
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return self.inner.launch(to_launch, initial_job_idx=initial_job_idx)
        except (FailedJobError, UncompletedJobError) as exc:  # FailedJobError is the narrower: a job raised
            message = str(exc).strip()
            if "sbatch: error" in message and "Traceback" not in message:  # refused at submission: SLURM's words
                fail("SLURM refused the jobs: " + " ".join(message.split()))
            if isinstance(exc, FailedJobError):
                raise
            fail(
                f"a SLURM job ended unfinished ({message.splitlines()[0]}); run the same command again: "
                "finished runs are skipped and interrupted ones resume from their checkpoints"
            )


class TuningStage:
    """``tune=lr`` (``pcsweep.tuning``): before the grid, every family's trials (the same candidates, seeds and epochs
    for every twin) are launched like any other jobs into ``<sweep>/tuning/``, scored on the validation split, and
    each grid job gets its family's choice (``key=value``) and where it came from (``tune.origin``)."""

    def __init__(self, sweeper: "PcsweepSweeper") -> None:
        self.sweeper = sweeper
        self.tune = sweeper.config.tune
        self.folder = Path(sweeper.config.hydra.sweep.dir) / TUNING_DIR

    def describe(self, family: Family) -> bool:
        """Names the family from its composed settings; False for a BP duplicate (nothing of its own to tune)."""
        from pcsweep.config import duplicate_target, family_name, paper_name, setting_value, settings_from

        cfg = self.sweeper.hydra_context.config_loader.load_sweep_config(self.sweeper.config, family.overrides)
        try:
            settings = settings_from(cfg)
        except UserError as exc:
            fail(f"{' '.join(family.overrides)}: {exc}")
        if duplicate_target(settings) is not None:
            return False
        family.name, family.model, family.twin = family_name(settings), paper_name(settings), settings.twin
        family.dataset, family.width, family.depth = settings.dataset.name, settings.width, settings.depth
        family.default = setting_value(settings, self.tune.key)
        family.epochs = self.tune.epochs or settings.epochs
        family.val_fraction = settings.dataset.val_fraction
        family.settings = settings
        return True

    def run(self, jobs: List[List[str]]) -> List[List[str]]:
        key = self.tune.key
        given = next((o for job in jobs for o in job if override_key(o) == key), None)
        if given is not None:
            fail(f"tune.key={key} is what tuning chooses, and the command sets {given}: drop one of them")
        families = [family for family in families_of(jobs) if self.describe(family)]
        arms = decayed_arms(families)  # one effect at a time: a decayed arm takes its undecayed arm's choice
        searched = [family for family in families if family.key not in arms]
        start = time.perf_counter()
        seeds, last_evals = trial_seeds(self.tune), self.tune.last_evals
        if self.tune.search == "grid":
            values = {family.key: list(self.tune.candidates) for family in searched}
            self.launch([(family, value) for family in searched for value in values[family.key]], announce=True)
            own = self.widen(searched, values)
        else:
            values = self.optuna(searched)
            bounds = (min(self.tune.candidates), max(self.tune.candidates))
            own = {f.key: choose(f, values[f.key], seeds, last_evals, bounds) for f in searched}
        records = [own[f.key] if f.key not in arms else follow(f, own[arms[f.key].key]) for f in families]
        self.save(records, families, time.perf_counter() - start)
        chosen = {family.key: record for family, record in zip(families, records)}
        tuned = []
        for job in jobs:
            record = chosen.get(tuple(o for o in job if override_key(o) != "seed"))
            extra = []
            if record is not None:
                extra = ([f"{key}={record['chosen']!r}"] if record["chosen"] is not None else []) + [
                    f"++tune.origin='{record['origin']}'"
                ]
            tuned.append(list(job) + extra)
        return tuned

    def widen(self, families: List[Family], values: Dict[tuple, List[float]]) -> Dict[tuple, dict]:
        """Widen at the edge (``pcsweep.tuning.to_widen``): a family whose choice lies on the edge of its candidates
        gets the next half-decade beyond it, round after round, until the choice is interior or the new candidate
        fails; each round's trials are projected (one line) and trained like the first."""
        seeds, last_evals = trial_seeds(self.tune), self.tune.last_evals
        widened: Dict[tuple, int] = {f.key: 0 for f in families}
        while True:
            records = {f.key: choose(f, values[f.key], seeds, last_evals) for f in families}
            extra = []
            for family in families:
                value = to_widen(records[family.key], values[family.key], widened[family.key], self.tune.widen)
                if value is not None:
                    values[family.key].append(value)
                    widened[family.key] += 1
                    extra.append((family, value))
            if not extra:
                for family in families:
                    records[family.key]["widened"] = sorted(set(values[family.key]) - set(self.tune.candidates))
                return records
            log.info(
                "widening at the edge: "
                + ", ".join(f"{family.model} ({family.dataset}) tries {value:g}" for family, value in extra)
            )
            self.launch(extra, announce=True)

    def launch(self, trials: List[tuple], announce: bool = False) -> None:
        """Trains (or finds finished) every ``(family, value)`` at each seed; each summary lands in its family.
        ``announce``: first one line with the projected cost of the trials that still need training."""
        launcher = self.sweeper.launcher
        seeds = trial_seeds(self.tune)
        jobs = [(family, value, seed) for family, value in trials for seed in seeds]
        started = time.time()
        overrides = [
            trial_overrides(family, self.tune.key, value, seed, family.epochs, family.val_fraction)
            + [
                f"hydra.sweep.dir='{self.folder}'",
                f"++tune.progress='{k}/{len(jobs)}/{started:.0f}/{self.tune.key}'",  # its start and end lines
                f"++tracking.group={self.sweeper.sweep_id}-tuning-{family.name}",  # W&B: a family's trials together
            ]
            for k, (family, value, seed) in enumerate(jobs, start=1)
        ]
        launcher.tuning = True
        hydra_log = logging.getLogger("hydra")
        level = hydra_log.level
        hydra_log.setLevel(logging.WARNING)  # Hydra's line per launched job would drown the trials' own
        try:
            if announce:
                entries = launcher.plan_all(overrides)
                self.announce([family for (family, _, _), e in zip(jobs, entries) if e["status"] == "launched"], jobs)
            returns = launcher.launch(overrides, initial_job_idx=0)
        finally:
            launcher.tuning = False
            hydra_log.setLevel(level)
        for job in returns:
            _ = job.return_value  # a trial that raised stops the sweep, as a grid job does
        from pcsweep.run_folder import finished_summary

        for (family, value, seed), entry in zip(jobs, launcher.entries):
            run_dir = entry.get("run_dir") or entry.get("duplicate_of")
            family.trials[(value, seed)] = finished_summary(self.folder / str(run_dir))

    def optuna(self, families: List[Family]) -> Dict[tuple, List[float]]:
        """``tune.search=optuna``: ``tune.trials`` rounds; each asks every family's study (TPE, seeded, log scale
        between the candidates' ends) for one value and trains them all at once. A re-run asks the same values and
        finds their runs finished."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        low, high = min(self.tune.candidates), max(self.tune.candidates)
        studies = {
            f.key: optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
            for f in families
        }
        values: Dict[tuple, List[float]] = {family.key: [] for family in families}
        every = [(f, None, seed) for f in families for _ in range(self.tune.trials) for seed in trial_seeds(self.tune)]
        self.announce([family for family, _, _ in every], every)  # drawn values are not known yet: all of them
        for _ in range(self.tune.trials):
            asked = {name: study.ask() for name, study in studies.items()}
            drawn = {
                name: float(f"{trial.suggest_float(self.tune.key, low, high, log=True):.3g}")
                for name, trial in asked.items()
            }
            self.launch([(family, drawn[family.key]) for family in families])
            for family in families:
                record = candidate_record(
                    drawn[family.key],
                    {s: family.trials.get((drawn[family.key], s)) for s in trial_seeds(self.tune)},
                    self.tune.last_evals,
                )
                studies[family.key].tell(asked[family.key], record["mean"] if record["mean"] is not None else 0.0)
                values[family.key].append(drawn[family.key])
        return values

    def announce(self, to_train: List[Family], jobs: Sequence[tuple]) -> None:
        """The projected cost, in one line, before any trial trains: per trial still to train, its family's
        measured time per batch x its batches."""
        from pcsweep.run import seconds_per_batch

        launcher = self.sweeper.launcher
        measured: Dict[str, float] = {}
        seconds = 0.0
        for family in to_train:
            settings = family.settings
            dataset = launcher.stability.dataset(settings)
            if family.name not in measured:
                measured[family.name] = seconds_per_batch(settings, dataset)
            batches = batches_per_epoch(len(dataset.train), settings.batch_size)
            seconds += measured[family.name] * batches * family.epochs
        log.info(cost_line(len(jobs), len({f.name for f, _, _ in jobs}), len(to_train), seconds))

    def save(self, records: List[dict], families: List[Family], seconds: float) -> None:
        from pcsweep.files import write_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        trained = sum((s or {}).get("train_seconds") or 0.0 for f in families for s in f.trials.values())
        document = {
            "key": self.tune.key,
            "search": self.tune.search,
            "candidates": list(self.tune.candidates),
            "seeds": trial_seeds(self.tune),  # disjoint from the grid's unless reuse_trials
            "reuse_trials": self.tune.reuse_trials,
            "epochs": self.tune.epochs,  # null: each family's grid epochs (its record says how many)
            "score": f"mean validation accuracy of the last {self.tune.last_evals} evaluations, then over seeds",
            "wall_seconds": seconds,  # of the last invocation (a re-run finds finished trials)
            "trials_train_seconds": trained,  # the trials' training time, however many invocations it took
            "families": records,
        }
        write_atomic(self.folder / RECORD, json.dumps(document, indent=1))
        for record in records:
            flag = "" if record["chosen"] is None or not record["edge"] else " -- on the edge: widen tune.candidates"
            log.info(f"{record['model']} {record['dataset']}: {record['origin']}{flag}")
        log.info(
            f"tuning took {seconds:.1f} s here ({trained:.1f} s of training in its trials); every candidate's score "
            f"per seed: {self.folder / RECORD}"
        )


class StabilityPreflight:
    """``pcsweep.run.measure_stability`` for a job's config, loading each dataset once per sweep."""

    def __init__(self) -> None:
        self.datasets: Dict[str, Any] = {}

    def __call__(self, settings: Any) -> dict:
        from pcsweep.run import build_model, measure_stability

        dataset = self.dataset(settings)
        model = build_model(settings, dataset.num_features, dataset.num_classes)
        return measure_stability(settings, cast("PCModule", model), dataset)  # called for PC jobs only

    def dataset(self, settings: Any) -> Any:
        """The job's dataset (as its run will load it: the validation split held out), loaded once per sweep."""
        from pcsweep.data import load_dataset

        key = repr(settings.dataset)
        if key not in self.datasets:
            self.datasets[key] = load_dataset(settings.dataset)
        return self.datasets[key]


class SweepRecord:
    """What both sweepers keep for the filtering launcher: the sweep's id and its manifest of runs."""

    config: DictConfig
    hydra_context: Any
    sweep_id: str
    manifest: List[dict]

    def start_record(self, spec: List[str]) -> None:
        """One id per multirun, the same when the same sweep is run again (resumed): the W&B sweep tag."""
        digest = hashlib.sha1(json.dumps(sorted(spec)).encode()).hexdigest()[:6]
        self.sweep_id = f"{self.config.sweep_name}-{digest}"
        self.manifest = []

    def write_manifest(self) -> None:
        from pcsweep.summary import write_manifest

        write_manifest(Path(self.config.hydra.sweep.dir), self.sweep_id, self.manifest)


def expand(overrides: Sequence[Override]) -> List[List[str]]:
    """The grid of ``overrides``: every combination of the swept values (``a=1,2 b=x,y``: 4 jobs), in order."""
    choices: Dict[str, List[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise UserError(f"{key}: pcsweep sweeps lists of values (a=1,2,3), not {override.get_value_string()}")
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


# hydra's Sweeper declares config Optional (set in setup()); SweepRecord is used only after setup
class PcsweepSweeper(SweepRecord, Sweeper):  # type: ignore[misc]
    """A grid sweeper: the product of the swept values (``params`` and the command line), plus the ``also``
    grids, then (``tune=lr``) the tuning stage; launched through ``FilteringLauncher``."""

    def __init__(
        self,
        max_batch_size: Optional[int] = None,
        params: Optional[Dict[str, str]] = None,
        also: Optional[List[Dict[str, Any]]] = None,
    ) -> None:
        super().__init__()
        self.max_batch_size, self.params = max_batch_size, dict(params or {})
        self.also = [dict(entry) for entry in (also or [])]
        self.manifest = []

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        release_stderr()  # Hydra has composed the config: its own errors are behind us
        self.hydra_context, self.config = hydra_context, config
        inner = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.launcher: FilteringLauncher = FilteringLauncher(inner, self)

    def sweep(self, arguments: List[str]) -> List[Sequence[JobReturn]]:
        spec = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        self.start_record(spec)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        try:
            batches = self.split_arguments(parser.parse_overrides(spec), self.max_batch_size)
        except UserError as exc:
            fail(str(exc))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, first = [], 0
        for batch in batches:
            results = self.launcher.launch(batch, initial_job_idx=first)
            for result in results:
                _ = result.return_value  # a job that raised stops the sweep
            first += len(batch)
            returns.append(results)
        return returns

    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """The grid, plus the ``also`` grids (the same overrides with some keys replaced), in batches."""
        jobs = expand(overrides)
        parser = OverridesParser.create()
        for entry in self.also:
            extra = parser.parse_overrides([f"{k}={v}" for k, v in entry.items()])
            keys = {o.get_key_element() for o in extra}
            jobs += expand([o for o in overrides if o.get_key_element() not in keys] + extra)
        config = getattr(self, "config", None)  # None: expanding a grid without a sweep (setup not called)
        if config is not None and config.tune.key is not None:  # tune=lr: the search first, then the grid at it
            jobs = TuningStage(self).run(jobs)
        size = max_batch_size or len(jobs) or 1
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]


# ------------------------------------------------------------------------------------------------ Optuna
# What a trial can be judged by: a key of the run's summary.json, and the direction that is better. Validation
# metrics only (dataset.val_fraction > 0): a hyperparameter chosen on the test set would make the test set's
# numbers a biased estimate.
OBJECTIVES = {"best_val_acc": "maximize", "final_val_acc": "maximize", "final_val_loss": "minimize"}


def objective_value(summary: dict, objective: str) -> float:
    """A trial's value; a run that diverged or never reached an evaluation counts as the worst possible."""
    value = summary.get(objective)
    if value is None:
        return float("inf") if OBJECTIVES[objective] == "minimize" else 0.0
    return float(value)


def finished_return(overrides: Sequence[str], summary: dict) -> JobReturn:
    """The JobReturn a trial gets when its run needs no training (finished earlier, or the same run as another)."""
    from hydra.core.utils import JobStatus

    job = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    job.return_value = summary
    return job


class TrialLauncher(FilteringLauncher):
    """``FilteringLauncher`` for a study: one return per trial, in order, each the trial's objective value."""

    sweeper: "PcsweepOptunaSweeper"

    def check(self, label: str, settings: Any) -> None:
        from pcsweep.config import duplicate_target

        if settings.tune.key is not None:
            fail(
                f"{label}: tune={settings.tune.key} is pcsweep's own tuning stage, and hydra/sweeper=optuna tunes by "
                "itself: use one of them (tune=none here)"
            )
        if duplicate_target(settings) is not None:
            fail(
                f"{label}: algo=bp has no conditions to relax, so relax={settings.relax} tunes nothing: use relax=none"
            )
        if settings.dataset.val_fraction == 0:
            fail(
                f"{label}: the objective {self.sweeper.objective} is measured on a validation split, and "
                "dataset.val_fraction is 0: add dataset.val_fraction=0.1 (tuning never reads the test set)"
            )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra.core.utils import JobStatus

        from pcsweep.run_folder import finished_summary

        first = len(self.sweeper.manifest)
        launched = super().launch(job_overrides, initial_job_idx)
        entries = self.sweeper.manifest[first:]
        # one return per launched job, and a pack's job returns every member's summary (pcsweep.pack): each trial
        # finds its own by its folder; a trial without one was in a job that failed: it finished all the same (another
        # member failed the pack's job), or it gets the failure of the job it was in
        summaries: Dict[str, dict] = {}
        trained = [entry for entry in entries if entry["status"] == "launched"]
        job_of = {trained[i]["run_dir"]: job for job, group in zip(launched, self.launched_groups) for i in group}
        sweep_dir = Path(self.sweeper.config.hydra.sweep.dir)
        for job in launched:
            if job.status == JobStatus.COMPLETED:
                value = job.return_value or {}
                summaries.update((summary.get("run_dir"), summary) for summary in value.get("pack", [value]))
        by_run: Dict[str, JobReturn] = {}
        for entry in entries:
            if entry["status"] == "launched":
                if entry["run_dir"] in summaries:
                    by_run[entry["run_dir"]] = finished_return(entry["overrides"], summaries[entry["run_dir"]])
                else:
                    summary = finished_summary(sweep_dir / entry["run_dir"])
                    by_run[entry["run_dir"]] = (
                        finished_return(entry["overrides"], summary) if summary else job_of[entry["run_dir"]]
                    )
            elif entry["status"] == "finished":
                summary = finished_summary(sweep_dir / entry["run_dir"])
                by_run[entry["run_dir"]] = finished_return(entry["overrides"], summary or {})
        returns = []
        for entry, overrides in zip(entries, job_overrides):
            job = by_run[entry.get("run_dir") or entry["duplicate_of"]]
            if job.status == JobStatus.COMPLETED:
                summary = job.return_value
                self.sweeper.trials.append(
                    {
                        "overrides": list(overrides),
                        "run_dir": summary.get("run_dir"),
                        "value": objective_value(summary, self.sweeper.objective),
                    }
                )
                job = finished_return(overrides, self.sweeper.trials[-1]["value"])
            returns.append(job)
        return returns


def register_optuna() -> None:
    """``hydra/sweeper=optuna`` is pcsweep's: Optuna's sweeper config with pcsweep's sweeper as its target and
    ``objective`` added. Optuna's plugin registers the same name when its config module is imported, so that module
    is imported first (once) and its entry replaced, whatever order Hydra scans the plugins in."""
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    except ImportError:  # not installed: the sweeper says how to install it, in one line

        @dataclass
        class MissingOptuna:
            _target_: str = "hydra_plugins.pcsweep_sweeper.PcsweepOptunaSweeper"

        ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=MissingOptuna, provider="pcsweep")
        return

    @dataclass
    class PcsweepOptunaConf(OptunaSweeperConf):
        """pcsweep -m hydra/sweeper=optuna algo=pc relax=23 dataset.val_fraction=0.1
        'optimizer.lr=tag(log, interval(1e-6, 1e-2))' hydra.sweeper.n_trials=20"""

        _target_: str = "hydra_plugins.pcsweep_sweeper.PcsweepOptunaSweeper"
        _recursive_: bool = False  # the sampler is built by the sweeper, seeded
        objective: str = "best_val_acc"  # a key of OBJECTIVES: validation metrics only
        direction: Any = "maximize"
        study_name: Optional[str] = "${sweep_name}"
        n_jobs: int = 1  # trials per batch (in parallel with launcher=gpus or launcher=slurm)

    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=PcsweepOptunaConf, provider="pcsweep")


register_optuna()


class PcsweepOptunaSweeper(SweepRecord, Sweeper):  # type: ignore[misc]  # config: see PcsweepSweeper
    """Hydra's Optuna sweeper (``hydra-optuna-sweeper``) behind pcsweep's checks; the options are Optuna's, plus
    ``objective`` (a key of ``OBJECTIVES``). The best trial is logged and saved as ``best.yaml`` (its overrides,
    value and run folder) and ``best_config.yaml`` (the run's whole config) in the sweep folder."""

    def __init__(self, objective: str = "best_val_acc", sampler: Any = None, **optuna_options: Any) -> None:
        try:
            from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
        except ImportError:
            fail("hydra/sweeper=optuna needs Hydra's Optuna sweeper: pip install 'pcsweep[tune]'")
        if objective not in OBJECTIVES:
            fail(
                f"hydra.sweeper.objective={objective} is not something a run measures; one of: " + ", ".join(OBJECTIVES)
            )
        direction = str(getattr(optuna_options.get("direction"), "name", optuna_options.get("direction")))
        if direction != OBJECTIVES[objective]:
            fail(
                f"{objective} is better when it is {'higher' if OBJECTIVES[objective] == 'maximize' else 'lower'}: "
                f"set hydra.sweeper.direction={OBJECTIVES[objective]}"
            )
        import optuna
        from hydra.utils import instantiate

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep's own lines say what each trial did
        if sampler is not None and sampler.get("seed", 0) is None:
            sampler.seed = 0  # the same study asks the same trials again: a re-run is answered by finished runs
        self.objective = objective
        self.impl = OptunaSweeperImpl(sampler=instantiate(sampler), **optuna_options)
        self.trials: List[dict] = []
        self.manifest = []

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        release_stderr()
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.config, self.hydra_context = config, hydra_context
        assert self.impl.launcher is not None  # made by OptunaSweeperImpl.setup
        self.impl.launcher = TrialLauncher(self.impl.launcher, self)

    def sweep(self, arguments: List[str]) -> None:
        params = cast(Dict[str, Any], self.impl.params or {})  # a DictConfig: its keys are str
        self.start_record([f"{k}={v}" for k, v in params.items()] + list(arguments))
        self.fixed = set(arguments)
        self.impl.sweep(arguments)
        self.save_best()

    def save_best(self) -> None:
        from omegaconf import OmegaConf

        from pcsweep.files import write_atomic

        if not self.trials:
            return
        better = max if OBJECTIVES[self.objective] == "maximize" else min
        best = better(self.trials, key=lambda trial: trial["value"])
        sweep_dir = Path(self.config.hydra.sweep.dir)
        record = {
            "objective": self.objective,
            "value": best["value"],
            "overrides": best["overrides"],
            "run_dir": best["run_dir"],
            "trials": len(self.trials),
        }
        write_atomic(sweep_dir / "best.yaml", OmegaConf.to_yaml(OmegaConf.create(record)))
        config = sweep_dir / str(best["run_dir"]) / "config.yaml"
        if config.is_file():
            write_atomic(sweep_dir / "best_config.yaml", config.read_text())
        chosen = [override for override in best["overrides"] if override not in self.fixed]
        log.info(
            f"best of {len(self.trials)} trials: {' '.join(chosen)} ({self.objective} "
            f"{best['value']:.4f}) in {best['run_dir']}; saved as {sweep_dir / 'best.yaml'} and "
            f"{sweep_dir / 'best_config.yaml'}"
        )
