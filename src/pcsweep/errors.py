"""Errors a user fixes (a typo, a missing dataset, an unstable step size): library code raises them, and the entry
points (``python -m pcsweep``, the sweeper, ``pcsweep.report``) turn them into one line and exit status 2."""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """A problem with the user's input, reported in one line with no traceback, before any work starts."""


def exit_with(message: str, prog: str = "pcsweep") -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
