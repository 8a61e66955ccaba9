"""Registers pcsweep's sweepers with Hydra: the grid sweeper (``hydra/sweeper=pcsweep``, ``pcsweep.sweep.grid``) and
Optuna's behind pcsweep's checks (``hydra/sweeper=optuna``, ``pcsweep.sweep.optuna``). What each does lives in
``pcsweep.sweep``; Hydra imports this module whenever any Hydra application starts, so it stays light."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from pcsweep.sweep import grid, optuna


@dataclass
class PcsweepSweeperConf:
    _target_: str = "hydra_plugins.pcsweep_sweeper.PcsweepSweeper"
    max_batch_size: Optional[int] = None
    # the default sweep, the five twins; the same keys given on the command line replace these
    params: Optional[Dict[str, str]] = field(default_factory=lambda: {"algo": "bp,pc", "relax": "none,2,3,23"})
    # more jobs: each entry replaces some of the grid's keys (experiment=paper adds pc_rc23 with weight decay)
    also: Optional[List[Dict[str, Any]]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="pcsweep", node=PcsweepSweeperConf, provider="pcsweep")


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


# Hydra takes a plugin only from a module of the hydra_plugins package: the sweepers are named here, their work is in
# pcsweep.sweep


class PcsweepSweeper(grid.GridSweeper):
    """``hydra/sweeper=pcsweep``: ``pcsweep.sweep.grid.GridSweeper``."""


class PcsweepOptunaSweeper(optuna.StudySweeper):
    """``hydra/sweeper=optuna``: ``pcsweep.sweep.optuna.StudySweeper``."""
