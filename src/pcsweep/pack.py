"""Packs: runs of one PC twin, shape and schedule that differ only in their seed or learning rate (seeds, tuning
candidates) trained side by side in one process, their batches computed as one (``pc.gang``).

The sweeper groups them (``pack_jobs``) and launches one job per pack: the first member's overrides, and the members'
own overrides in ``pack.members``. The job (``train_pack``) trains each member as the run it is alone, in its own
thread: its own folder, summary, metrics, checkpoint and W&B run, resumed or skipped on its own, stopped on its own
when it diverges. Signals reach every member (each checkpoints at its next batch end).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from pcsweep.config import run_dir_name, settings_from
from pcsweep.data import load_dataset
from pcsweep.interruption import REQUEUE_SIGNALS, Interrupted, forwarding
from pcsweep.models import PCModule
from pcsweep.pc.gang import Gang
from pcsweep.pc.population import check_fits
from pcsweep.run import in_folder, prepare, skipped, train_owned
from pcsweep.settings import Settings
from pcsweep.tuning import override_key

log = logging.getLogger(__name__)

# the settings in which members of one pack may differ (the tuning stage adds its tuned key)
MEMBER_KEYS = ("seed", "tune.origin", "tracking.group")


def pack_jobs(jobs: Sequence[Sequence[str]], pc: Sequence[bool], size: int, tuned: Optional[str]) -> list[list[str]]:
    """The jobs to launch: PC jobs (``pc``) that differ only in ``MEMBER_KEYS`` (and the tuned key) grouped into packs
    of at most ``size``, each launched as its first member plus ``++pack.members``; every other job as it is."""
    own = set(MEMBER_KEYS) | ({tuned} if tuned else set())
    groups: dict[tuple, list[list[str]]] = {}
    launched: list[list[str]] = []
    for job, is_pc in zip(jobs, pc):
        if not is_pc or size <= 1:
            launched.append(list(job))
            continue
        shared = tuple(sorted(o for o in job if override_key(o) not in own))
        groups.setdefault(shared, []).append(list(job))
    for members in groups.values():
        for start in range(0, len(members), size):
            pack = members[start : start + size]
            if len(pack) == 1:
                launched.append(pack[0])
                continue
            own_overrides = [[o for o in job if override_key(o) in own] for job in pack]
            launched.append(pack[0] + [f"++pack.members='{encode(own_overrides)}'"])
    return launched


def encode(members: list[list[str]]) -> str:
    """The members' own overrides for ``pack.members``: base64 JSON (no quoting of a tuned origin's text needed)."""
    return base64.urlsafe_b64encode(json.dumps(members).encode()).decode()


def member_settings(settings: Settings) -> list[Settings]:
    """Each member's settings: the pack job's, with the member's own overrides (and no pack of its own)."""
    assert settings.pack.members is not None  # called for a pack's job
    members = json.loads(base64.urlsafe_b64decode(settings.pack.members.encode()))
    parser = OverridesParser.create()
    result = []
    for overrides in members:
        member = OmegaConf.create(dataclasses.asdict(settings))
        member.pack.members = None
        for override in parser.parse_overrides(overrides):
            OmegaConf.update(member, override.key_or_group, override.value(), force_add=True)
        result.append(settings_from(member))
    return result


def train_pack(settings: Settings, run_dir: Path) -> dict[str, Any]:
    """A pack's job: every member trained as alone, the batches together. ``run_dir``: the job's folder (the first
    member's), in the sweep's folder where every member's own folder is."""
    members = member_settings(settings)
    dataset = load_dataset(settings.dataset)  # the members differ in seed and learning rate only: one dataset
    sizes = [dataset.num_features] + [settings.width] * settings.depth + [dataset.num_classes]
    dtype = torch.float64 if str(settings.trainer.precision).startswith("64") else torch.float32
    device = torch.device("cuda" if settings.trainer.on_cuda() else "cpu")
    check_fits(len(members), sizes, settings.batch_size, dtype, device)
    summaries: dict[int, dict] = {}
    todo = []
    for index, member in enumerate(members):
        folder = run_dir.parent / run_dir_name(member)
        done = skipped(member, folder)
        if done is not None:
            summaries[index] = done
            continue
        model, stability = prepare(member, dataset)  # the pre-flights run one by one, before any training
        todo.append((index, member, folder, model, stability))
    log.info(f"a pack of {len(members)} runs: {len(todo)} train together ({len(members) - len(todo)} already done)")
    gang = Gang(len(todo))
    failures: dict[int, BaseException] = {}

    def train_member(slot: int, index: int, member: Settings, folder: Path, model, stability) -> None:
        seat = gang.seat(slot, model.engine) if isinstance(model, PCModule) else None
        model.seat = seat
        try:
            summaries[index] = in_folder(member, folder, lambda: train_owned(member, folder, dataset, model, stability))
        except BaseException as exc:  # stops this member only; raised once every member has stopped
            failures[index] = exc
        finally:
            if seat is not None:
                seat.leave()

    threads = [
        threading.Thread(target=train_member, args=(slot, *job), name=f"pack-{job[0]}") for slot, job in enumerate(todo)
    ]
    # Lightning's 64-bit precision sets torch's default dtype (process-wide) around every step: members in threads can
    # leave it changed, and the next pack's models would be drawn in another dtype (the metrics pin theirs: models.py)
    default_dtype = torch.get_default_dtype()
    with forwarding() as previous:
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            torch.set_default_dtype(default_dtype)
    _raise_first(failures, previous)
    return {"pack": [summaries[i] for i in sorted(summaries)]}


def _raise_first(failures: dict[int, BaseException], previous: dict[int, Any]) -> None:
    """A member's failure, once all have stopped: a signal first (handed on to whoever requeues), then any other."""
    interrupted = [exc for exc in failures.values() if isinstance(exc, Interrupted)]
    if interrupted:
        signum = interrupted[0].signum
        handler = previous.get(signum)
        if signum in REQUEUE_SIGNALS and callable(handler):
            handler(signum, None)  # submitit's: requeue (and exit the process)
        raise interrupted[0]
    if failures:
        raise failures[min(failures)]
