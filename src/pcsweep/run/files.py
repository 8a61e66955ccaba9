"""The files a later step trusts: written atomically, read with a check, owned by one process at a time.

A kill, a full disk or a second sweep on the same folder must never leave a run that looks finished but is not:
every such file is written beside its name and renamed into place (a reader sees the old file or the new one, never
half of one); one that cannot be read is moved aside as ``<name>.corrupt`` with one line, and the run goes on from
the last good state; a run folder is trained by one process at a time (an ``flock``, released by the OS when its
holder dies, so a killed process never leaves a stale lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Optional

from pcsweep.config.errors import UserError

log = logging.getLogger(__name__)


def write_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a partial file (fsync, then rename)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def set_aside(path: Path, why: str, suffix: str = "corrupt") -> Path:
    """Move an unusable file to ``<name>.<suffix>`` (kept for a post-mortem) and say so in one line."""
    moved = path.with_name(f"{path.name}.{suffix}")
    os.replace(path, moved)
    log.info(f"{path.parent.name}/{path.name} {why}: moved aside to {moved.name}")
    return moved


def read_json(path: Path | str) -> Optional[Any]:
    """The JSON in ``path``; None if there is no file, or if it cannot be read (then it is set aside)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        set_aside(path, f"is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
        return None


class RunBusy(Exception):
    """Another live process is training this run."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Own ``run_dir`` for the block: ``RunBusy`` (naming the holder) if another live process owns it."""
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunBusy(holder) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def disk_full(exc: Optional[BaseException]) -> Optional[OSError]:
    """The no-space (or quota) error somewhere in ``exc``'s chain, if that is what it is."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class DiskFull(UserError):
    """No space left while a run was writing: one line naming the run and the file."""
