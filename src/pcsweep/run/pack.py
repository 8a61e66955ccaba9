"""Packs: PC runs of one shape and schedule that differ only in what each member may keep its own (``MEMBER_KEYS``:
seeds, tuning candidates' learning rates, pc beside rc3, rc2 beside rc23) trained side by side in one process, their
batches computed as one (``pc.gang``).

The sweeper groups them (``pack_groups``, ``pack_jobs``) and launches one job per pack: the first member's
overrides, and each member's own settings in ``pack.members``. The job (``train_pack``) trains each member as the
run it is alone, in its own thread: its own folder, summary, metrics, checkpoint and W&B run, resumed or skipped on
its own, stopped on its own when it diverges. Signals reach every member (``run.interruption.forwarding``): each
checkpoints at its next batch end, or stops there unsaved at a second Ctrl-C.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, cast

import torch
from omegaconf import OmegaConf

from pcsweep.config.compose import flatten, run_dir_name, settings_from
from pcsweep.config.settings import Settings
from pcsweep.data.datasets import load_dataset
from pcsweep.model.twins import PCModule
from pcsweep.pc.gang import Gang
from pcsweep.pc.members import check_fits
from pcsweep.run.interruption import REQUEUE_SIGNALS, Interrupted, forwarding
from pcsweep.run.task import in_folder, prepare, skipped, train_owned

log = logging.getLogger(__name__)

# what a pack's members may differ in (dotted prefixes of the settings): each member keeps its own seed, optimizer and
# learning rate, inference step size, momentum and tolerance, learned variance or none, and floor (pc.members);
# everything else (shape, data, schedule, Trainer) is the pack's
MEMBER_KEYS = (
    "seed",
    "tune",
    "tracking",
    "learning_rates",
    "optimizer.lr",
    "weight_decay",
    "relax",
    "variance",
    "log_variance_min",
    "variance_weight_decay",
    "inference.step_size",
    "inference.momentum",
    "inference.tolerance",
    "inference.auto_stiffness",
)


def _own(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MEMBER_KEYS)


def pack_shape(settings: Settings) -> tuple:
    """What must be equal for runs to pack: every setting but the members' own (``MEMBER_KEYS``), and the learned
    variance's shape: per neuron and per layer do not mix, and S = 1 groups with per neuron (the twins' default;
    the engine would take it beside per layer too)."""
    shared = sorted((k, repr(v)) for k, v in flatten(dataclasses.asdict(settings)).items() if not _own(k))
    variance = "neuron" if settings.variance == "fixed" else settings.variance
    return tuple(shared), variance


def job_has_gpu(settings: Settings, launcher: Mapping[str, Any]) -> bool:
    """Whether a job will train on a GPU, decided where the sweep is planned: on SLURM by the GPUs each job requests
    (``gpus_per_node``, ``gpus_per_task``), not by the login node's devices; elsewhere by this machine's."""
    if "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return settings.trainer.on_cuda()
    requested = int(launcher.get("gpus_per_node") or 0) + int(launcher.get("gpus_per_task") or 0)
    return requested > 0 and settings.trainer.accelerator not in ("cpu",)


def pack_jobs(
    jobs: Sequence[Sequence[str]], settings: Sequence[Optional[Settings]], groups: Sequence[Sequence[int]]
) -> list[list[str]]:
    """The jobs to launch, one per group of ``pack_groups``: a job alone as it is, a pack as its first member plus
    ``++pack.members`` (each member's settings where they differ from the first's)."""
    launched = []
    for group in groups:
        first = list(jobs[group[0]])
        if len(group) == 1:
            launched.append(first)
            continue
        base = settings[group[0]]
        assert base is not None  # only PC jobs with settings are grouped
        differences = [settings_difference(base, cast(Settings, settings[i])) for i in group]
        launched.append(first + [f"++pack.members='{encode(differences)}'"])
    return launched


def pack_groups(settings: Sequence[Optional[Settings]], sizes: Sequence[int]) -> list[list[int]]:
    """Which jobs each launched job trains, as indices, in launch order: PC jobs (those with ``settings``; None: BP
    or not to pack) of one ``pack_shape`` grouped into packs of at most their group's size (``sizes[i]``: job i's
    ``pack.size``, one for a whole group, since ``pack.size`` is part of the shape); every other job alone, first."""
    groups: dict[tuple, list[int]] = {}
    group_size: dict[tuple, int] = {}
    alone: list[list[int]] = []
    for index, (own, size) in enumerate(zip(settings, sizes)):
        if own is None or size <= 1:
            alone.append([index])
            continue
        shape = pack_shape(own)
        groups.setdefault(shape, []).append(index)
        group_size.setdefault(shape, size)
    packs = [
        members[start : start + group_size[shape]]
        for shape, members in groups.items()
        for start in range(0, len(members), group_size[shape])
    ]
    return alone + packs


def settings_difference(base: Settings, other: Settings) -> dict[str, Any]:
    """``other``'s settings where they differ from ``base``'s, as {dotted key: value}."""
    mine, theirs = flatten(dataclasses.asdict(base)), flatten(dataclasses.asdict(other))
    return {k: v for k, v in theirs.items() if k not in mine or mine[k] != v}


def encode(members: list[dict[str, Any]]) -> str:
    """The members' own settings for ``pack.members``: base64 JSON (no quoting of a tuned origin's text needed)."""
    return base64.urlsafe_b64encode(json.dumps(members).encode()).decode()


def member_settings(settings: Settings) -> list[Settings]:
    """Each member's settings: the pack job's (the first member's), with the member's own values (and no pack of
    its own)."""
    assert settings.pack.members is not None  # called for a pack's job
    members = json.loads(base64.urlsafe_b64decode(settings.pack.members.encode()))
    result = []
    for own in members:
        member = OmegaConf.create(dataclasses.asdict(settings))
        member.pack.members = None
        for key, value in own.items():
            OmegaConf.update(member, key, value, merge=False, force_add=True)
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
        threading.Thread(target=train_member, args=(slot, *job), name=f"pack-{job[0]}", daemon=True)
        for slot, job in enumerate(todo)
    ]  # daemons: a third Ctrl-C ends the process at once (checkpoints are written atomically: kill -9 is safe too)
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
    """A member's failure, once all have stopped: a signal first (handed on to whoever requeues; a stop without a
    save before one with), then any other."""
    interrupted = sorted((exc for exc in failures.values() if isinstance(exc, Interrupted)), key=lambda e: e.saved)
    if interrupted:
        signum = interrupted[0].signum
        handler = previous.get(signum)
        if signum in REQUEUE_SIGNALS and callable(handler):
            handler(signum, None)  # submitit's: requeue (and exit the process)
        raise interrupted[0]
    if failures:
        raise failures[min(failures)]
