"""``tune=lr`` (``pcsweep.sweep.tuning``'s rules) as a stage before a grid: every family of the grid gets the
same search on the validation split, launched like any other jobs, and the grid trains at each family's choice."""

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Sequence

from pcsweep.config.errors import UserError
from pcsweep.config.errors import exit_with as fail
from pcsweep.sweep.tuning import (
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
    override_key,
    to_widen,
    trial_overrides,
    trial_seeds,
)

if TYPE_CHECKING:
    from pcsweep.sweep.grid import GridSweeper

log = logging.getLogger(__name__)


class TuningStage:
    """``tune=lr`` (``pcsweep.sweep.tuning``): before the grid, every family's trials (the same candidates, seeds and
    epochs
    for every twin) are launched like any other jobs into ``<sweep>/tuning/``, scored on the validation split, and
    each grid job gets its family's choice (``key=value``) and where it came from (``tune.origin``)."""

    def __init__(self, sweeper: "GridSweeper") -> None:
        self.sweeper = sweeper
        self.tune = sweeper.config.tune
        self.folder = Path(sweeper.config.hydra.sweep.dir) / TUNING_DIR

    def describe(self, family: Family) -> bool:
        """Names the family from its composed settings; False for a BP duplicate (nothing of its own to tune)."""
        from pcsweep.config.compose import duplicate_target, family_name, paper_name, setting_value, settings_from

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
        """Widen at the edge (``pcsweep.sweep.tuning.to_widen``): a family whose choice lies on the edge of its
        candidates
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
        from pcsweep.run.folder import finished_summary

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
        from pcsweep.run.task import seconds_per_batch

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
        from pcsweep.run.files import write_atomic

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
