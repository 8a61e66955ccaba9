"""How a setting is declared (``setting``: its default and identity role) and checked (one line, before any work:
``ConfigError``)."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, TypeGuard

from pcsweep.config.errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid setting, reported in one line before any work starts."""


def setting(default: Any = None, *, identity: Any = True, factory: Any = None) -> Any:
    """A field with its identity role (True: part of a run's identity; False: never; "pc": for PC twins only)."""
    metadata = {"identity": identity}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(key: str, value: Any, choices) -> None:
    check(value in choices, key, f"one of {sorted(choices)}", value)
