"""A run's folder over its life: finished or not, a folder of other settings set aside, a folder of an earlier
release's naming adopted. (What is inside it: ``pcsweep.run.task``'s docstring.)"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional, cast

from omegaconf import OmegaConf

from pcsweep.config.compose import config_hash, find_previous_folder
from pcsweep.config.settings import Settings
from pcsweep.run.files import read_json

log = logging.getLogger(__name__)

FINISHED = ("complete", "diverged", "failed_to_learn")


def finished_summary(run_dir: Path) -> Optional[dict]:
    """The run's summary if it finished (an unreadable one is set aside: the run resumes or retrains)."""
    summary = read_json(Path(run_dir) / "summary.json")
    return summary if isinstance(summary, dict) and summary.get("status") in FINISHED else None


LAUNCH_FILES = (".hydra", "pcsweep.log")  # what Hydra writes into a single run's folder before pcsweep runs


def set_aside_if_other_settings(run_dir: Path, settings: Settings) -> None:
    """A folder at this run's name whose ``config.yaml`` has another identity (a default changed since it ran: its
    name was hashed from what differed from the defaults of its day) is renamed ``<name>.other-<its hash>``: it is
    not this run, so it must neither be resumed nor answer as finished. Its settings still find it under that name."""
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return
    try:
        theirs = config_hash(cast(dict, OmegaConf.to_container(OmegaConf.load(stored))))
    except Exception:  # unreadable: the run's own checks (resume, finished) deal with it
        return
    if theirs == config_hash(settings):
        return
    aside, n = run_dir.with_name(f"{run_dir.name}.other-{theirs}"), 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.other-{theirs}.{n}")
    aside.mkdir()
    for child in run_dir.iterdir():
        if child.name not in LAUNCH_FILES:  # this launch's Hydra record and log stay with this run
            os.replace(child, aside / child.name)
    log.info(f"{run_dir.name} held a run with other settings (a default has changed since): moved to {aside.name}")


def adopt_previous_folder(run_dir: Path, settings: Settings) -> None:
    """Move this run's folder from an earlier release's naming, if there is one, so it resumes or is skipped.
    (A single run's folder may already exist, holding only what Hydra wrote into it: the old files join it.)"""
    set_aside_if_other_settings(run_dir, settings)
    previous = None if (run_dir / "config.yaml").exists() else find_previous_folder(run_dir.parent, settings)
    if previous is None:
        return
    if not run_dir.exists():
        os.replace(previous, run_dir)
    else:
        for child in previous.iterdir():
            if not (run_dir / child.name).exists():
                os.replace(child, run_dir / child.name)
        shutil.rmtree(previous)  # what is left there is Hydra's record of the earlier launch
    log.info(f"{previous.name} holds this run under an earlier folder name: renamed to {run_dir.name}")
