"""``trainer.*`` is Lightning's Trainer, and ``lr_scheduler`` feeds Lightning's configure_optimizers (both twins)."""

import csv

import pytest
import torch

from helpers import SMALL, compose_settings, pcsweep
from pcsweep.config.settings import ConfigError
from pcsweep.run.trainer import trainer_arguments


def test_any_trainer_argument_is_typed_from_the_command_line_and_pcsweep_keys_win(caplog):
    settings = compose_settings(
        "trainer.limit_train_batches=0.25", "trainer.deterministic=true", "trainer.max_epochs=9"
    )
    assert settings.trainer.lightning == {"limit_train_batches": 0.25, "deterministic": True, "max_epochs": 9}
    assert settings.trainer.accelerator == "auto"  # pcsweep's own trainer settings stay typed fields
    with caplog.at_level("WARNING"):
        passed = trainer_arguments(settings)
    assert passed == {"limit_train_batches": 0.25, "deterministic": True}
    assert "trainer.max_epochs=9 is not used: pcsweep sets it from epochs" in caplog.text


def test_a_trainer_argument_lightning_does_not_take_is_one_line():
    with pytest.raises(ConfigError, match="trainer.max_epoch is neither a pcsweep setting nor an argument"):
        compose_settings("trainer.max_epoch=3")


def test_a_trainer_argument_is_part_of_the_run_identity():
    from pcsweep.config.compose import config_hash

    base = config_hash(compose_settings())
    assert config_hash(compose_settings("trainer.limit_train_batches=0.5")) != base  # fewer batches: other numbers


def batches_trained(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return max(int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")) + 1  # step: the batch index


@pytest.mark.slow
def test_limit_train_batches_reaches_the_trainer(tmp_path):
    """digits at batch size 128: 12 training batches an epoch; limit_train_batches=3 trains 3 (and the run says
    where the epochs came from: epochs, not trainer.max_epochs)."""
    args = [*SMALL, "epochs=1", "algo=bp", "logger=csv", "report.auto=false", "sweep_name=s"]
    result = pcsweep(tmp_path, *args, "trainer.limit_train_batches=3", "trainer.max_epochs=5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainer.max_epochs=5 is not used: pcsweep sets it from epochs" in result.stdout + result.stderr
    (run_dir,) = [d for d in (tmp_path / "multirun" / "s").iterdir() if d.is_dir() and d.name.startswith("bp_")]
    summary = (run_dir / "summary.json").read_text()
    assert '"epochs": 1' in summary
    assert batches_trained(run_dir) == 3


@pytest.mark.parametrize("twin", [["algo=bp"], ["algo=pc", "relax=2"]], ids=["bp", "pc_rc2"])
@pytest.mark.slow
def test_a_learning_rate_schedule_steps_for_both_twins(tmp_path, twin):
    """StepLR halving every epoch: after 2 epochs both twins' optimizers run at a quarter of the initial rate (PC
    trains by manual optimization, which Lightning never steps a scheduler for: the module steps it)."""
    schedule = ["lr_scheduler=step", "lr_scheduler.step_size=1", "lr_scheduler.gamma=0.5", "optimizer.lr=0.001"]
    result = pcsweep(tmp_path, *SMALL, *twin, *schedule, "logger=csv", "report.auto=false", "sweep_name=s")
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = [d for d in (tmp_path / "multirun" / "s").iterdir() if d.is_dir() and "_digits-" in d.name]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = checkpoint["lr_schedulers"]
    assert state["_last_lr"][0] == pytest.approx(0.00025) and state["last_epoch"] == 2
    (optimizer,) = checkpoint["optimizer_states"]
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.00025)


@pytest.mark.parametrize(
    "override,message",
    [
        (["lr_scheduler=step", "lr_scheduler.interval=batch"], "lr_scheduler.interval must be one of"),
        (["lr_scheduler=step", "+lr_scheduler.stepsize=3"], "lr_scheduler: torch.optim.lr_scheduler.StepLR got an"),
    ],
)
def test_a_bad_schedule_is_one_line_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_settings(*override)


def test_the_trainer_is_built_in_one_place_from_defaults_the_users_arguments_and_pcsweeps_own(tmp_path):
    """make_trainer: pcsweep's defaults (no model summary, no sanity pass) give way to the user's trainer.NAME, and
    what pcsweep decides (epochs, its own trainer settings, the checkpoint writer) wins over both."""
    from pcsweep.run.trainer import AtomicCheckpointIO, make_trainer

    settings = compose_settings(
        "epochs=3", "trainer.max_epochs=9", "trainer.num_sanity_val_steps=2", "trainer.log_every_n_steps=5"
    )
    trainer = make_trainer(settings, tmp_path, "cpu", 1, [], [], [])
    assert trainer.max_epochs == 3 and trainer.num_sanity_val_steps == 2 and trainer.log_every_n_steps == 5
    from lightning.pytorch.callbacks import ModelSummary

    assert not any(isinstance(c, ModelSummary) for c in trainer.callbacks)  # pcsweep's default, not overridden
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.default_root_dir == str(tmp_path)
