"""Hydra's basic sweeper, plus what a pcsweep grid needs before anything is launched.

Every job's config is composed and checked first (an invalid number anywhere stops the sweep before any training),
BP duplicates (``algo=bp relax=2`` trains what ``relax=none`` trains) and runs already finished in their folder are
dropped with one line each, and the list of this sweep's runs is written for the summary callback. It wraps
whatever launcher is configured, so the same filtering happens locally and on SLURM.
"""


import logging
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig

from pcsweep.errors import UserError
from pcsweep.errors import exit_with as fail

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

    def __init__(self, inner: Launcher, sweeper: "PcsweepSweeper") -> None:
        self.inner, self.sweeper = inner, sweeper
        self.stability = StabilityPreflight()

    def setup(self, **kwargs: Any) -> None:  # pragma: no cover - the inner launcher is already set up
        self.inner.setup(**kwargs)

    def plan(self, overrides: Sequence[str], seen: Dict[str, str]) -> dict:
        """One job's manifest entry: ``launched``, or skipped as a duplicate or finished run (with one line why).
        Every job is composed and checked here, so bad input anywhere stops the sweep before any training."""
        from hydra.errors import ConfigCompositionException

        from pcsweep.config import duplicate_target, paper_name, run_dir_name, settings_from
        from pcsweep.data import BUNDLED, check_available
        from pcsweep.run import adopt_previous_folder, finished_summary, resolve_data_dir

        label = " ".join(overrides)
        try:
            cfg = self.sweeper.hydra_context.config_loader.load_sweep_config(self.sweeper.config, list(overrides))
            if cfg.dataset.name not in BUNDLED:
                cfg.dataset.data_dir = str(resolve_data_dir(cfg))
            settings = settings_from(cfg)
            if not self.slurm:  # a login node need not have the compute nodes' GPUs
                settings.trainer.check_devices()
            check_available(settings.dataset.name, settings.dataset.data_dir, settings.dataset.download)
        except ConfigCompositionException as exc:
            fail(f"{label}: {str(exc.__cause__ or exc).splitlines()[0]}")
        except UserError as exc:
            fail(f"{label}: {exc}")
        entry = {"overrides": list(overrides), "model": paper_name(settings), "dataset": settings.dataset.name}
        target, run_dir = duplicate_target(settings), run_dir_name(cfg)
        if target is not None:
            entry["model"] += f" relax={settings.relax.name}"
            log.info(f"skipped {entry['model']}: duplicate of {target} (BP has no conditions to relax)")
            return {**entry, "status": "duplicate", "duplicate_of": target}
        if run_dir in seen:
            log.info(f"skipped {label}: same run as {seen[run_dir]}")
            return {**entry, "status": "duplicate", "duplicate_of": run_dir}
        seen[run_dir] = label
        entry["run_dir"] = run_dir
        path = Path(self.sweeper.config.hydra.sweep.dir) / run_dir
        adopt_previous_folder(path, cfg)
        done = finished_summary(path)
        if done is not None:
            log.info(f"skipped {label}: already {done['status']} in {run_dir}")
            return {**entry, "status": "finished"}
        if settings.algo.name == "pc":
            try:  # a step size or floor past the stability limit stops the sweep before its first job
                self.stability(settings)
            except UserError as exc:
                fail(f"{label}: {exc}")
        return {**entry, "status": "launched"}

    @property
    def slurm(self) -> bool:
        return "SlurmLauncher" in str(self.sweeper.config.hydra.launcher.get("_target_", ""))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        slurm = self.slurm
        if slurm and shutil.which("sbatch") is None:
            fail("launcher=slurm needs SLURM, and there is no `sbatch` here: run on a cluster's login node "
                 "(or launcher=local)")
        seen: Dict[str, str] = {}
        entries = [self.plan(overrides, seen) for overrides in job_overrides]
        to_launch = [list(entry["overrides"]) + [f"++tracking.group={self.sweeper.sweep_id}"]
                     for entry in entries if entry["status"] == "launched"]
        self.sweeper.manifest.extend(entries)
        self.sweeper.write_manifest()
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
            fail(f"a SLURM job ended unfinished ({message.splitlines()[0]}); run the same command again: "
                 "finished runs are skipped and interrupted ones resume from their checkpoints")


class StabilityPreflight:
    """``pcsweep.run.measure_stability`` for a job's config, loading each dataset once per sweep."""

    def __init__(self) -> None:
        self.datasets: Dict[str, Any] = {}

    def __call__(self, settings: Any) -> dict:
        from pcsweep.data import load_dataset
        from pcsweep.run import build_model, measure_stability

        key = repr(settings.dataset)
        if key not in self.datasets:
            self.datasets[key] = load_dataset(settings.dataset)
        dataset = self.datasets[key]
        model = build_model(settings, dataset.num_features, dataset.num_classes)
        return measure_stability(settings, model, dataset)


class PcsweepSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 also: Optional[List[Dict[str, Any]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.also = [dict(entry) for entry in (also or [])]
        self.manifest: List[dict] = []

    def sweep(self, arguments: List[str]) -> Any:
        # one id per multirun, the same when the same sweep is run again (resumed): the W&B group
        spec = sorted(self._parse_config() + list(arguments))
        digest = hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:6]
        self.sweep_id = f"{self.config.sweep_name}-{digest}"
        return super().sweep(arguments)

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = FilteringLauncher(self.launcher, self)

    def split_arguments(self, overrides: Any, max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """BasicSweeper's expansion, plus the ``also`` grids (the same overrides with some keys replaced)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        jobs = BasicSweeper.split_arguments(overrides, None)[0]
        parser = OverridesParser.create()
        for entry in self.also:
            extra = parser.parse_overrides([f"{k}={v}" for k, v in entry.items()])
            keys = {o.get_key_element() for o in extra}
            jobs += BasicSweeper.split_arguments([o for o in overrides if o.get_key_element() not in keys] + extra,
                                                 None)[0]
        if max_batch_size is None:
            return [jobs]
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        pass  # FilteringLauncher composes (and so validates) every job itself

    def write_manifest(self) -> None:
        from pcsweep.summary import write_manifest

        write_manifest(Path(self.config.hydra.sweep.dir), self.sweep_id, self.manifest)
