"""pcsweep the Hydra/Lightning way: numeric choices, one-line command-line errors, callbacks from the command line,
checkpoints that rebuild their module, a validation split, Optuna search per twin, Python logging."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from helpers import compose, compose_settings, pcsweep

TINY = [
    "width=16",
    "depth=2",
    "epochs=2",
    "inference.steps=8",
    "batch_size=128",
    "tracking.chance_margin=-1",
    "report.auto=false",
]

# a study of one twin's learning rate, on the validation split
STUDY = [
    "-m",
    "hydra/sweeper=optuna",
    "algo=pc",
    "relax=2",
    "dataset.val_fraction=0.2",
    *TINY,
    "optimizer.lr=tag(log, interval(1e-4, 3e-2))",
]


def only_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("pcsweep: error: "), result.stderr
    return lines[0][len("pcsweep: error: ") :]


def test_relax_is_a_string_setting_wherever_overrides_are_parsed():
    """relax=2 is the setting relax given "2" (no config group is chosen by a number, so Hydra's parser is as
    shipped): from the compose API, the sweeper's grid and Optuna's fixed parameters alike."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    from hydra_plugins.pcsweep_sweeper import PcsweepSweeper

    assert compose_settings("relax=2").relax == "2" and compose_settings("relax=23").inference.update_every == 8
    assert compose_settings("relax=none").relax == "none" and compose_settings("relax='3'").twin == "pc_rc3"
    sweeper = PcsweepSweeper.__new__(PcsweepSweeper)
    sweeper.also = [{"algo": "pc", "relax": 23}]
    (jobs,) = sweeper.split_arguments(OverridesParser.create().parse_overrides(["relax=none,2"]), None)
    assert jobs == [["relax=none"], ["relax=2"], ["algo=pc", "relax=23"]]
    _, fixed = create_params_from_overrides(["relax=23"])
    assert compose(*[f"{k}={v}" for k, v in fixed.items()]).relax == "23"


@pytest.mark.parametrize(
    "args,message",
    [
        (["algo=xyz"], "algo must be one of ['bp', 'pc'], got 'xyz'"),
        (
            ["dataset=xyz"],
            "In 'config': Could not find 'dataset/xyz'; Available options in 'dataset': digits, digits28, "
            "fashion_mnist, mnist",
        ),
        (
            ["width=1.5"],
            "Error merging override width=1.5; Value '1.5' of type 'float' could not be converted to Integer",
        ),
        (
            ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trialz=3"],
            "Could not override 'hydra.sweeper.n_trialz'; Key 'n_trialz' not in 'PcsweepOptunaConf'",
        ),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["+callbacks.x._target_=nowhere.Callback"], "callbacks.x._target_=nowhere.Callback cannot be imported"),
    ],
)
def test_a_bad_command_line_is_one_line_before_any_work(tmp_path, args, message):
    assert only_error_line(pcsweep(tmp_path, *args)) == message
    assert not list(tmp_path.rglob("metrics.csv"))


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["+callbacks.x._target_=lightning.pytorch.callbacks.EarlyStopping", "+callbacks.x.monitr=val/acc"],
            "callbacks.x: lightning.pytorch.callbacks.EarlyStopping got an unexpected keyword argument 'monitr'",
        ),
        (
            ["callbacks=early_stopping"],
            "callbacks.early_stopping.monitor=val/acc is not logged by this run; one of: train/loss, train/acc",
        ),
        (
            ["callbacks=early_stopping", "callbacks.early_stopping.monitor=test/acc", "dataset.val_fraction=0.1"],
            "callbacks.early_stopping.monitor=test/acc would let the test split decide: monitor val/acc or val/loss",
        ),
        (
            ["lr_scheduler=step", "+lr_scheduler.monitor=test/loss"],
            "lr_scheduler.monitor=test/loss would let the test split decide",
        ),
        (
            ["lr_scheduler=step", "+lr_scheduler.monitor=val/acc"],
            "lr_scheduler.monitor=val/acc is not logged by this run; one of: train/loss, train/acc",
        ),
        (["lr_scheduler=step", "+lr_scheduler.frequency=0"], "lr_scheduler.frequency must be a whole number >= 1"),
        (["+logger.tb._target_=lightning.pytorch.loggers.TensorBoardLoger"], "logger.tb._target_="),
        (["dataset.val_fraction=1"], "dataset.val_fraction must be in [0, 1), got 1.0"),
    ],
)
def test_callbacks_and_loggers_that_cannot_be_built_are_rejected_with_the_settings(args, message):
    """The same check as above (settings_from, which the command line runs first), without a process each."""
    from pcsweep.config.settings import ConfigError

    with pytest.raises(ConfigError) as error:
        compose_settings(*args)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.slow
def test_callbacks_from_the_command_line_and_a_checkpoint_that_rebuilds_its_module(tmp_path):
    from pcsweep.model.twins import PCModule

    result = pcsweep(
        tmp_path,
        *TINY,
        "epochs=8",
        "relax=2",
        "optimizer.lr=1e-7",
        "dataset.val_fraction=0.2",
        "callbacks=[early_stopping,lr_monitor]",
        "callbacks.early_stopping.patience=1",
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "multirun" / "default").glob("pc_16_2_rc2_*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["epochs"] < 8  # stopped: lr 1e-7 improves nothing
    assert summary["best_val_acc"] == max(r["val_acc"] for r in summary["history"])
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))  # LearningRateMonitor's columns, one per parameter group
    assert [float(row["lr-Adam/pg1"]) for row in rows if row.get("lr-Adam/pg1")] == [1e-7] * summary["epochs"]
    assert summary["config"]["callbacks"]["early_stopping"]["patience"] == 1  # part of the run's identity
    # the checkpoint rebuilds the module: same class, settings, weights and predictions as the finished run
    model = PCModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    weights = torch.load(run_dir / "weights.pt")
    assert model.settings.inference.update_every == 8 and model.settings.dataset.val_fraction == 0.2
    assert weights.keys() <= model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    # ... and the step size inference.step_size=auto had come to (the curvature it follows is not the initial one)
    step_size = model.engine.inference.step_size
    assert step_size == summary["checks"]["inference"]["step_size_final"] == summary["conditions"][-1]["step_size"]
    assert step_size != 0.1
    # the log file holds every line the terminal showed, with time, logger and level
    log_text = (run_dir / "pcsweep.log").read_text()
    assert "[pcsweep.run.task][INFO] - training pc_16_2_rc2" in log_text and "test accuracy" in log_text


def test_the_validation_split_is_held_out_of_training_and_the_same_for_every_run():
    from pcsweep.data.datasets import load_dataset

    whole = load_dataset(compose_settings().dataset)
    held = load_dataset(compose_settings("dataset.val_fraction=0.25", "seed=3", "width=8").dataset)
    assert whole.val is None and len(held.val) == round(0.25 * len(whole.train))
    assert len(held.train) + len(held.val) == len(whole.train) and torch.equal(held.test.inputs, whole.test.inputs)
    rows = lambda split: {tuple(row.tolist()) for row in split.inputs}
    assert not rows(held.val) & rows(held.train) and rows(held.val) | rows(held.train) == rows(whole.train)
    again = load_dataset(compose_settings("dataset.val_fraction=0.25", "seed=0").dataset)
    assert torch.equal(again.val.inputs, held.val.inputs)  # the same split whatever the seed: twins compare


def test_a_log_level_silences_the_terminal_but_not_the_log_file(tmp_path):
    result = pcsweep(tmp_path, *TINY, "epochs=1", "algo=bp", "hydra.job_logging.loggers.pcsweep.level=WARNING")
    assert result.returncode == 0, result.stderr
    assert "[pcsweep]" not in result.stdout
    (log_file,) = (tmp_path / "multirun" / "default").glob("bp_16_2_*/pcsweep.log")
    assert log_file.read_text() == ""  # the level applies to the logger: nothing below WARNING anywhere


@pytest.mark.slow
def test_optuna_tunes_one_twin_on_validation_accuracy_and_a_rerun_trains_nothing(tmp_path):
    command = [*STUDY, "hydra.sweeper.n_trials=3"]
    first = pcsweep(tmp_path, *command)
    assert first.returncode == 0, first.stderr
    sweep = tmp_path / "multirun" / "default"
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("pc_16_2_rc2_digits-*/summary.json"))]
    assert len(summaries) == 3 and len({s["config"]["optimizer"]["lr"] for s in summaries}) == 3
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    winner = max(summaries, key=lambda s: s["best_val_acc"])
    assert best["objective"] == "best_val_acc" and best["value"] == winner["best_val_acc"]
    assert best["run_dir"] == winner["run_dir"] and best["trials"] == 3
    assert (sweep / "best_config.yaml").read_text() == (sweep / winner["run_dir"] / "config.yaml").read_text()
    assert f"best of 3 trials: optimizer.lr={winner['config']['optimizer']['lr']}" in first.stdout
    # the same study again: the seeded sampler asks the same trials, each answered from its finished run
    second = pcsweep(tmp_path, *command)
    assert second.returncode == 0, second.stderr
    assert "[pcsweep] training" not in second.stdout and second.stdout.count("already complete") == 3
    assert yaml.safe_load((sweep / "best.yaml").read_text()) == best


@pytest.mark.slow
def test_optuna_trials_asked_together_train_as_a_pack_and_each_is_scored_by_its_own_run(tmp_path):
    """n_jobs=2 with pack.size=2: the two trials of each ask train as one pack (pcsweep.run.pack), whose job returns
    both members' summaries; each trial is scored by its own run's objective, not its pack-mate's."""
    result = pcsweep(tmp_path, *STUDY, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "pack.size=2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("a pack of 2 runs: 2 train together") == 2
    sweep = tmp_path / "multirun" / "default"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("pc_16_2_rc2_digits-*/summary.json")}
    assert len(summaries) == 4 and len({s["config"]["optimizer"]["lr"] for s in summaries.values()}) == 4
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    winner = max(summaries.values(), key=lambda s: s["best_val_acc"])
    assert best["trials"] == 4 and best["run_dir"] == winner["run_dir"] and best["value"] == winner["best_val_acc"]
    assert f"best of 4 trials: optimizer.lr={winner['config']['optimizer']['lr']}" in result.stdout  # its own value


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["hydra.sweeper.objective=best_test_acc"],
            "hydra.sweeper.objective=best_test_acc is not something a run "
            "measures; one of: best_val_acc, final_val_acc, final_val_loss",
        ),
        (
            ["hydra.sweeper.objective=final_val_loss"],
            "final_val_loss is better when it is lower: set hydra.sweeper.direction=minimize",
        ),
        (
            ["dataset.val_fraction=0"],
            "the objective best_val_acc is measured on a validation split, and "
            "dataset.val_fraction is 0: add dataset.val_fraction=0.1 (tuning never reads the "
            "test set)",
        ),
        (["optimizer.lrx=tag(log, interval(1e-4, 3e-2))"], "Key 'lrx' is not in struct"),
        (["algo=bp"], "algo=bp has no conditions to relax, so relax=2 tunes nothing: use relax=none"),
    ],
)
def test_a_bad_study_is_one_line_before_any_trial_trains(tmp_path, args, message):
    command = [*STUDY, "hydra.sweeper.n_trials=2", *args]
    assert only_error_line(pcsweep(tmp_path, *command)).endswith(message)
    assert not list(tmp_path.rglob("metrics.csv"))


def test_a_failed_optuna_trial_is_given_its_own_failure_and_a_finished_pack_mate_its_own_summary(tmp_path):
    """Three trials launched in one batch: trial a's job fails with its own error, b and c train as one pack whose job
    failed (c raised) though b finished. a gets a's failure, c gets its pack's, b is scored by its own summary."""
    from types import SimpleNamespace

    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from pcsweep.sweep.optuna import TrialLauncher

    entries = [{"status": "launched", "run_dir": name, "overrides": [f"seed={i}"]} for i, name in enumerate("abc")]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(
        json.dumps({"status": "complete", "run_dir": "b", "best_val_acc": 0.5})
    )
    failures = [ValueError("a's own"), RuntimeError("the pack's")]
    inner = SimpleNamespace(
        launch=lambda jobs, initial_job_idx: [JobReturn(status=JobStatus.FAILED, _return_value=e) for e in failures]
    )
    sweeper = SimpleNamespace(
        manifest=[],
        trials=[],
        objective="best_val_acc",
        write_manifest=lambda: None,
        sweep_id="s",
        config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "launcher": {"_target_": "local"}}}),
    )
    launcher = TrialLauncher(inner, sweeper)
    launcher.plan_all = lambda overrides: entries
    launcher.packing = {("seed=0",): (None, 1), ("seed=1",): ("b", 2), ("seed=2",): ("c", 2)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pcsweep.run.pack.pack_shape", lambda settings: "one shape")
        patch.setattr("pcsweep.run.pack.settings_difference", lambda base, other: {})
        returns = launcher.launch([e["overrides"] for e in entries], initial_job_idx=0)
    with pytest.raises(ValueError, match="a's own"):
        _ = returns[0].return_value
    assert returns[1].status == JobStatus.COMPLETED and returns[1].return_value == 0.5
    with pytest.raises(RuntimeError, match="the pack's"):
        _ = returns[2].return_value
