"""DIVERGED under every twin and solver: the rules (pcsweep.track.divergence) on plain numbers, their wiring into the
twins' metric flush, and tiny real runs at absurd learning rates (and at the default one, never marked)."""

import math

import pytest
import torch

from helpers import compose, compose_settings
from pcsweep.config.settings import ConfigError
from pcsweep.run import task
from pcsweep.run.task import build_model
from pcsweep.track.divergence import DivergenceWatch


def watch(**changes) -> DivergenceWatch:
    return DivergenceWatch(
        **{"loss_factor": 10, "window": 20, "weight_factor": 100, "initial_norms": [2.0, 3.0]} | changes
    )


def feed(rules: DivergenceWatch, losses: list[float], chunk: int = 32):
    """The losses in flushes of ``chunk`` batches, as the twins hand them over: (batch over the run, reason) or None."""
    for start in range(0, len(losses), chunk):
        fired = rules.losses(losses[start : start + chunk])
        if fired is not None:
            return start + fired[0], fired[1]
    return None


def healthy_curve(batches: int = 3000) -> list[float]:
    """A falling loss with rc2-like noise early (batches up to 3x the start) and spikes later, never up for long."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(batches, generator=gen).tolist()
    curve = [
        4.4 * math.exp(-t / 40) + 0.05 + (3 * 4.4 * noise[t] if t < 20 else 0.3 * noise[t]) for t in range(batches)
    ]
    for t in range(100, batches, 97):  # one-batch spikes of 20x the late loss
        curve[t] *= 20
    return curve


def test_a_healthy_falling_loss_and_steady_weights_are_never_marked():
    rules = watch()
    assert feed(rules, healthy_curve()) is None and rules.baseline is not None and rules.batches == 3000
    assert rules.parameters(["a", "b"], [5.0, 7.0], [2.0 * 99, 3.0 * 5]) is None


def test_the_loss_rule_fires_on_the_second_window_in_a_row_above_k_times_the_first_windows_mean():
    start = [1.0] * 20  # the baseline: mean 1
    one_high = [10.5] * 20 + [1.0] * 20  # one window above 10x, then back: no verdict
    assert feed(watch(), start + one_high + [10.5] * 19) is None
    for chunk in (32, 7, 1):  # the flush's size never moves the batch named
        assert feed(watch(), start + one_high + [12.0] * 40 + [1.0] * 10, chunk) == (
            99,
            "training loss diverged: its mean over two windows of 20 batches in a row was 12 then 12, above 10x its "
            "mean 1 over the first 20",
        )
    assert feed(watch(), start + [math.nan] * 40) is not None  # (the twins stop a non-finite loss at once anyway)
    assert feed(watch(), start + [9.9] * 200) is None  # just under the bound


def test_the_loss_windows_resume_where_they_were():
    losses = [1.0] * 20 + [12.0] * 40
    rules = watch()
    assert feed(rules, losses[:30]) is None
    resumed = watch()
    resumed.load_state_dict(rules.state_dict())
    assert feed(resumed, losses[30:]) == (29, feed(watch(), losses)[1])  # batch 59 of the run either way


def test_the_weight_rule_fires_past_k_times_a_layers_initial_norm_and_any_non_finite_parameter():
    rules = watch()
    assert rules.parameters(["W1", "W2"], [2.0, 3.0], [2.0, 3.0 * 100]) is None
    assert rules.parameters(["W1", "W2"], [2.0, 301.0], [2.0, 301.0]) == (
        "weights diverged: the norm of W2 grew from 3 to 301, above 100x its initial norm"
    )
    for bad in (math.nan, math.inf):
        assert rules.parameters(["b", "log_variances.1"], [1.0, bad], [2.0, 3.0]) == (
            "parameter log_variances.1 is not finite"
        )


@pytest.mark.parametrize(
    "key,value,rule",
    [
        ("divergence_loss_factor", 1, "> 1"),
        ("divergence_window", 0, ">= 1"),
        ("divergence_weight_factor", 0.5, "> 1"),
        ("divergence_factor", 1, "> 1"),
    ],
)
def test_bad_divergence_settings_are_one_line(key, value, rule):
    with pytest.raises(ConfigError, match=f"^tracking.{key} must be {rule}, got {value}"):
        compose_settings(f"tracking.{key}={value}")


class FakeTrainer:
    log_every_n_steps = 10**9
    should_stop = False
    current_epoch = 3


def test_the_flush_judges_the_parameters_and_names_the_epoch_and_batch():
    model = build_model(compose_settings("algo=pc", "relax=3", "width=16", "depth=2"), 64, 10)
    model._trainer = FakeTrainer()
    logits, labels = torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    for batch in range(1, 6):  # (from 1: batch 0 is logged, and this trainer logs nothing)
        model.record_train(batch, torch.tensor(1.0), logits, labels)
    model.epoch_train_metrics()  # the epoch's flush: nothing wrong
    assert not model.diverged and model.divergence.batches == 5
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)  # the loss windows travel with the checkpoint
    resumed = build_model(compose_settings("algo=pc", "relax=3", "width=16", "depth=2"), 64, 10)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.divergence.state_dict() == model.divergence.state_dict()
    with torch.no_grad():
        model.log_variances[1][2] = math.nan
    model.record_train(6, torch.tensor(1.0), logits, labels)
    model.epoch_train_metrics()
    assert model.diverged and model.trainer.should_stop
    assert model.diverged_reason == "parameter log_variances.1 is not finite (epoch 3, batch 6)"


TINY = ["width=16", "depth=2", "epochs=1", "inference.steps=16", "batch_size=128", "tracking.chance_margin=-1"]
TWINS = {
    "bp": ["algo=bp"],
    "pc_error": ["algo=pc", "inference.solver=error"],
    "pc_state": ["algo=pc", "inference.solver=state"],
    "pc_rc3": ["algo=pc", "relax=3"],
    "pc_rc2": ["algo=pc", "relax=2"],
}


def train(tmp_path, *overrides: str) -> dict:
    summary = task.train(compose(*overrides, "logger=csv", "report.auto=false", "sweep_name=s"), tmp_path / "run")
    marker = tmp_path / "run" / "DIVERGED"
    assert marker.is_file() == (summary["status"] == "diverged")
    if marker.is_file():
        assert marker.read_text() == f"{summary['diverged_reason']}\n"
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("lr", ["100", "1e9"])
@pytest.mark.parametrize("twin", TWINS)
def test_an_absurd_learning_rate_ends_diverged_with_the_reason_epoch_and_batch(tmp_path, twin, lr):
    summary = train(tmp_path, *TINY, *TWINS[twin], f"optimizer.lr={lr}")
    assert summary["status"] == "diverged", summary["history"]
    assert summary["diverged_reason"].endswith(")") and "(epoch 0, batch " in summary["diverged_reason"]


@pytest.mark.slow
def test_weights_that_blew_up_are_judged_before_the_curvature_is_measured_on_them(tmp_path):
    # state descent's first batch raises its energy at a check, so the curvature is re-measured before the second; on
    # weights of 1e10 its power iteration overflows (a curvature of 0: ZeroDivisionError) unless they are judged first
    summary = train(tmp_path, *TINY, "width=64", "depth=3", *TWINS["pc_state"], "optimizer.lr=1e9")
    assert summary["status"] == "diverged" and summary["diverged_reason"].endswith("(epoch 0, batch 1)")


@pytest.mark.slow
def test_the_loss_rule_stops_a_real_run_at_the_batch_it_names(tmp_path):
    # the weight rule out of the way, and one batch a window: the first batch's loss is the baseline, the second and
    # third (after Adam's first steps at lr 100) are far above it
    rules = ["tracking.divergence_window=1", "tracking.divergence_weight_factor=1e30"]
    summary = train(tmp_path, *TINY, "algo=bp", "optimizer.lr=100", *rules)
    assert summary["diverged_reason"].startswith("training loss diverged: ")
    assert summary["diverged_reason"].endswith("(epoch 0, batch 2)")


@pytest.mark.slow
@pytest.mark.parametrize("twin", TWINS)
def test_a_healthy_run_at_the_default_rate_is_never_marked(tmp_path, twin):
    # 90 batches: the first window and three more of the loss rule, and three flushes of the weight rule
    summary = train(tmp_path, *TINY, *TWINS[twin], "batch_size=32", "epochs=2")
    assert summary["status"] == "complete" and summary["diverged_reason"] is None
