"""What a run is, from its config: the typed settings, the paper's name, the identity hash, duplicates.

A run's folder is ``<paper name>_<dataset>-<hash>``. The hash covers what differs from the defaults of
``pcsweep.settings`` (Dora's rule) among the settings that change the numbers (fields marked ``identity=False`` are
left out, and PC's settings for BP): the same config always lands in the same folder (dedup and resume come for
free), two configs that differ in anything that matters never share one, and a release that adds a setting with
a default that keeps the old behaviour leaves every finished run where it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, cast

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pcsweep.settings import ConfigError, Settings, is_number

ConfigStore.instance().store(name="pcsweep_schema", node=Settings)


def is_bp_duplicate(cfg: DictConfig | Settings) -> bool:
    """BP has no conditions to relax: ``algo=bp relax=2`` trains exactly what ``algo=bp relax=none`` trains."""
    return cfg.algo.name == "bp" and str(cfg.relax.name) != "none"


def paper_name(cfg: DictConfig | Settings) -> str:
    """``algo_width_depth[_rcX]`` as in the paper: bp_1024_8, pc_256_8_rc2."""
    name = f"{cfg.algo.name}_{cfg.width}_{cfg.depth}"
    if cfg.algo.name == "pc" and str(cfg.relax.name) != "none":
        name += f"_rc{cfg.relax.name}"
    return name


def twin_name(cfg: DictConfig | Settings) -> str:
    """The twin without its size: bp, pc, pc_rc2, pc_rc3, pc_rc23 (the W&B job type)."""
    if cfg.algo.name == "pc" and str(cfg.relax.name) != "none":
        return f"pc_rc{cfg.relax.name}"
    return str(cfg.algo.name)


def _identity_roles(schema: type, prefix: str = "") -> dict[str, Any]:
    """dotted key -> its identity role, for every field (and nested field) of a settings dataclass."""
    roles = {}
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        roles[key] = f.metadata.get("identity", True)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            roles.update(
                {k: roles[key] if v is True else v for k, v in _identity_roles(type(default), key + ".").items()}
            )
    return roles


IDENTITY_ROLES = _identity_roles(Settings)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _role(key: str) -> Any:
    while key not in IDENTITY_ROLES and "." in key:
        key = key.rsplit(".", 1)[0]
    return IDENTITY_ROLES.get(key, True)  # a key no schema declares (an optimizer's option) counts


DEFAULTS = _flatten(OmegaConf.to_container(OmegaConf.structured(Settings), resolve=True))


# free-form: a torch optimizer's options, the twins' learning rates, claim thresholds, callbacks' arguments
OPEN_SETTINGS = ("optimizer.", "learning_rates.", "report.claims.", "callbacks.", "logger.")


def settings_from(cfg: DictConfig) -> Settings:
    """The composed config as typed settings, every check run once (``ConfigError``: one line, before any work).
    A key the schema does not declare (``+foo=1``, a typo) is an error: it would change the run's identity."""
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [cast(str, k) for k in cfg.keys() if k != "hydra"])
    unknown = [
        k for k in _flatten(OmegaConf.to_container(cfg)) if k not in DEFAULTS and not k.startswith(OPEN_SETTINGS)
    ]
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a pcsweep setting (`python -m pcsweep --cfg job` lists them)")
    try:
        settings = cast(Settings, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Settings), cfg)))
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    tuned = settings.tune.key
    if tuned is not None and not is_number(OmegaConf.select(cfg, tuned, default=None)):
        raise ConfigError(f"tune.key={tuned} is not a numeric setting of this run (`python -m pcsweep --cfg job`)")
    for name, node in settings.logger.items():
        check_target(f"logger.{name}", node)
    for name, node in settings.callbacks.items():
        check_target(f"callbacks.{name}", node)
        monitored = node.get("monitor")
        if monitored is not None and monitored not in monitorable(settings):
            raise ConfigError(
                f"callbacks.{name}.monitor={monitored} is not logged by this run; one of: "
                f"{', '.join(monitorable(settings))}"
            )
    return settings


def monitorable(settings: Settings) -> list[str]:
    """What a callback can monitor: logged once per epoch by every run (val/* with a validation split)."""
    val = ["val/acc", "val/loss"] if settings.dataset.val_fraction > 0 else []
    return val + ["test/acc", "test/loss", "train/loss", "train/acc"]


def locate(dotted: str) -> Any:
    """The object at ``package.module.Name`` (as Hydra's ``_target_`` finds it), or None, quietly."""
    import importlib

    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                found = getattr(found, name)
        except AttributeError:
            return None
        return found
    return None


def check_target(key: str, node: Any) -> None:
    """A ``_target_`` node that cannot be built is one line before any work: the class must import and take the
    node's arguments."""
    import inspect

    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str):
        raise ConfigError(f"{key} needs a _target_ (the class to instantiate), got {node!r}")
    factory = locate(target)
    if factory is None:
        raise ConfigError(f"{key}._target_={target} cannot be imported")
    try:
        inspect.signature(factory).bind_partial(**{k: v for k, v in node.items() if not k.startswith("_")})
    except TypeError as exc:
        raise ConfigError(f"{key}: {target} {exc}") from None
    except ValueError:  # no signature to check (a builtin): instantiate will say
        pass


def settings_from_container(container: dict) -> Settings:
    """Settings from a plain mapping (a checkpoint's hyperparameters, a stored config), checked as ``settings_from``."""
    return settings_from(OmegaConf.create(container))


def identity(config: Any) -> dict[str, Any]:
    """The settings that determine a run's numbers and differ from the defaults, as ``{dotted key: value}``.
    ``config``: a composed config or a resolved one read back from a run's ``config.yaml``."""
    if OmegaConf.is_config(config):  # without hydra's node: its run dir is named from this identity
        config = OmegaConf.to_container(
            OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True
        )
    flat = _flatten({k: v for k, v in config.items() if k != "hydra"})
    pc = flat.get("algo.name") == "pc"
    return {
        k: v
        for k, v in sorted(flat.items())
        if (_role(k) is True or (_role(k) == "pc" and pc)) and (k not in DEFAULTS or DEFAULTS[k] != v)
    }


def config_hash(config: Any, length: int = 8) -> str:
    blob = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


def find_previous_folder(sweep_dir: Path, cfg: DictConfig) -> Optional[Path]:
    """A folder of this run under an earlier naming (same paper name and dataset, same identity read from its
    ``config.yaml``), or None: the caller renames it, so a re-run of an old sweep resumes instead of retraining."""
    wanted, name = config_hash(cfg), run_dir_name(cfg)
    for folder in sorted(Path(sweep_dir).glob(f"{paper_name(cfg)}_{cfg.dataset.name}-*")):
        if folder.name != name and (folder / "config.yaml").is_file():
            try:
                if config_hash(OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))) == wanted:
                    return folder
            except Exception:  # an unreadable old config is not this run
                continue
    return None


def run_dir_name(cfg: DictConfig) -> str:
    return f"{paper_name(cfg)}_{cfg.dataset.name}-{config_hash(cfg)}"


def duplicate_target(cfg: DictConfig | Settings) -> Optional[str]:
    """For a BP duplicate, the name of the run that it duplicates."""
    if not is_bp_duplicate(cfg):
        return None
    return f"{paper_name(cfg)}_{cfg.dataset.name}"


# Config groups whose option names are numbers (relax=2 means conf/relax/2.yaml).
NUMERIC_CHOICE_GROUPS = ("relax",)


def _choice_name(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def accept_numeric_choices() -> None:
    """Hydra's override grammar reads ``relax=2`` as the integer 2 and refuses an integer as a config group's choice
    (Hydra has no option for this). A choice is a name: this makes Hydra's parser read a number given to a group of
    ``NUMERIC_CHOICE_GROUPS`` as the name it is, wherever overrides are parsed (the command line, every sweeper and
    launcher, the compose API), so ``relax=2`` and ``relax=none,2,3,23`` need no quoting from any entry point.
    Installed when this module is imported (every pcsweep entry point imports it); idempotent."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    parse = OverridesParser.parse_overrides
    if getattr(parse, "accepts_numeric_choices", False):
        return

    def parse_overrides(self: OverridesParser, overrides: list) -> list:
        parsed = parse(self, overrides)
        for override in parsed:
            if override.key_or_group not in NUMERIC_CHOICE_GROUPS:
                continue
            if isinstance(override._value, ChoiceSweep):
                override._value.list = [_choice_name(v) for v in override._value.list]
            else:
                override._value = _choice_name(override._value)
        return parsed

    parse_overrides.accepts_numeric_choices = True  # type: ignore[attr-defined]
    OverridesParser.parse_overrides = parse_overrides  # type: ignore[method-assign]


accept_numeric_choices()


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


def family_name(config: Any) -> str:
    """The run's identity without its seed, ``<paper name>_<dataset>-<hash>``: the runs of one family are seeds of
    one experiment (their W&B group; ``report.Run.family`` is the same hash). ``config``: as for ``identity``."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(
            OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True
        )
    unseeded = {k: v for k, v in config.items() if k != "seed"}
    return f"{paper_name(OmegaConf.create(unseeded))}_{unseeded['dataset']['name']}-{config_hash(unseeded)}"
