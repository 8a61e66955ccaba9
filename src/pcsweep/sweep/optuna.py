"""``hydra/sweeper=optuna`` behind pcsweep's checks: Optuna's sweeper tunes one twin, every trial is a normal
run folder, a trial whose run already finished is answered from its ``summary.json``, and the objective is read from
the run's summary (a validation metric: never the test set)."""

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, cast

from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pcsweep.config.errors import exit_with as fail
from pcsweep.config.errors import release_stderr
from pcsweep.sweep.grid import SweepRecord
from pcsweep.sweep.planning import FilteringLauncher

if TYPE_CHECKING:
    from pcsweep.sweep.grid import SweepRecord

log = logging.getLogger(__name__)

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

    sweeper: "StudySweeper"

    def check(self, label: str, settings: Any) -> None:
        from pcsweep.config.compose import duplicate_target

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

        from pcsweep.run.folder import finished_summary

        first = len(self.sweeper.manifest)
        launched = super().launch(job_overrides, initial_job_idx)
        entries = self.sweeper.manifest[first:]
        # one return per launched job, and a pack's job returns every member's summary (pcsweep.run.pack): each trial
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


class StudySweeper(SweepRecord, Sweeper):  # type: ignore[misc]  # config: see GridSweeper
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

        from pcsweep.run.files import write_atomic

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
