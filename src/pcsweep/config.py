"""What a run is, from its config: validation, the paper's name, the identity hash, duplicates.

A run's folder is ``<paper name>_<dataset>-<hash>``: the hash covers everything that changes the numbers (not paths,
logging or launching), so the same config always lands in the same folder (dedup and resume come for free), and two
configs that differ in anything that matters never share one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pcsweep.data import DATASETS
from pcsweep.mlp import INITS
from pcsweep.pc import ACTIVATIONS, OUTPUT_LOSSES

# Top-level keys that never change a run's numbers: left out of its identity.
NOT_IDENTITY = ("hydra", "sweep_name", "learning_rates",  # the lr in force is optimizer.lr "trainer.progress_bar", "trainer.log_every_n_steps", "trainer.gpu_slots",
                "dataset.data_dir",
                "dataset.download", "dataset.mirrors", "logger", "tracking", "report")


class ConfigError(ValueError):
    """An invalid setting, reported in one line before any work starts."""


def _positive(cfg: DictConfig, key: str, minimum: float = 0, strict: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` with a one-line message for the first invalid setting."""
    _positive(cfg, "width")
    _positive(cfg, "depth", 1, strict=False)
    _positive(cfg, "batch_size")
    _positive(cfg, "epochs", 1, strict=False)
    _positive(cfg, "optimizer.lr")
    _positive(cfg, "weight_decay", 0, strict=False)
    _positive(cfg, "variance_weight_decay", 0, strict=False)
    _positive(cfg, "variance_floor_every", 0, strict=False)
    if cfg.activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {cfg.activation!r}")
    if cfg.output_loss not in OUTPUT_LOSSES:
        raise ConfigError(f"output_loss must be one of {list(OUTPUT_LOSSES)}, got {cfg.output_loss!r}")
    if cfg.init not in INITS:
        raise ConfigError(f"init must be one of {list(INITS)}, got {cfg.init!r}")
    if cfg.dataset.name not in DATASETS:
        raise ConfigError(f"dataset.name must be one of {list(DATASETS)}, got {cfg.dataset.name!r}")
    if cfg.algo.name == "pc":
        _positive(cfg, "inference.steps", 1, strict=False)
        _positive(cfg, "inference.step_size")
        _positive(cfg, "inference.check_every", 1, strict=False)
        if cfg.inference.tolerance is not None:
            _positive(cfg, "inference.tolerance")
        k, steps = cfg.relax.update_every, cfg.inference.steps
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= steps):
            raise ConfigError(f"relax.update_every must be null or in [1, inference.steps={steps}], got {k!r}")
        floor = cfg.relax.log_variance_min
        if floor != "auto" and not (isinstance(floor, (int, float)) and not isinstance(floor, bool)):
            raise ConfigError(f"relax.log_variance_min must be auto or a number, got {floor!r}")
        momentum = cfg.inference.momentum
        if not (isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0 <= momentum < 1):
            raise ConfigError(f"inference.momentum must be in [0, 1), got {momentum!r}")
        if cfg.relax.variance not in ("fixed", "neuron", "layer"):
            raise ConfigError(f"relax.variance must be fixed, neuron or layer, got {cfg.relax.variance!r}")


def is_bp_duplicate(cfg: DictConfig) -> bool:
    """BP has no conditions to relax: ``algo=bp relax=2`` trains exactly what ``algo=bp relax=none`` trains."""
    return cfg.algo.name == "bp" and str(cfg.relax.name) != "none"


def paper_name(cfg: DictConfig) -> str:
    """``algo_width_depth[_rcX]`` as in the paper: bp_1024_8, pc_256_8_rc2."""
    name = f"{cfg.algo.name}_{cfg.width}_{cfg.depth}"
    if cfg.algo.name == "pc" and str(cfg.relax.name) != "none":
        name += f"_rc{cfg.relax.name}"
    return name


def twin_name(cfg: DictConfig) -> str:
    """The twin without its size: bp, pc, pc_rc2, pc_rc3, pc_rc23 (the W&B job type)."""
    if cfg.algo.name == "pc" and str(cfg.relax.name) != "none":
        return f"pc_rc{cfg.relax.name}"
    return str(cfg.algo.name)


def _drop(container: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = container
    for key in parents:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    node.pop(leaf, None)


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings that determine a run's numbers."""
    keys = [k for k in cfg.keys() if k != "hydra" and k != "sweep_name"]
    if cfg.algo.name == "bp":
        keys = [k for k in keys if k not in ("relax", "inference")]
    container = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}
    for dotted in NOT_IDENTITY:
        _drop(container, dotted)
    return container


def config_hash(cfg: DictConfig, length: int = 8) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


def run_dir_name(cfg: DictConfig) -> str:
    return f"{paper_name(cfg)}_{cfg.dataset.name}-{config_hash(cfg)}"


def duplicate_target(cfg: DictConfig) -> Optional[str]:
    """For a BP duplicate, the name of the run that it duplicates."""
    if not is_bp_duplicate(cfg):
        return None
    return f"{paper_name(cfg)}_{cfg.dataset.name}"


# Config groups whose option names are numbers (relax=2 means conf/relax/2.yaml). Hydra parses `relax=2` as the integer
# 2 and refuses it as a group choice, so such values are quoted before Hydra sees them.
NUMERIC_CHOICE_GROUPS = ("relax",)


def quote_numeric_choices(override: str) -> str:
    """``relax=none,2,23`` -> ``relax=none,'2','23'``; anything else is returned unchanged."""
    key, sep, value = override.partition("=")
    if not sep or key.lstrip("+~") not in NUMERIC_CHOICE_GROUPS:
        return override
    items = [f"'{item}'" if item.strip().isdigit() else item for item in value.split(",")]
    return f"{key}={','.join(items)}"


def register_resolvers() -> None:
    """``${pcsweep.run_dir:}`` names a run's folder from the whole config (used by hydra.run/sweep dirs);
    ``${pcsweep.gpu_count:}`` counts the local GPUs (launcher=gpus)."""
    if not OmegaConf.has_resolver("pcsweep.run_dir"):
        OmegaConf.register_new_resolver("pcsweep.run_dir", lambda *, _root_: run_dir_name(_root_))
    if not OmegaConf.has_resolver("pcsweep.gpu_count"):
        OmegaConf.register_new_resolver("pcsweep.gpu_count", gpu_count)


def gpu_count() -> int:
    """Parallel jobs for launcher=gpus: one per visible GPU, at least one."""
    import torch

    return max(1, torch.cuda.device_count())
