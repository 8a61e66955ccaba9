"""Errors a user fixes (a typo, a missing dataset, an unstable step size): library code raises them, and the entry
points (``python -m pcsweep``, the sweeper, ``pcsweep.report``) turn them into one line and exit status 2."""

from __future__ import annotations

import io
import sys
from typing import NoReturn


class UserError(Exception):
    """A problem with the user's input, reported in one line with no traceback, before any work starts."""


def exit_with(message: str, prog: str = "pcsweep") -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# Hydra reports a bad command line (an unknown key, a value of the wrong type) in several lines, with a hint about
# HYDRA_FULL_ERROR; pcsweep's rule is one line. Until Hydra hands over to pcsweep (a sweeper's setup, or the task
# function), what goes to stderr is held; if Hydra exits with its report instead, the report becomes one line.
_held: list = []  # [the real stderr, the buffer] while held
_DETAIL = (
    "To append to your config",
    "full_key:",
    "object_type=",
    "reference_type=",
    "See https://hydra.cc",
    "Set the environment variable HYDRA_FULL_ERROR",
)


def hold_stderr() -> None:
    if not _held:
        _held.extend([sys.stderr, io.StringIO()])
        sys.stderr = _held[1]


def _stop_holding() -> str:
    """The real stderr back; returns what was held."""
    if not _held:
        return ""
    real, buffer = _held
    _held.clear()
    sys.stderr = real
    return buffer.getvalue()


def release_stderr() -> None:
    """Stop holding stderr, writing out what was held."""
    sys.stderr.write(_stop_holding())


def one_line(report: str) -> str:
    """Hydra's error report, condensed: its message lines without the hints, a group's options as a list
    (argparse's own one-line error, for an option Hydra does not know, as it is)."""
    usage_errors = [line for line in report.splitlines() if ": error: " in line]
    if usage_errors:
        return usage_errors[-1].split(": error: ", 1)[1]
    kept: list[str] = []
    options: list[str] = []
    for line in report.splitlines():
        if line.startswith("Config search path:"):
            break
        if line.startswith("\t") and kept and kept[-1].startswith("Available options"):
            options.append(line.strip())
        elif line.strip() and not line.strip().startswith(_DETAIL) and "Warning" not in line:
            kept.append(line.strip().rstrip(".:"))
    text = "; ".join(kept)
    return f"{text}: {', '.join(options)}" if options else text


def run_with_one_line_errors(entry) -> None:
    """Run a Hydra entry point (``hydra.main``'s function) so that a bad command line is one line, exit status 2."""
    hold_stderr()
    try:
        entry()
    except SystemExit as exc:
        if _held and exc.code not in (0, None):
            exit_with(one_line(_stop_holding()) or f"exit status {exc.code}")
        raise
    finally:
        release_stderr()
