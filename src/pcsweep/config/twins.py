"""The five twins: one name each, chosen by ``algo`` and ``relax`` (the paper's terms, typed settings like any
other), each with its own defaults in ``conf/twin/<name>.yaml``.

A twin's defaults sit under everything a user writes: ``pcsweep.config.compose`` makes every key a twin file sets an
interpolation ``${pcsweep.twin:<key>}`` in the composed config, so a preset (``experiment=...``) or the command line
replaces it with a value, and otherwise it resolves to the chosen twin's value (or the schema's default when the twin
does not set the key). No config group is chosen by a number, so Hydra's parser needs no help: ``relax=2`` is the
setting ``relax`` given the value 2, read as the string ``"2"``.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from omegaconf import OmegaConf

ALGOS = ("bp", "pc")
RELAXATIONS = ("none", "2", "3", "23")  # which of the paper's conditions 2 and 3 PC relaxes
TWINS = ("bp", "pc", "pc_rc2", "pc_rc3", "pc_rc23")


def twin_name(algo: str, relax: Any) -> str:
    """bp, pc, pc_rc2, pc_rc3, pc_rc23: BP has no conditions to relax, so every ``relax`` of bp is bp."""
    if algo == "bp" or str(relax) == "none":
        return str(algo)
    return f"pc_rc{relax}"


def is_bp_duplicate(algo: str, relax: Any) -> bool:
    """``algo=bp relax=2`` trains exactly what ``algo=bp relax=none`` trains."""
    return algo == "bp" and str(relax) != "none"


@functools.cache
def twin_defaults(name: str) -> dict[str, Any]:
    """``conf/twin/<name>.yaml`` flattened to ``{dotted key: value}`` (read once)."""
    text = resources.files("pcsweep.conf").joinpath("twin").joinpath(f"{name}.yaml").read_text()
    return _flatten(OmegaConf.to_container(OmegaConf.create(text)) or {})  # type: ignore[arg-type]


@functools.cache
def twin_keys() -> tuple[str, ...]:
    """Every key some twin sets: the keys whose default depends on the twin."""
    return tuple(sorted({key for name in TWINS for key in twin_defaults(name)}))


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
