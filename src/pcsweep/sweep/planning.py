"""Which of a sweep's jobs train, planned before anything is launched.

Every job's config is composed and checked first (an invalid number anywhere stops the sweep before any training),
BP duplicates (``algo=bp relax=2`` trains what ``relax=none`` trains) and runs already finished in their folder are
dropped with one line each, PC runs of one shape are packed, and the list of this sweep's runs is written for the
summary callback. It wraps whatever launcher is configured, so the same filtering happens locally and on SLURM.

Hydra imports the sweepers whenever any Hydra application starts (plugin discovery): pcsweep's heavy modules (torch,
Lightning, the run) are imported inside the methods that run a pcsweep sweep, never at the top of these modules.
"""

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, cast

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher

from pcsweep.config.errors import UserError
from pcsweep.config.errors import exit_with as fail
from pcsweep.sweep.preflight import StabilityPreflight
from pcsweep.sweep.tuning import (
    TUNING_DIR,
    lr_origin,
    reuse_trial,
)

if TYPE_CHECKING:
    from pcsweep.sweep.grid import SweepRecord

log = logging.getLogger(__name__)


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

        from pcsweep.config.compose import duplicate_target, paper_name, run_dir_name, settings_from
        from pcsweep.data.datasets import BUNDLED, check_available
        from pcsweep.run.folder import adopt_previous_folder, finished_summary
        from pcsweep.run.task import resolve_data_dir

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
        GPUs each job requests decide, not the login node's (``pcsweep.run.pack.job_has_gpu``)."""
        from pcsweep.run.pack import job_has_gpu

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
        self.launched_groups = []
        if launched:  # PC runs of one shape and schedule train as packs (pcsweep.run.pack)
            from pcsweep.run.pack import pack_groups, pack_jobs

            plans = [self.packing[tuple(entry["overrides"])] for entry in launched]
            own, sizes = [plan[0] for plan in plans], [plan[1] for plan in plans]
            self.launched_groups = pack_groups(own, sizes)
            to_launch = pack_jobs(to_launch, own, self.launched_groups)
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
