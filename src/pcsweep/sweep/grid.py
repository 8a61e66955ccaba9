"""pcsweep's grid sweeper (``hydra/sweeper=pcsweep``, the default): the product of the swept values plus the
``also`` grids, the tuning stage first when ``tune=lr``, launched through the planning launcher."""

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pcsweep.config.errors import UserError, release_stderr
from pcsweep.config.errors import exit_with as fail
from pcsweep.sweep.planning import FilteringLauncher
from pcsweep.sweep.tuning_stage import TuningStage


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
        from pcsweep.sweep.table import write_manifest

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
class GridSweeper(SweepRecord, Sweeper):  # type: ignore[misc]
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
