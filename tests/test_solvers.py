"""inference.solver: every solver stops at the equilibrium of the energy (a tight float64 reference), the stop is the
residual rule, every batch records its residual, and a run whose batches end short of it does not hold condition 2."""

import copy
import json
import math

import pytest
import torch

from helpers import SMALL, compose_settings, pcsweep
from pcsweep.config.settings import ConfigError, TrackingSettings
from pcsweep.model.mlp import MLP, make_log_variances
from pcsweep.pc import Inference, PCEngine, activity_curvature
from pcsweep.pc import energy as pc
from pcsweep.pc import reference as ref
from pcsweep.pc.schedule import _check, _Runs
from pcsweep.pc.solvers import SOLVERS, Solver, register_solver
from pcsweep.pc.stability import automatic_step
from pcsweep.track.verdicts import condition2_verdict

NETS = [("mse", None), ("ce", None), ("mse", "neuron")]  # the output losses, and a learned variance (rc3)


def make_net(depth: int, loss: str, variance, width: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    mlp = MLP(6, width, depth, 4).double()
    log_vars = None
    if variance is not None:
        log_vars = make_log_variances(mlp.sizes, variance, loss).double()
        with torch.no_grad():
            for s in log_vars:
                s.uniform_(-0.5, 0.5)
    return mlp.as_pc_network(log_vars, loss)


def batch(size: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 6, generator=gen, dtype=torch.float64)
    return x, torch.nn.functional.one_hot(torch.randint(0, 4, (size,), generator=gen), 4).double()


def flat_energy(net, x, y, sizes):
    def energy_of(flat):
        hidden = [part.view(x.shape[0], -1) for part in torch.split(flat, sizes)]
        return pc.energy(net, [x, *hidden, y]).sum()

    return energy_of


def reference_equilibrium(net, x, y):
    """The hidden activities where dE/dx = 0, to a relative residual of 1e-10: autograd gradient descent from the
    feedforward state (the plain reference), then Newton's method on autograd's Hessian. Returns the activities, the
    smallest eigenvalue of the Hessian there (the strong convexity that turns a residual into a distance) and r0."""
    solver = ref.ReferencePC(net, Inference(steps=1, step_size=0.05, momentum=0.9), "autograd")
    solver.start(x[None], y[None])
    hidden = [t.detach().clone() for t in solver.xs[1:-1]]
    sizes = [t.numel() for t in hidden]
    energy_of = flat_energy(net, x, y, sizes)
    flat = torch.cat([t.flatten() for t in hidden])
    r0 = float(torch.autograd.functional.jacobian(energy_of, flat).norm())
    for _ in range(3000):  # close enough for Newton
        solver.step()
    flat = torch.cat([t.detach().flatten() for t in solver.xs[1:-1]])
    for _ in range(50):
        grad = torch.autograd.functional.jacobian(energy_of, flat)
        if float(grad.norm()) < 1e-12 * r0:
            break
        hessian = torch.autograd.functional.hessian(energy_of, flat)
        flat = flat - torch.linalg.solve(hessian, grad)
    grad = torch.autograd.functional.jacobian(energy_of, flat)
    assert float(grad.norm()) < 1e-10 * r0, "the reference did not converge"
    mu = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(energy_of, flat)).min())
    assert mu > 0, "the reference is not a minimum"
    return flat, mu, r0, sizes


def weight_gradients(net, x, y, flat, sizes):
    """dE/dtheta of the batch-mean energy at the activities ``flat``, differentiable in them (autograd twice)."""
    hidden = [part.view(x.shape[0], -1) for part in torch.split(flat, sizes)]
    with torch.enable_grad():
        grads = torch.autograd.grad(pc.energy(net, [x, *hidden, y]).mean(), net.parameters(), create_graph=True)
    return torch.cat([g.flatten() for g in grads])


def solver_inference(solver: str, net, x, y, tolerance: float) -> Inference:
    if solver == "error":
        return Inference(steps=4000, solver="error", tolerance=tolerance, check_every=4)
    engine = PCEngine(net, Inference())
    engine.feedforward_init(x, y)
    lam = float(activity_curvature(engine, iterations=200).max())
    return Inference(
        steps=20000, step_size=automatic_step(0.5, 0.9, lam), momentum=0.9, tolerance=tolerance, check_every=4
    )


@pytest.mark.parametrize("loss,variance", NETS, ids=["mse", "ce", "learned-variance"])
@pytest.mark.parametrize("depth", [2, 4, 8])
@pytest.mark.parametrize("solver", ["state", "error"])
def test_each_solver_stops_at_the_equilibrium_of_a_tight_float64_reference(solver, depth, loss, variance):
    """At the stop the residual is at most tol * r0 (the rule), so the activities are within tol * r0 / mu of the
    equilibrium x* (mu: the Hessian's smallest eigenvalue at x*, a first-order bound; 2x for the remainder), and the
    weight update within |d update / dx|_2 times that of the update at x*."""
    net = make_net(depth, loss, variance)
    x, y = batch()
    tolerance = 1e-6
    engine = PCEngine(net, solver_inference(solver, net, x, y, tolerance))
    result = engine.train_batch(x, y, apply_update=lambda: None)
    assert result.converged and float(result.residual) < tolerance
    star, mu, r0, sizes = reference_equilibrium(net, x, y)
    ours = torch.cat([engine.x[l].flatten() for l in range(1, depth + 1)])
    distance_bound = 2 * tolerance * r0 / mu
    assert float((ours - star).norm()) <= distance_bound
    grads = engine.write_gradients()
    update = torch.cat([g.flatten() for g in grads])
    jacobian = torch.autograd.functional.jacobian(lambda f: weight_gradients(net, x, y, f, sizes), star)
    assert float((update - weight_gradients(net, x, y, star, sizes)).norm()) <= (
        float(torch.linalg.matrix_norm(jacobian, ord=2)) * distance_bound
    )


class PlainDescent(Solver):
    """A toy solver, registered from outside ``pcsweep.pc``: plain gradient descent on the activities with a fixed
    step, through the engine's public math (its residual leaves dE/dx in ``store.gradient``)."""

    def start(self) -> None:
        pass

    def step(self) -> None:
        self.engine.front = 0  # every row moves
        self.engine.residuals()
        self.engine.store.X.sub_(0.2 * self.engine.store.gradient)  # below 2 / lambda_max here
        self.recompute()

    def recompute(self) -> None:
        self.engine.errors(predict=True)


def test_a_solver_registered_from_outside_trains_a_batch_at_the_same_equilibrium():
    """The seam: a solver is a class and a registry line; the loop, the stop and the update are the engine's."""
    register_solver("plain", PlainDescent)
    try:
        net = make_net(2, "mse", None)
        x, y = batch()
        updates = {}
        for solver in ("plain", "error"):
            engine = PCEngine(copy.deepcopy(net), Inference(steps=2000, solver=solver, tolerance=1e-7, check_every=4))
            result = engine.train_batch(x, y, apply_update=lambda: None)
            assert result.converged and result.steps_used > engine.inference.min_steps(2)
            updates[solver] = torch.cat([g.flatten() for g in engine.write_gradients()])
        assert float((updates["plain"] - updates["error"]).norm()) < 1e-5 * float(updates["error"].norm())
        with pytest.raises(ValueError, match="solver must be state when"):
            Inference(solver="plain", update_every=8)
    finally:
        SOLVERS.pop("plain")
    with pytest.raises(ValueError, match="solver must be one of"):
        Inference(solver="plain")


@pytest.mark.parametrize("loss,variance", NETS, ids=["mse", "ce", "learned-variance"])
def test_training_with_error_optimization_ends_at_the_weights_of_state_descent(loss, variance):
    """Three SGD batches, each solver run to a residual of 1e-8: the same weights to 1e-6 (each batch's update is
    within |d update / dx| 1e-8 r0 / mu of the equilibrium's: here about 1e-7)."""
    nets = {s: make_net(4, loss, variance, width=8) for s in ("state", "error")}
    for b in range(3):
        x, y = batch(size=8, seed=10 + b)
        for solver, net in nets.items():
            engine = PCEngine(net, solver_inference(solver, net, x, y, 1e-8))
            result = engine.train_batch(x, y, torch.optim.SGD(net.parameters(), lr=0.05).step)
            assert result.converged
    for a, b in zip(nets["state"].parameters(), nets["error"].parameters()):
        assert float((a - b).abs().max()) <= 1e-6


@pytest.mark.parametrize("solver,first_stop", [("state", 12), ("error", 8)])
def test_the_stop_waits_for_every_layer_and_two_checks(solver, first_stop):
    """Even with a tolerance any residual meets, state descent stops only once its error front can have reached all
    8 layers and been checked again (8 + 4 steps), error optimization at its second check (4 + 4)."""
    net = make_net(8, "mse", None)
    x, y = batch()
    inference = Inference(steps=64, step_size=0.01, solver=solver, tolerance=1e9, check_every=4)
    assert PCEngine(net, inference).train_batch(x, y, lambda: None).steps_used == first_stop


def test_the_stop_needs_two_checks_below_and_no_rise():
    """The rule itself: below the tolerance now and at the last check, and the energy not risen since."""
    inferences = [Inference(tolerance=1e-3)] * 4
    zeros = torch.zeros(4)
    runs = _Runs([True] * 4, [0] * 4, [256] * 4, zeros, zeros, torch.zeros(4, dtype=torch.int64), [None] * 4,
                 torch.ones(4), [True, False, True, True], [False] * 4)  # fmt: skip
    runs.rise_ref = torch.tensor([1.0, 1.0, 1.0, 1.0])
    energy = torch.tensor([0.9, 0.9, 1.1, 0.9])  # run 2's energy rose
    residual = torch.tensor([1e-4, 1e-4, 1e-4, 2e-3])  # run 3 is above the tolerance
    assert _check(runs, inferences, energy, residual, judge=True) == [True, False, False, False]
    assert runs.below == [True, True, True, False]  # run 1 may stop at its next check
    assert _check(runs, inferences, energy, residual, judge=False) == [False] * 4  # before min_steps: never


def test_a_run_whose_batches_end_short_of_the_tolerance_does_not_hold_condition_2():
    reference = {"tolerance": 1e-8, "converged": True, "residual": 1e-9, "steps": 100}
    probes = [{"gap": 0.001, "cosine": [0.999], "update_error_max": 0.001, "worst_layer": 1, "reference": reference}]
    limits = TrackingSettings()
    held = condition2_verdict(probes, False, limits, [{"train_unconverged": 0.0, "train_residual_max": 2e-3}])
    assert held["verdict"] == "held" and held["worst_residual"] == 2e-3
    routine = condition2_verdict(probes, False, limits, [{"train_unconverged": 0.0}, {"train_unconverged": 0.3}])
    assert routine["verdict"] == "violated" and routine["worst_unconverged_share"] == 0.3


def test_bad_solver_settings_are_one_line_before_any_work():
    cases = {
        ("inference.solver=newton",): "inference.solver must be one of ['state', 'error'], got 'newton'",
        ("relax=2", "inference.solver=error"): "inference.solver must be state when the weights are updated",
        ("relax=23", "inference.solver=error"): "inference.solver must be state when the weights are updated",
        ("inference.tolerance=0",): "inference.tolerance must be null or > 0, got 0.0",
        ("inference.steps=6",): "inference.steps must be >= 8 with a tolerance (error inference reaches all 8",
        ("inference.solver=state", "inference.steps=15"): "inference.steps must be >= 16 with a tolerance (state",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            compose_settings("algo=pc", *overrides)
    compose_settings("algo=pc", "inference.steps=8")  # the least that leaves two checks


def test_bad_solver_settings_are_one_line_on_the_command_line(tmp_path):
    result = pcsweep(tmp_path, "-m", *SMALL, "algo=pc", "relax=2", "inference.solver=error")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "inference.solver must be state when the weights are updated" in result.stderr
    assert not list(tmp_path.rglob("metrics.csv"))


def test_every_batch_records_its_residual_in_the_run_files(tmp_path):
    """pc (error optimization, a tolerance) and rc2 (state, none): the epoch's mean and worst residual in
    metrics.csv and the summary; the batches short of the tolerance counted where there is one. SMALL's T = 16 is
    too short for pc's tolerance on most batches: counted, and condition 2 is not said to hold."""
    result = pcsweep(tmp_path, "-m", *SMALL, "algo=pc", "relax=none,2", "logger=csv")
    assert result.returncode == 0, result.stderr

    for summary_file in (tmp_path / "multirun" / "default").glob("*/summary.json"):
        summary = json.loads(summary_file.read_text())
        inference = summary["checks"]["inference"]
        assert len(inference["residual_max_per_epoch"]) == 2
        assert all(0 <= r < math.inf for r in inference["residual_max_per_epoch"])
        assert all(m <= w for m, w in zip(inference["residual_mean_per_epoch"], inference["residual_max_per_epoch"]))
        header = (summary_file.parent / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"train/residual", "train/residual_max"} <= set(header)
        if summary["name"] == "pc_24_3":
            unconverged = inference["unconverged_batches_per_epoch"]
            assert inference["solver"] == "error" and unconverged[0] > 1 and all(u == int(u) for u in unconverged)
            assert "train/unconverged_batches" in header and "train/unconverged" in header
            c2 = summary["checks"]["condition2"]
            assert c2["worst_unconverged_share"] > 0.05 and c2["verdict"] == "violated"
            assert "batches short of it" in result.stdout
        else:
            assert inference["solver"] == "state" and inference["unconverged_batches_per_epoch"] == [None, None]


def test_a_broken_error_gradient_is_caught():
    """The reference comparison fails when the solver is broken: dG/de without its own term (eps) descends the
    output loss alone, and never reaches the equilibrium."""
    net = make_net(4, "mse", None)
    x, y = batch()
    engine = PCEngine(copy.deepcopy(net), Inference(steps=400, solver="error", tolerance=1e-6, check_every=4))
    engine.start(x[None], y[None])
    solver = engine.solver
    original = solver.gradient

    def broken(out):
        original(out)
        out.sub_(engine.EPS)

    solver.gradient = broken
    result = engine.train_batch(x, y, lambda: None)
    assert not result.converged
