"""What a run is, from its config: the typed settings, the paper's name, the identity hash, duplicates.

A run's folder is ``<paper name>_<dataset>-<hash>``. The hash covers what differs from the defaults of
``pcsweep.config.settings`` (Dora's rule) among the settings that change the numbers (fields marked
``identity=False`` are left out, and PC's settings for BP): the same config always lands in the same folder (dedup
and resume come for free), two configs that differ in anything that matters never share one, and a release that
adds a setting with a default that keeps the old behaviour leaves every finished run where it is.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import inspect
import json
from pathlib import Path
from typing import Any, Optional, cast

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pcsweep.config.errors import UserError, exit_with
from pcsweep.config.settings import SCHEDULER_KEYS, ConfigError, Settings, TrainerSettings, is_number
from pcsweep.config.twins import TWINS, is_bp_duplicate, twin_defaults, twin_keys, twin_name


def paper_name(settings: Settings) -> str:
    """``algo_width_depth[_rcX]`` as in the paper: bp_1024_8, pc_256_8_rc2."""
    return _paper_name(settings.algo, settings.relax, settings.width, settings.depth)


def _paper_name(algo: str, relax: Any, width: int, depth: int) -> str:
    name = f"{algo}_{width}_{depth}"
    return name + (f"_rc{relax}" if algo == "pc" and str(relax) != "none" else "")


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


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value} (an empty mapping is a leaf)."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _role(key: str) -> Any:
    while key not in IDENTITY_ROLES and "." in key:
        key = key.rsplit(".", 1)[0]
    return IDENTITY_ROLES.get(key, True)  # a key no schema declares (an optimizer's option) counts


DEFAULTS = flatten(OmegaConf.to_container(OmegaConf.structured(Settings), resolve=True))


def _twin_default(key: str, *, _root_: DictConfig) -> Any:
    """``${pcsweep.twin:KEY}``: the chosen twin's default for KEY (conf/twin/), else the schema's."""
    twin = twin_name(_root_.algo, _root_.relax)  # an unknown one is refused by the settings' check, in one line
    return (twin_defaults(twin) if twin in TWINS else {}).get(key, DEFAULTS[key])


def _schema() -> DictConfig:
    """The typed settings Hydra composes ``conf/`` onto, each key a twin sets being ``${pcsweep.twin:KEY}``: a preset
    or the command line replaces the interpolation with a value, else it resolves to the twin's default."""
    schema = OmegaConf.structured(Settings)
    OmegaConf.set_struct(schema.trainer, False)  # trainer.NAME=value: any Lightning Trainer argument (settings_from)
    for key in twin_keys():
        OmegaConf.update(schema, key, f"${{pcsweep.twin:{key}}}", merge=False)
    return schema


if not OmegaConf.has_resolver("pcsweep.twin"):
    OmegaConf.register_new_resolver("pcsweep.twin", _twin_default)
ConfigStore.instance().store(name="pcsweep_schema", node=_schema())


# free-form: a torch optimizer's options, the twins' learning rates, claim thresholds, callbacks' arguments
OPEN_SETTINGS = (
    "optimizer.",
    "lr_scheduler.",
    "learning_rates.",
    "report.claims.",
    "callbacks.",
    "logger.",
    "trainer.lightning.",
)


def settings_from(cfg: DictConfig) -> Settings:
    """The composed config as typed settings, every check run once (``ConfigError``: one line, before any work).
    A key the schema does not declare (``+foo=1``, a typo) is an error: it would change the run's identity."""
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [cast(str, k) for k in cfg.keys() if k != "hydra"])
    cfg = _trainer_arguments_apart(cfg)
    unknown = [k for k in flatten(OmegaConf.to_container(cfg)) if k not in DEFAULTS and not k.startswith(OPEN_SETTINGS)]
    if "twin" in cfg:
        raise ConfigError("the twin is chosen by algo and relax (algo=pc relax=2); conf/twin/ holds their defaults")
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a pcsweep setting (`python -m pcsweep --cfg job` lists them)")
    try:
        settings = cast(Settings, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Settings), cfg)))
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    tuned = settings.tune.key
    if tuned is not None and not is_number(setting_value(settings, tuned)):
        raise ConfigError(f"tune.key={tuned} is not a numeric setting of this run (`python -m pcsweep --cfg job`)")
    if settings.trainer.lightning:  # (Lightning, ~2 s to import, only for runs that pass Trainer arguments)
        from pcsweep.run.trainer import check_trainer_arguments

        check_trainer_arguments(settings.trainer.lightning)
    if settings.lr_scheduler is not None:
        node = {k: v for k, v in settings.lr_scheduler.items() if k not in SCHEDULER_KEYS}
        check_target("lr_scheduler", node)
        check_monitor("lr_scheduler.monitor", settings.lr_scheduler.get("monitor"), settings)
        frequency = settings.lr_scheduler.get("frequency", 1)
        if not (isinstance(frequency, int) and not isinstance(frequency, bool) and frequency >= 1):
            raise ConfigError(f"lr_scheduler.frequency must be a whole number >= 1, got {frequency!r}")
    for name, node in settings.logger.items():
        check_target(f"logger.{name}", node)
    for name, node in settings.callbacks.items():
        check_target(f"callbacks.{name}", node)
        check_monitor(f"callbacks.{name}.monitor", node.get("monitor"), settings)
    return settings


def check_monitor(key: str, monitored: Any, settings: Settings) -> None:
    """What a callback or scheduler watches must be logged by the run, and never a test metric: the test split
    reports, it never decides (one line before any work)."""
    if monitored is None:
        return
    if str(monitored).startswith("test/"):
        raise ConfigError(
            f"{key}={monitored} would let the test split decide: monitor val/acc or val/loss "
            "(with dataset.val_fraction > 0), or a train/ metric"
        )
    if monitored not in monitorable(settings):
        raise ConfigError(f"{key}={monitored} is not logged by this run; one of: {', '.join(monitorable(settings))}")


def _trainer_arguments_apart(cfg: DictConfig) -> DictConfig:
    """``trainer.NAME`` keys that are not pcsweep's own trainer settings, moved into ``trainer.lightning``."""
    own = {f.name for f in dataclasses.fields(TrainerSettings)}
    extra = [k for k in cfg.get("trainer", {}) if k not in own]
    if not extra:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in extra:
            cfg.trainer.setdefault("lightning", {})
            cfg.trainer.lightning[key] = cfg.trainer.pop(key)
    return cfg


def setting_value(settings: Settings, key: str) -> Any:
    """The value of the dotted ``key`` (``optimizer.lr``), or None when the settings have no such key."""
    return flatten(dataclasses.asdict(settings)).get(key)


def monitorable(settings: Settings) -> list[str]:
    """What a callback or scheduler can monitor: logged once per epoch by every run (val/* with a validation split),
    never the test split's metrics."""
    val = ["val/acc", "val/loss"] if settings.dataset.val_fraction > 0 else []
    return val + ["train/loss", "train/acc"]


def locate(dotted: str) -> Any:
    """The object at ``package.module.Name`` (as Hydra's ``_target_`` finds it), or None, quietly."""

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
    """Settings from a plain mapping (a checkpoint's hyperparameters, a stored config of this or the previous
    layout), checked as ``settings_from``."""
    return settings_from(OmegaConf.create(upgrade_layout(container)))


def _plain(config: Any) -> dict:
    """A stored or composed config as a plain resolved mapping without Hydra's node, in the current layout."""
    if isinstance(config, Settings):
        return dataclasses.asdict(config)
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(
            OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True
        )
    return upgrade_layout({k: v for k, v in config.items() if k != "hydra"})


# settings a stored config may hold that are gone: condition 2's energy-gap and cosine limits (judged on the weight
# update's error since, tracking.condition2_max_update_error; the gap and cosine are still reported)
RETIRED_TRACKING = ("condition2_max_gap", "condition2_min_cosine")


def upgrade_layout(config: dict) -> dict:
    """A config of the layout before ``algo`` and ``relax`` were plain settings (``algo.name``, ``relax.name``,
    ``relax.update_every``, ``relax.variance``, ``relax.log_variance_min``) in today's: old run folders keep their
    identity, so a re-run adopts them (``find_previous_folder``)."""
    config = dict(config)
    if isinstance(config.get("algo"), dict):
        config["algo"] = config["algo"].get("name", "pc")
    if isinstance(config.get("relax"), dict):
        relax = dict(config["relax"])
        config["relax"] = str(relax.pop("name", "none"))
        config["inference"] = {**config.get("inference", {}), "update_every": relax.get("update_every")}
        config["variance"] = relax.get("variance", "fixed")
        config["log_variance_min"] = relax.get("log_variance_min", "auto")
    if isinstance(config.get("tracking"), dict):  # condition 2 is judged on the update error since (never identity)
        config["tracking"] = {k: v for k, v in config["tracking"].items() if k not in RETIRED_TRACKING}
    return config


def identity(config: Settings | dict) -> dict[str, Any]:
    """The settings that determine a run's numbers and differ from the defaults, as ``{dotted key: value}``.
    ``config``: a run's settings, or a stored config (a run's ``config.yaml``, a checkpoint's) as a mapping."""
    flat = flatten(_plain(config))
    pc = flat.get("algo") == "pc"
    return {
        k: v
        for k, v in sorted(flat.items())
        if (_role(k) is True or (_role(k) == "pc" and pc)) and (k not in DEFAULTS or DEFAULTS[k] != v)
    }


def config_hash(config: Settings | dict, length: int = 8) -> str:
    blob = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


def find_previous_folder(sweep_dir: Path, settings: Settings) -> Optional[Path]:
    """A folder of this run under an earlier naming (same paper name and dataset, same identity read from its
    ``config.yaml``), or None: the caller renames it, so a re-run of an old sweep resumes instead of retraining."""
    wanted, name = config_hash(settings), run_dir_name(settings)
    for folder in sorted(Path(sweep_dir).glob(f"{paper_name(settings)}_{settings.dataset.name}-*")):
        if folder.name != name and (folder / "config.yaml").is_file():
            try:
                if config_hash(cast(dict, OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")))) == wanted:
                    return folder
            except Exception:  # an unreadable old config is not this run
                continue
    return None


def run_dir_name(settings: Settings) -> str:
    return f"{paper_name(settings)}_{settings.dataset.name}-{config_hash(settings)}"


def _run_dir_of(*, _root_: DictConfig) -> str:
    """``${pcsweep.run_dir:}``: ``run_dir_name`` of the composed config (checked: a bad setting stops a single run
    here, in one line, before Hydra makes its folder: a resolver's exception would be a traceback)."""
    try:
        return run_dir_name(settings_from(_root_))
    except UserError as exc:
        exit_with(str(exc))


def duplicate_target(settings: Settings) -> Optional[str]:
    """For a BP duplicate, the name of the run that it duplicates."""
    if not is_bp_duplicate(settings.algo, settings.relax):
        return None
    return f"{paper_name(settings)}_{settings.dataset.name}"


def register_resolvers() -> None:
    """``${pcsweep.run_dir:}`` names a run's folder from the whole config (used by hydra.run/sweep dirs);
    ``${pcsweep.gpu_count:}`` counts the local GPUs (launcher=gpus)."""
    if not OmegaConf.has_resolver("pcsweep.run_dir"):
        OmegaConf.register_new_resolver("pcsweep.run_dir", _run_dir_of)
    if not OmegaConf.has_resolver("pcsweep.gpu_count"):
        OmegaConf.register_new_resolver("pcsweep.gpu_count", gpu_count)


def gpu_count() -> int:
    """Parallel jobs for launcher=gpus: one per visible GPU, at least one."""
    return max(1, torch.cuda.device_count())


def family_name(settings: Settings) -> str:
    """The run's identity without its seed, ``<paper name>_<dataset>-<hash>``: the runs of one family are seeds of
    one experiment (their W&B group; ``report.Run.family`` is the same hash)."""
    return f"{paper_name(settings)}_{settings.dataset.name}-{config_hash(unseeded(settings))}"


def unseeded(config: Settings | dict) -> dict:
    """The config as a mapping, without its seed: what the runs of one family share."""
    return {k: v for k, v in _plain(config).items() if k != "seed"}
