"""A run's identity: what differs from the typed defaults, among the settings that change its numbers."""

import json

import pytest
from omegaconf import OmegaConf

from helpers import SMALL, compose, compose_settings, pcsweep
from pcsweep.config import compose as config
from pcsweep.config.settings import ConfigError


def container(*overrides):
    cfg = compose(*overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_identity_is_the_difference_from_the_defaults():
    ident = config.identity(compose_settings("algo=pc", "relax=2", "width=64"))
    assert ident["width"] == 64 and ident["inference.update_every"] == 8 and ident["optimizer.lr"] == 1e-4
    assert "depth" not in ident and "seed" not in ident  # at their defaults
    assert not any(k.startswith(("tracking.", "logger.", "report.", "learning_rates", "sweep_name")) for k in ident)


def test_a_setting_added_later_with_a_default_keeps_every_old_run_where_it_is(monkeypatch):
    """A release adds a key with a default that keeps the old behaviour: a stored config without it hashes the same,
    and so does a new one with it."""
    old = container("algo=pc", "relax=3", "width=24")
    new = json.loads(json.dumps(old))
    new["inference"]["new_option"] = 0.5
    monkeypatch.setitem(config.DEFAULTS, "inference.new_option", 0.5)
    assert config.config_hash(old) == config.config_hash(new)
    new["inference"]["new_option"] = 0.25  # ... and a run that sets it differently is another run
    assert config.config_hash(old) != config.config_hash(new)
    # keys an old release did not have at all (the dataset fields of the schema) do not count either
    del old["dataset"]["train_size"], old["dataset"]["mirrors"], old["inference"]["auto_stiffness"]
    assert config.config_hash(old) == config.config_hash(container("algo=pc", "relax=3", "width=24"))


@pytest.mark.parametrize(
    "change,same",
    [
        ("tracking.evals_per_epoch=3", True),
        ("logger=csv", True),
        ("report.resolution=5", True),
        ("sweep_name=other", True),
        ("trainer.progress_bar=true", True),
        ("width=24", False),
        ("seed=1", False),
        ("inference.steps=8", False),
        ("optimizer=sgd", False),
    ],
)
def test_only_settings_that_change_the_numbers_change_the_folder(change, same):
    base = config.config_hash(compose_settings("algo=pc"))
    assert (config.config_hash(compose_settings("algo=pc", change)) == base) is same


def test_pc_settings_are_not_part_of_a_bp_run():
    assert config.config_hash(compose_settings("algo=bp", "inference.steps=8")) == config.config_hash(
        compose_settings("algo=bp")
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("width=0", "width must be >= 1, got 0"),
        ("inference.momentum=1.5", "inference.momentum must be in [0, 1), got 1.5"),
        ("variance=diagonal", "variance must be one of"),
        ("inference.update_every=999", "inference.update_every must be null or in [1, inference.steps=256], got 999"),
        ("+foo=1", "foo is not a pcsweep setting"),
        ("+inference.stepsize=0.2", "inference.stepsize is not a pcsweep setting"),
    ],
)
def test_each_setting_is_checked_once_when_it_becomes_typed(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        compose_settings("algo=pc", override)


@pytest.mark.parametrize("mode", [["-m"], []], ids=["sweep", "single run"])
def test_a_run_folder_of_an_earlier_release_is_found_and_resumed_not_retrained(tmp_path, mode):
    """A finished run whose folder carries an earlier release's hash (its config.yaml written before the typed
    schema added keys, and in the layout where algo and relax were config groups): the sweep (or the single run,
    whose folder Hydra has already made) adopts the folder and skips the run as finished."""
    args = [*SMALL, "algo=pc", "relax=none", "logger=csv", "report.auto=false", "sweep_name=s"]
    settings = container(*args)
    for key in ("data_dir", "download", "mirrors", "train_size", "test_size", "seed"):
        settings["dataset"].pop(key)  # the digits config as an earlier release wrote it ...
    settings["algo"] = {"name": settings["algo"]}  # ... when algo and relax were config groups
    settings["relax"] = {"name": "none", "update_every": settings["inference"].pop("update_every")}
    settings["relax"].update(variance=settings.pop("variance"), log_variance_min=settings.pop("log_variance_min"))
    old = tmp_path / "multirun" / "s" / "pc_24_3_digits-0123abcd"
    old.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(settings), old / "config.yaml")
    (old / "summary.json").write_text(json.dumps({"status": "complete", "name": "pc_24_3", "dataset": "digits"}))
    result = pcsweep(tmp_path, *mode, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    new_name = config.run_dir_name(compose_settings(*args))
    assert "holds this run under an earlier folder name: renamed to " + new_name in result.stdout
    assert "already complete" in result.stdout and "[pcsweep] training" not in result.stdout
    assert (tmp_path / "multirun" / "s" / new_name / "summary.json").is_file() and not old.exists()


@pytest.mark.parametrize("mode", [["-m"], []], ids=["sweep", "single run"])
def test_a_folder_from_before_a_default_changed_is_set_aside_not_taken_for_this_run(tmp_path, mode):
    """A finished run at this run's folder name, trained when a default differed (the paper's step size 0.1 before
    inference.step_size=auto): its name hashed the same difference from the defaults of its day, but it is not this
    run. It is moved to ``<name>.other-<its hash>`` and this run trains; asking for its settings finds it again."""
    args = [*SMALL, "algo=pc", "relax=none", "logger=csv", "report.auto=false", "sweep_name=s"]
    name = config.run_dir_name(compose_settings(*args))
    settings = container(*args)
    settings["inference"]["step_size"] = 0.1  # the default of its day
    old = tmp_path / "multirun" / "s" / name
    old.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(settings), old / "config.yaml")
    (old / "summary.json").write_text(json.dumps({"status": "complete", "name": "pc_24_3", "dataset": "digits"}))
    result = pcsweep(tmp_path, *mode, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    aside = tmp_path / "multirun" / "s" / f"{name}.other-{config.config_hash(settings)}"
    assert f"moved to {aside.name}" in result.stdout and "[pcsweep] training" in result.stdout
    assert (aside / "summary.json").is_file() and (aside / "config.yaml").is_file()
    summary = json.loads((old / "summary.json").read_text())
    assert summary["config"]["inference"]["step_size"] == "auto" and summary["epochs"] >= 1
    again = pcsweep(tmp_path, *mode, *args, "inference.step_size=0.1")
    assert "holds this run under an earlier folder name" in again.stdout and "already complete" in again.stdout
