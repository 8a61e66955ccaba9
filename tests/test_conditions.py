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
        assert (schedule.tolerance, schedule.solver, schedule.check_every) == (1e-3, "error", 4)
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
    assert probe["reference"]["converged"] and probe["reference"]["residual"] < 1e-8
    # stopped short of T at a residual of 1e-2: energy gap and cosine look converged, the update is still ~10% off
    assert probe["gap"] < 0.05 and min(probe["cosine"]) > 0.95 and probe["update_error_max"] > 0.05
    full = probe_condition2(PCEngine(net, Inference(steps=256, step_size=0.3, momentum=0.95)), x, y, 256, 4096)
    assert full["steps_at_update"] == 256 and full["gap"] <= probe["gap"]
    assert full["update_error_max"] < probe["update_error_max"]


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
    assert heavy["update_error_max"] < plain["update_error_max"] and plain["update_error_max"] > 1
    assert plain["energy_converged"] == pytest.approx(heavy["energy_converged"], rel=0.05)
    # plain descent's own reference does not reach 1e-8 in 4096 steps: recorded, not pretended
    assert not plain["reference"]["converged"] and plain["reference"]["residual"] > 1e-8
    assert plain["reference"]["steps"] == plain["reference"]["max_steps"] == 4096


def tiny_batch(size=16):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(size, 6, generator=gen, dtype=torch.float64)
    return x, torch.nn.functional.one_hot(torch.randint(0, 4, (size,), generator=gen), 4).double()


@pytest.mark.parametrize("solver, momentum, check_every", [("error", 0.0, 4), ("state", 0.9, 8)])
def test_the_probe_measures_the_weight_update_error_against_the_equilibrium(solver, momentum, check_every):
    """The update where training inference stopped against the same solver's update at a relative residual of 1e-8
    (float64): about zero when training inference itself ran past it, clearly not at a loose tolerance."""
    x, y = tiny_batch()

    def probe(tolerance):
        torch.manual_seed(0)
        net = MLP(6, 16, 4, 4).double().as_pc_network(None, "mse")
        schedule = Inference(steps=4000, momentum=momentum, tolerance=tolerance, solver=solver, check_every=check_every)
        return probe_condition2(PCEngine(net, schedule), x, y, at_step=4000)

    tight, loose = probe(1e-10), probe(1e-1)
    for p in (tight, loose):
        assert (
            p["reference"]["converged"] and p["reference"]["residual"] < 1e-8 and p["reference"]["dtype"] == "float64"
        )
        assert len(p["update_error"]) == len(p["cosine"]) == len(p["norm_ratio"]) == 5
        assert p["update_error_max"] == max(p["update_error"]) == p["update_error"][p["worst_layer"] - 1]
    assert tight["update_error_max"] < 1e-5 and tight["residual_at_update"] < 1e-10
    assert loose["update_error_max"] > 0.05 and loose["residual_at_update"] < 1e-1
    assert min(tight["cosine"]) > 1 - 1e-9 and all(abs(r - 1) < 1e-5 for r in tight["norm_ratio"])


def test_the_probe_leaves_a_float32_run_as_it_was():
    """The reference is a float64 copy: the run's parameters keep their values, dtype and storage, and the engine
    trains on as before."""
    x, y = digits_batch(32)
    torch.manual_seed(0)
    mlp = MLP(64, 16, 3, 10)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    engine = PCEngine(
        mlp.as_pc_network(None, "mse"), Inference(steps=64, solver="error", tolerance=3e-3, check_every=4)
    )
    engine.train_batch(x, y, apply_update=optimizer.step)
    before = [(p.detach().clone(), p.data_ptr()) for p in mlp.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[mlp.layers[0].weight].items()}
    probe = probe_condition2(engine, x, y, at_step=64)
    assert probe["reference"]["converged"] and 0 < probe["update_error_max"] < 1
    for p, (value, pointer) in zip(mlp.parameters(), before):
        assert p.dtype == torch.float32 and p.data_ptr() == pointer and torch.equal(p.detach(), value)
    assert all(torch.equal(v, optimizer.state[mlp.layers[0].weight][k]) for k, v in state.items())
    assert engine.train_batch(x, y, apply_update=optimizer.step).updates == 1


def probe_record(errors, epoch=0, converged=True):
    worst = max(range(len(errors)), key=lambda l: errors[l])
    reference = {"tolerance": 1e-8, "converged": converged, "residual": 1e-9 if converged else 3e-5, "steps": 900}
    return {
        "epoch": epoch,
        "update_error": errors,
        "update_error_max": errors[worst],
        "worst_layer": worst + 1,
        "gap": 0.001,
        "cosine": [0.999] * len(errors),
        "probed_batches": 2,
        "reference": reference,
    }


def test_condition2_holds_on_the_update_error_and_names_the_worst_layer():
    from pcsweep.config.settings import TrackingSettings
    from pcsweep.sweep.table import checks_text
    from pcsweep.track.conditions import combine_probes
    from pcsweep.track.verdicts import condition2_verdict

    limits = TrackingSettings(condition2_max_update_error=0.01)
    held = condition2_verdict([probe_record([0.002, 0.009, 0.001])], False, limits)
    assert held["verdict"] == "held" and held["worst_layer"] == 2 and held["worst_update_error"] == 0.009
    # one layer of one epoch past 1%: violated, however close the gap and the cosine
    probes = [probe_record([0.002, 0.009, 0.001]), probe_record([0.01, 0.003, 0.043], epoch=1)]
    violated = condition2_verdict(probes, False, limits)
    assert violated["verdict"] == "violated" and (violated["worst_layer"], violated["worst_epoch"]) == (3, 1)
    assert violated["reason"] == "condition 2 violated: layer 3's update is 4.3% off the converged update (limit 1%)"
    assert checks_text({"condition2": violated}) == "c2 violated (update 4.3% off at W3)"
    assert condition2_verdict(probes, True, limits)["verdict"] == "relaxed"
    loose = condition2_verdict(probes, False, TrackingSettings(condition2_max_update_error=0.05))
    assert loose["verdict"] == "held"
    # the share of batches that ended short of the tolerance still decides too
    routine = condition2_verdict([probe_record([0.001])], False, limits, [{"train_unconverged": 0.3}])
    assert routine["verdict"] == "violated" and routine["reason"].startswith("condition 2 violated: 30% of an epoch")
    # a reference that fell short is said, not hidden
    short = condition2_verdict([probe_record([0.001], converged=False)], False, limits)
    assert short["reference_short"] == 1 and "the reference fell short of a residual of 1e-08" in short["reason"]
    assert condition2_verdict([{"gap": 0.01, "cosine": [0.99]}], False, limits)["verdict"] == "not measured"
    # an epoch's probe batches: the worst of each layer
    a, b = probe_record([0.002, 0.02]), probe_record([0.03, 0.001])
    a["norm_ratio"], b["norm_ratio"] = [1.01, 0.9], [0.98, 1.05]
    for p in (a, b):
        p.update({"at_step": 256, "steps_at_update": 20, "steps_converged": 900, "energy_start": 1.0})
        p.update({"energy_at_T": 0.5, "energy_converged": 0.49, "layer_energy_at_T": [0.1, 0.4]})
        p["layer_energy_converged"] = [0.1, 0.39]
    epoch = combine_probes([a, b])
    assert epoch["update_error"] == [0.03, 0.02] and (epoch["update_error_max"], epoch["worst_layer"]) == (0.03, 1)
    assert epoch["norm_ratio"] == [0.98, 0.9] and epoch["probed_batches"] == 2 and len(epoch["batches"]) == 2


def test_a_bad_condition2_limit_is_one_line_before_any_work():
    from pcsweep.config.checks import ConfigError

    for value in ("0", "1", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"^tracking.condition2_max_update_error must be in \(0, 1\), got"):
            compose_settings(f"tracking.condition2_max_update_error={value}")
    with pytest.raises(ConfigError, match=r"^tracking.condition2_batches must be >= 1, got 0$"):
        compose_settings("tracking.condition2_batches=0")
    assert compose_settings("tracking.condition2_max_update_error=0.05").tracking.condition2_max_update_error == 0.05


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
        (["inference.solver=state", "inference.step_size=5"], "inference.step_size=5 is past the stability limit"),
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


def test_a_stored_config_with_the_retired_condition2_limits_still_loads():
    """Condition 2's gap and cosine limits are gone (the verdict is on the update error): a run folder or checkpoint
    that stored them still loads."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from pcsweep.config.compose import settings_from_container

    stored = Path(__file__).parent / "data" / "run_written_by_01a8790" / "config.yaml"
    container = OmegaConf.to_container(OmegaConf.load(stored))
    assert {"condition2_max_gap", "condition2_min_cosine"} <= set(container["tracking"])
    assert settings_from_container(container).tracking.condition2_max_update_error == 0.01
