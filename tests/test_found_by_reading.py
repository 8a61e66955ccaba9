"""Latent bugs found by reading the code (the house, step 2): each test fails on the code before its fix."""

import inspect
from types import SimpleNamespace

from helpers import compose_settings


def test_where_a_run_trains_is_not_part_of_what_it_is():
    from pcsweep.config.compose import config_hash

    assert config_hash(compose_settings("trainer.accelerator=cpu")) == config_hash(
        compose_settings()
    )  # one folder for auto and cpu
    assert config_hash(compose_settings("trainer.precision=64-true")) != config_hash(
        compose_settings()
    )  # the numbers differ


def test_with_a_cross_entropy_output_every_variance_is_a_hidden_one():
    """make_log_variances gives a ce network no output variance: the last entry is the last hidden layer."""
    from pcsweep.track.verdicts import run_checks

    layers = [{"mean": -0.1, "std": 0.1, "min": -0.2, "max": 0.0, "at_floor": f} for f in (1.0, 0.0)]
    conditions = SimpleNamespace(
        records=[
            {
                "epoch": 0,
                "condition2": {"gap": 0.01, "cosine": [0.99]},
                "stiffness": 1.0,
                "variance": layers,
                "log_variance_min": -0.5,
            }
        ]
    )
    stability = {"stiffness": 1.0, "limit": 3.9, "lambda_max": 10.0, "log_variance_min": -0.5, "step_size": 0.1}
    summary = {"num_classes": 10, "final_test_acc": 0.9, "history": []}
    ce = run_checks(compose_settings("algo=pc", "relax=3", "output_loss=ce"), summary, conditions.records, stability)
    mse = run_checks(compose_settings("algo=pc", "relax=3"), summary, conditions.records, stability)
    assert ce["variance"]["hidden_at_floor"] == 0.5  # both entries are hidden layers
    assert mse["variance"]["hidden_at_floor"] == 1.0  # the last entry is the output's


def test_claims_json_is_written_atomically(tmp_path, monkeypatch):
    from pcsweep import report
    from pcsweep.report import claims_facts

    written = []
    monkeypatch.setattr(
        claims_facts, "write_atomic", lambda path, text: written.append(path.name) or path.write_text(text)
    )
    report.write_claims(report.Sweep(tmp_path, []), tmp_path, report.ClaimRules(), {})
    assert written == ["claims.json"] and (tmp_path / "claims.json").is_file()


def test_the_mid_epoch_checkpoint_interval_has_one_default():
    from pcsweep.run.interruption import MidEpochCheckpoints

    assert inspect.signature(MidEpochCheckpoints).parameters["every_minutes"].default is inspect.Parameter.empty
    assert compose_settings().checkpoint.every_minutes == 5.0  # the setting states it


def test_a_preset_overrides_the_twin_defaults(tmp_path):
    """conf/config.yaml listed the twin files after the presets, so a twin file silently replaced a preset's values."""
    from helpers import pcsweep

    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ninference:\n  momentum: 0.5\nlearning_rates:\n  adam: 0.002\n"
    )
    result = pcsweep(tmp_path, "--cfg", "job", "experiment=mine", "algo=pc", "relax=2")
    assert result.returncode == 0, result.stderr
    assert "momentum: 0.5" in result.stdout and "adam: 0.002" in result.stdout  # pc_rc2.yaml says 0.0 and 1e-4
