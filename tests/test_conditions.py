"""A run's own checks: the condition-2 probe, the stability pre-flight and variance floor, and rc3/rc23 at the
defaults for 1,000+ weight updates."""

import math

import pytest
import torch

from helpers import SMALL, compose_settings, pcsweep
from pcsweep.config.settings import AUTO_STEP_FRACTION
from pcsweep.data.datasets import load_digits
from pcsweep.model.mlp import MLP, make_log_variances
from pcsweep.pc import Inference, PCEngine, activity_curvature
from pcsweep.pc.stability import AUTO_FLOOR_STIFFNESS, curvature_due, follow_curvature, preflight_stability
from pcsweep.track.conditions import probe_condition2, variance_statistics


def digits_batch(size=64):
    data = load_digits()
    return data.train.inputs[:size], torch.nn.functional.one_hot(data.train.labels[:size], 10).float()


def test_converged_twins_stop_at_convergence_and_the_probe_measures_where_they_stopped():
    """pc and rc3 end inference at the equilibrium (inference.tolerance on the residual, error optimization), the
    relaxed twins keep their schedule; the condition-2 probe compares the state where training inference stopped with
    the converged one."""
    for relax in ("none", "3"):
        schedule = compose_settings("algo=pc", f"relax={relax}").schedule()
        assert (schedule.tolerance, schedule.solver, schedule.check_every) == (3e-3, "error", 4)
    assert compose_settings("algo=pc", "relax=2").schedule().tolerance is None
    assert compose_settings("algo=pc", "relax=23").schedule().tolerance is None
    x, y = digits_batch()
    torch.manual_seed(0)
    net = MLP(64, 64, 8, 10).as_pc_network(None, "mse")
    engine = PCEngine(net, Inference(steps=256, step_size=0.3, momentum=0.95, tolerance=1e-2))
    trained = engine.train_batch(x, y, apply_update=lambda: None)
    assert trained.steps_used < 256
    probe = probe_condition2(engine, x, y, at_step=256, max_steps=4096)
    assert probe["steps_at_update"] == trained.steps_used and probe["energy_at_T"] == float(trained.energy_end)
    assert probe["gap"] < 0.05 and min(probe["cosine"]) > 0.95  # stopped short of T, still converged
    full = probe_condition2(PCEngine(net, Inference(steps=256, step_size=0.3, momentum=0.95)), x, y, 256, 4096)
    assert full["steps_at_update"] == 256 and full["gap"] <= probe["gap"]


def test_condition2_probe_sees_plain_descent_short_of_convergence_and_the_heavy_ball_closer():
    x, y = digits_batch()
    torch.manual_seed(0)
    net = MLP(64, 64, 8, 10).as_pc_network(None, "mse")
    probes = {
        m: probe_condition2(
            PCEngine(net, Inference(steps=64, step_size=0.1, momentum=m)), x, y, at_step=64, max_steps=4096
        )
        for m in (0.0, 0.95)
    }
    plain, heavy = probes[0.0], probes[0.95]
    assert plain["gap"] > 0.5 and min(plain["cosine"]) < 0.95  # 64 plain steps are far from converged
    assert heavy["gap"] < 0.75 * plain["gap"] and min(heavy["cosine"]) > min(plain["cosine"])
    assert plain["energy_converged"] == pytest.approx(heavy["energy_converged"], rel=0.05)


def test_preflight_rejects_unstable_step_and_floor_and_sets_a_stable_auto_floor():
    x, y = digits_batch()
    torch.manual_seed(0)
    mlp = MLP(64, 64, 8, 10)
    log_vars = make_log_variances(mlp.sizes, "neuron", "mse")
    net = mlp.as_pc_network(list(log_vars), "mse")
    engine = PCEngine(net, Inference(steps=8, step_size=0.1, momentum=0.0))
    checked = preflight_stability(engine, x, y, "auto", trainable_variance=True)
    lam, floor = checked["lambda_max"], checked["log_variance_min"]
    assert checked["stiffness"] == pytest.approx(0.1 * lam)
    assert 0.1 * lam * math.exp(-floor) == pytest.approx(1.8)  # the auto floor: 90% of the limit 2
    with torch.no_grad():  # every variance on the floor: still stable, and the curvature is 1/S_min times larger
        for s in log_vars:
            s.fill_(floor)
    engine.refresh_parameters()
    engine.feedforward_init(x, y)
    assert float(activity_curvature(engine).max()) == pytest.approx(lam * math.exp(-floor), rel=1e-3)
    with pytest.raises(ValueError, match="log_variance_min=-3 is below the stable range"):
        preflight_stability(PCEngine(net, Inference(steps=8, step_size=0.1)), x, y, -3.0, trainable_variance=True)
    with pytest.raises(ValueError, match="inference.step_size=5 is past the stability limit"):
        preflight_stability(PCEngine(net, Inference(steps=8, step_size=5.0)), x, y, "auto", trainable_variance=True)


@pytest.mark.parametrize("momentum", [0.0, 0.95])
def test_auto_step_size_holds_its_share_of_the_limit_as_the_curvature_grows(momentum):
    """inference.step_size=auto: gamma * lambda_max is AUTO_STEP_FRACTION of 2 (1 + beta) at the initial weights, and
    again after the curvature grows (weights scaled up, as training does), where the first step size would not be;
    with trainable variances the auto floor sits where gamma * lambda_max / S_min is 90% of the limit, and a step
    that leaves the variance no room below 1 is refused."""
    x, y = digits_batch()
    torch.manual_seed(0)
    mlp = MLP(64, 64, 8, 10)
    log_vars = make_log_variances(mlp.sizes, "neuron", "mse")
    engine = PCEngine(mlp.as_pc_network(list(log_vars), "mse"), Inference(steps=8, step_size=0.1, momentum=momentum))
    limit = 2 * (1 + momentum)
    checked = preflight_stability(engine, x, y, "auto", True, step_setting="auto", auto_stiffness=AUTO_STEP_FRACTION)
    first = engine.inference.step_size
    assert first == checked["step_size"] == pytest.approx(AUTO_STEP_FRACTION * limit / checked["lambda_max"])
    assert checked["stiffness"] == pytest.approx(AUTO_STEP_FRACTION * limit)
    assert math.exp(checked["log_variance_min"]) == pytest.approx(AUTO_STEP_FRACTION / AUTO_FLOOR_STIFFNESS)
    with torch.no_grad():
        for layer in mlp.layers:
            layer.weight.mul_(1.6)
    engine.refresh_parameters()
    engine.feedforward_init(x, y)
    assert first * float(activity_curvature(engine).max()) > 0.75 * limit  # the old step would be near the limit
    curvature = follow_curvature(engine, x, y, checked["targets"])
    engine.feedforward_init(x, y)
    assert curvature == pytest.approx(float(activity_curvature(engine, unit_variance=True).max()), rel=1e-3)
    assert engine.inference.step_size < first
    assert engine.inference.step_size * curvature == pytest.approx(AUTO_STEP_FRACTION * limit)
    fixed = PCEngine(engine.net, Inference(steps=8, step_size=0.1, momentum=momentum))
    assert preflight_stability(fixed, x, y, "auto", True)["step_size"] == 0.1  # a number stays as given
    with pytest.raises(ValueError, match="inference.auto_stiffness=0.95 leaves no room for a trainable variance"):
        preflight_stability(fixed, x, y, "auto", True, step_setting="auto", auto_stiffness=0.95)


def test_variance_statistics_count_the_floor():
    stats = variance_statistics([torch.tensor([-1.0, -1.0, 0.5, 1.5])], floor=-1.0)[0]
    assert stats["at_floor"] == 0.5 and stats["min"] == -1.0 and stats["max"] == 1.5 and stats["mean"] == 0.0


@pytest.mark.parametrize(
    "args,message",
    [
        (["inference.step_size=5"], "inference.step_size=5 is past the stability limit"),
        (["relax=3", "log_variance_min=-4"], "log_variance_min=-4 is below the stable range"),
    ],
)
def test_unstable_settings_are_one_line_before_training(tmp_path, args, message):
    result = pcsweep(tmp_path, *SMALL, "algo=pc", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("pcsweep: error: " + message)
    assert "Traceback" not in result.stderr and "training" not in result.stdout
    assert not list(tmp_path.glob("multirun/*/*/config.yaml"))  # nothing that looks like a run was left


@pytest.mark.slow
@pytest.mark.parametrize("relax", ["3", "23"])
def test_trainable_variance_at_the_defaults_stays_stable_and_keeps_learning_for_1000_updates(relax):
    """rc3 and rc23 with the default inference, floor, optimizer and learning rate (width 64 to keep it quick):
    1,000+ weight updates on digits, inference never unstable, accuracy well above chance and still improving."""
    settings = compose_settings("algo=pc", f"relax={relax}")
    torch.manual_seed(0)
    data = load_digits()
    mlp = MLP(64, 64, 8, 10)
    log_vars = make_log_variances(mlp.sizes, settings.variance, "mse")
    net = mlp.as_pc_network(list(log_vars), "mse")
    engine = PCEngine(net, settings.schedule())
    x, y = data.train.inputs, torch.nn.functional.one_hot(data.train.labels, 10).float()
    checked = preflight_stability(
        engine,
        x[:64],
        y[:64],
        settings.log_variance_min,
        True,
        settings.inference.step_size,
        settings.inference.auto_stiffness,
    )
    engine.log_variance_min = checked["log_variance_min"]
    assert settings.optimizer["_target_"] == "torch.optim.Adam"
    optimizer = torch.optim.Adam(list(mlp.parameters()) + list(log_vars), lr=settings.optimizer["lr"])
    accuracy = lambda: float((mlp(data.test.inputs).argmax(1) == data.test.labels).float().mean())
    updates, accuracies, gen, batch, rose = 0, [], torch.Generator().manual_seed(0), 0, False
    while updates < 1000:
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x) - 63, 64):
            idx = order[start : start + 64]
            if curvature_due(batch, settings.curvature_every, rose):  # what PCModule does (auto step and floor)
                follow_curvature(engine, x[idx], y[idx], checked["targets"])
            result = engine.train_batch(x[idx], y[idx], apply_update=optimizer.step)
            updates, batch, rose = updates + result.updates, batch + 1, bool(result.energy_rises > 0)
            assert math.isfinite(float(result.energy_end))
            assert float(result.energy_end) <= float(result.energy_start) * 10
        with torch.no_grad():
            accuracies.append(accuracy())
    assert min(float(s.min()) for s in log_vars) >= engine.log_variance_min - 1e-6
    engine.feedforward_init(x[:64], y[:64])
    assert engine.inference.step_size * float(activity_curvature(engine).max()) < 2 * (1 + engine.inference.momentum)
    assert accuracies[-1] > 0.5 and accuracies[-1] >= accuracies[0]


def test_an_unstable_job_stops_a_sweep_before_any_job_trains(tmp_path):
    result = pcsweep(tmp_path, "-m", *SMALL, "algo=bp,pc", "inference.step_size=0.1,5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("pcsweep: error: ")
    assert "inference.step_size=5 is past the stability limit" in result.stderr
    assert "Traceback" not in result.stderr and "training" not in result.stdout  # not even the stable jobs before it


@pytest.mark.parametrize(
    "stds,at_floor,verdict",
    [
        ([1e-5, 2e-5], 0.0, "uniform drift (not a per-neuron variance)"),  # what Adam does with +1/2 everywhere
        ([0.2, 0.05], 0.0, "learned per neuron"),
        ([0.0, 0.0], 1.0, "hidden variances at the floor"),
    ],
)
def test_the_variance_verdict_says_what_the_variances_did(stds, at_floor, verdict):
    from types import SimpleNamespace

    from pcsweep.sweep.table import checks_text
    from pcsweep.track.verdicts import run_checks

    layers = [{"mean": -0.3, "std": s, "min": -0.4, "max": -0.2, "at_floor": at_floor} for s in stds]
    probe = {"gap": 0.01, "cosine": [0.99, 0.99]}
    conditions = SimpleNamespace(
        records=[{"epoch": 0, "condition2": probe, "stiffness": 1.0, "variance": layers, "log_variance_min": -0.5}]
    )
    settings = compose_settings("algo=pc", "relax=3")
    summary = {"num_classes": 10, "final_test_acc": 0.9, "history": []}
    stability = {"stiffness": 1.0, "limit": 3.9, "lambda_max": 10.0, "log_variance_min": -0.5, "step_size": 0.1}
    checks = run_checks(settings, summary, conditions.records, stability)
    assert checks["variance"]["verdict"] == verdict
    assert checks_text(checks).endswith(
        f"S at floor {100 * at_floor:.0f}%" + (", uniform" if "uniform" in verdict else "")
    )
