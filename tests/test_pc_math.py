"""The PC engine against the theory in shared/paper.md, in float64."""

import copy
from dataclasses import replace

import pytest
import torch

from pcsweep.model.mlp import MLP, make_log_variances
from pcsweep.pc import Inference, PCEngine, activity_curvature, output_loss
from pcsweep.pc import energy as pc_energy
from pcsweep.pc import reference as ref
from pcsweep.pc.energy import Network, energy
from pcsweep.pc.kernels import PREPACK_AVAILABLE, Tricks
from pcsweep.pc.schedule import relative_residual


@pytest.fixture(autouse=True)
def float64_by_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_net(variance=None, loss="mse", activation="tanh", sizes=(12, 9, 5), depth=4, seed=0):
    torch.manual_seed(seed)
    n_in, width, n_out = sizes
    mlp = MLP(n_in, width, depth, n_out, activation=activation).double()
    log_vars = None
    if variance is not None:
        log_vars = make_log_variances(mlp.sizes, variance, loss).double()
        with torch.no_grad():
            for p in log_vars:
                p.uniform_(-0.7, 0.7)
    return mlp, log_vars, mlp.as_pc_network(list(log_vars) if log_vars is not None else None, loss)


def batch(n_in=12, n_out=5, size=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(size, n_in, generator=gen)
    y = torch.nn.functional.one_hot(torch.randint(0, n_out, (size,), generator=gen), n_out).double()
    return x, y


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("variance", [None, "neuron", "layer"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_local_gradients_equal_autograd_of_the_energy(loss, variance, activation):
    """The hand-derived gradients (the plain functions of pcsweep.pc.energy and the engine's) are autograd's."""
    mlp, _, net = make_net(variance, loss, activation)
    engine = PCEngine(net, Inference(steps=10, step_size=0.1))
    x, y = batch()
    engine.feedforward_init(x, y)
    with torch.no_grad():  # move the hidden activities off the feedforward point: every error term is live
        for l in range(1, net.num_layers):
            engine.x[l].add_(0.3 * torch.randn_like(engine.x[l]))
    engine.activities_changed()
    engine.recompute()
    ours = engine.write_gradients()
    theirs = ref.autograd_parameter_gradients(net, engine.x)
    assert len(ours) == len(theirs) == len(net.parameters())
    for a, b in zip(ours, theirs):
        assert rel(a, b) <= 1e-8
    errs = pc_energy.errors(net, engine.x)
    for a, b in zip(pc_energy.parameter_gradients(net, engine.x, errs), theirs):
        assert rel(a, b) <= 1e-12
    activity = ref.autograd_activity_gradients(net, engine.x)
    plain = pc_energy.activity_gradients(net, errs)
    for l in range(1, net.num_layers):
        local = engine.eps[l] - engine.g[l + 1] @ net.weights[l]
        assert rel(local, activity[l - 1]) <= 1e-8
        assert rel(plain[l - 1], activity[l - 1]) <= 1e-12
    assert engine.energy().item() == pytest.approx(energy(net, engine.x).mean().item(), rel=1e-12)
    error_only = energy(net, engine.x, log_variance_term=False).mean().item()
    assert engine.error_energy().item() == pytest.approx(error_only, rel=1e-12)
    assert engine.layer_error_energies().sum().item() == pytest.approx(error_only, rel=1e-12)
    if variance is not None:  # the log-variance term is what separates the two
        assert engine.log_variance_energy().item() != 0
        assert engine.energy().item() == pytest.approx(error_only + engine.log_variance_energy().item(), rel=1e-12)


def bp_gradients(mlp, x, y, loss="mse"):
    mlp.zero_grad()
    output_loss(mlp(x), y, loss).backward()
    grads = [p.grad.clone() for layer in mlp.layers for p in (layer.weight,)]
    grads += [layer.bias.grad.clone() for layer in mlp.layers]
    mlp.zero_grad()
    return grads


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("extra_sweeps", [0, 3])
def test_fixed_prediction_relaxation_gives_bp_gradients_exactly(loss, extra_sweeps):
    mlp, _, net = make_net(loss=loss, depth=6)
    x, y = batch()
    expected = bp_gradients(mlp, x, y, loss)
    L = net.num_layers
    engine = PCEngine(net, Inference(steps=L + extra_sweeps, step_size=1.0, fixed_predictions=True))
    grads = []

    def capture_update():
        grads.extend(p.grad.clone() for p in net.parameters())

    engine.train_batch(x, y, apply_update=capture_update)
    assert len(grads) == len(expected) == 2 * L
    for ours, theirs in zip(grads, expected):
        assert rel(ours, theirs) <= 1e-10


def test_fixed_prediction_with_a_smaller_step_converges_geometrically():
    mlp, _, net = make_net(depth=3)
    x, y = batch()
    expected = bp_gradients(mlp, x, y)
    errors = []
    for steps in (10, 20, 40):
        engine = PCEngine(net, Inference(steps=steps, step_size=0.5, fixed_predictions=True))
        engine.start(x, y)
        for _ in range(steps):
            engine.step()
        errors.append(max(rel(a, b) for a, b in zip(engine.write_gradients(), expected)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


def test_error_front_moves_down_one_layer_per_step():
    mlp, _, net = make_net(depth=8, sizes=(12, 9, 5))
    L = net.num_layers
    assert L == 9
    engine = PCEngine(net, Inference(steps=L, step_size=0.1))
    x, y = batch()
    engine.start(x, y)
    for t in range(0, L):
        nonzero = [l for l in range(1, L + 1) if engine.e[l].abs().max().item() > 0]
        assert nonzero == list(range(L - t, L + 1)), f"after {t} steps"
        engine.step()
    # the first layer's error, and so its weight update, appears only after L - 1 = 8 steps
    assert engine.e[1].abs().max().item() > 0


def test_top_layer_update_at_t0_equals_bp_gradient():
    mlp, _, net = make_net(depth=5)
    x, y = batch()
    expected = bp_gradients(mlp, x, y)
    engine = PCEngine(net, Inference(steps=1, step_size=0.1))
    engine.start(x, y)
    grads = engine.write_gradients()
    L = net.num_layers
    assert rel(grads[L - 1], expected[L - 1]) <= 1e-12  # W_L
    assert rel(grads[2 * L - 1], expected[2 * L - 1]) <= 1e-12  # b_L
    for l in range(L - 1):  # every other layer has zero error at t = 0: no update yet
        assert grads[l].abs().max().item() == 0


@pytest.mark.parametrize("variance", [None, "neuron"])
def test_energy_never_increases_for_a_small_step(variance):
    _, _, net = make_net(variance, depth=6)
    engine = PCEngine(net, Inference(steps=256, step_size=0.05))
    x, y = batch(size=16)
    engine.start(x, y)
    trace = [engine.energy().item()]
    for _ in range(256):
        engine.step()
        trace.append(engine.energy().item())
    diffs = torch.tensor(trace).diff()
    assert (diffs <= 1e-12).all(), diffs.max()
    assert trace[-1] < 0.9 * trace[0]  # and it does go down


def test_a_too_large_step_does_increase_the_energy():
    """The monotonicity test above can fail: with gamma far past 2 / curvature the energy rises."""
    _, _, net = make_net(depth=6)
    engine = PCEngine(net, Inference(steps=20, step_size=2.5))
    x, y = batch(size=16)
    result = engine.train_batch(x, y, apply_update=lambda: None, trace_energy=True)
    assert (result.energy_trace.diff() > 0).any()


@pytest.mark.parametrize(
    "update_every,variance,momentum",
    [
        (None, None, 0.0),
        (4, None, 0.0),
        (None, "neuron", 0.0),
        (4, "layer", 0.0),
        (None, None, 0.9),
        (4, "neuron", 0.8),
    ],
)
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("gradients", ["plain", "autograd"])
def test_engine_training_equals_the_references(update_every, variance, momentum, loss, gradients):
    """A whole training batch (inference + scheduled updates through SGD) matches the plain functions of the energy
    and autograd of it."""
    _, _, net = make_net(variance, loss)
    ref_net = copy.deepcopy(net)
    x, y = batch()
    results = []
    inference = Inference(steps=16, step_size=0.1, update_every=update_every, momentum=momentum)
    for engine, network in ((PCEngine(net, inference), net), (ref.ReferencePC(ref_net, inference, gradients), ref_net)):
        opt = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
        for _ in range(2):
            results.append(engine.train_batch(x, y, apply_update=opt.step))
    for a, b in zip(net.parameters(), ref_net.parameters()):
        assert rel(a.detach(), b.detach()) <= 1e-10
    ours, theirs = results[:2], results[2:]
    for a, b in zip(ours, theirs):
        assert a.updates == b.updates == (4 if update_every else 1)
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-10)
        assert a.energy_end.item() == pytest.approx(b.energy_end.item(), rel=1e-10)


def test_log_variance_floor_is_enforced():
    _, log_vars, net = make_net("neuron")
    with torch.no_grad():
        log_vars[0].fill_(-5.0)
    engine = PCEngine(net, Inference(steps=2, step_size=0.1), log_variance_min=-2.0)
    assert log_vars[0].min().item() == -2.0
    assert torch.allclose(engine.precisions[0], torch.exp(torch.tensor(2.0)).expand_as(engine.precisions[0]))


@pytest.mark.parametrize("update_every", [None, 8])
def test_inference_tolerance_stops_at_the_equilibrium_and_still_updates(update_every):
    """The stop is on the worst sample's relative residual |dE/dx| / |dE/dx|_0, checked every 8 steps: below the
    tolerance at the stop and at the check before it, above it one check earlier; the last update is made from there."""
    _, _, net = make_net(depth=4)
    x, y = batch(size=16)
    inference = Inference(steps=2000, step_size=0.1, momentum=0.9, update_every=update_every, check_every=8)
    full = PCEngine(copy.deepcopy(net), inference)
    assert full.train_batch(x, y, apply_update=lambda: None).steps_used == 2000
    early = PCEngine(net, replace(inference, tolerance=1e-3))
    updates, residuals = [], []
    step = early.step

    def step_and_watch():  # the residual at every check, as the stop sees it
        step()
        residuals.append(float(relative_residual(early.residuals(), r0)[0]))

    early.step = step_and_watch
    early.start(x[None], y[None])
    r0 = early.residuals()
    residuals.clear()
    result = early.train_batch(x, y, apply_update=lambda: updates.append(1), trace_energy=True)
    t = result.steps_used
    assert t < 2000 and t % 8 == 0 and len(updates) == result.updates >= 1
    assert len(result.energy_trace) == t + 1
    relative = residuals
    assert relative[t - 1] < 1e-3 and relative[t - 9] < 1e-3  # below at the stop and the check before ...
    assert relative[t - 17] >= 1e-3  # ... and not one check earlier
    assert float(result.residual) == pytest.approx(relative[t - 1], rel=1e-9) and result.converged


@pytest.mark.parametrize("twin", [(None, None), (4, None), (None, "neuron"), (4, "neuron")])
def test_engine_equals_reference_in_float32(twin):
    """float32 runs of the same algorithm differ by rounding only (relative 1e-4 on every parameter)."""
    update_every, variance = twin
    _, _, net64 = make_net(variance)
    net = copy.deepcopy(net64)
    for p in net.parameters():
        p.data = p.data.float()
    ref_net = copy.deepcopy(net)
    x, y = (t.float() for t in batch())
    inference = Inference(steps=16, step_size=0.1, update_every=update_every)
    for engine, network in (
        (PCEngine(net, inference), net),
        (ref.ReferencePC(ref_net, inference, "autograd"), ref_net),
    ):
        opt = torch.optim.SGD(network.parameters(), lr=0.05)
        for _ in range(2):
            engine.train_batch(x, y, apply_update=opt.step)
    for a, b in zip(net.parameters(), ref_net.parameters()):
        assert a.dtype == torch.float32
        assert rel(a.detach().double(), b.detach().double()) <= 1e-5


def test_weight_changes_made_outside_the_engine_reach_its_predictions():
    """What the engine derives from the weights (stacked views, a transposed copy for narrow layers) follows any
    in-place change, as load_state_dict makes, and is not redone when nothing changed."""
    _, _, net = make_net(depth=4)
    x, y = batch()
    engine = PCEngine(net, Inference(steps=3, step_size=0.1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine.train_batch(x, y, apply_update=opt.step)
    with torch.no_grad():
        for w in net.weights:
            w.mul_(0.5)
    engine.feedforward_init(x, y)
    engine.recompute()
    fresh = PCEngine(copy.deepcopy(net), Inference(steps=3, step_size=0.1))
    fresh.feedforward_init(x, y)
    fresh.recompute()
    assert torch.equal(engine.A, fresh.A) and torch.equal(engine.G, fresh.G)
    products = engine.store.products
    products.w_t_copy.fill_(float("nan"))  # a marker: only a recomputation would overwrite it
    engine.refresh_parameters()
    assert products._copied_from is not None and torch.isnan(products.w_t_copy).all()  # nothing changed: not redone
    with torch.no_grad():
        net.weights[1].mul_(2.0)
    engine.refresh_parameters()
    assert not torch.isnan(products.w_t_copy).any()  # a weight changed: redone


def test_wide_layers_balanced_over_threads_equal_the_reference():
    """Wide layers batch a multiple of the thread count and split the rest (3 hidden matrices on 2 threads: 2
    batched, 1 in row blocks); the arithmetic is the same as the autograd reference's, to 1e-10."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, _, net = make_net(sizes=(12, 514, 5), depth=4)
        ref_net = copy.deepcopy(net)
        x, y = batch()
        engine = PCEngine(net, Inference(steps=6, step_size=0.1, update_every=3))
        reference = ref.ReferencePC(ref_net, Inference(steps=6, step_size=0.1, update_every=3), "autograd")
        for impl, network in ((engine, net), (reference, ref_net)):
            impl.train_batch(x, y, apply_update=torch.optim.SGD(network.parameters(), lr=0.1).step)
        assert engine.store.products._from(0).balanced == 2
        for a, b in zip(net.parameters(), ref_net.parameters()):
            assert rel(a.detach(), b.detach()) <= 1e-10
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("loss,variance", [("mse", None), ("mse", "neuron"), ("ce", "layer")])
def test_activity_curvature_is_the_largest_eigenvalue_of_autograds_hessian(loss, variance):
    """At the feedforward state the power iteration finds the top eigenvalue of the exact activity Hessian."""
    _, _, net = make_net(variance, loss, depth=4)
    x, y = batch(size=3)
    engine = PCEngine(net, Inference(steps=1, step_size=0.1))
    engine.feedforward_init(x, y)
    ours = activity_curvature(engine, iterations=300)
    xs = [t.clone() for t in engine.x]
    for b in range(x.shape[0]):
        hidden = torch.cat([t[b] for t in xs[1:-1]])
        sizes = [t.shape[1] for t in xs[1:-1]]

        def energy_of(flat, b=b, sizes=sizes):
            parts = list(torch.split(flat, sizes))
            acts = [xs[0][b : b + 1]] + [p.unsqueeze(0) for p in parts] + [xs[-1][b : b + 1]]
            return energy(net, acts).sum()

        hessian = torch.autograd.functional.hessian(energy_of, hidden)
        assert ours[b].item() == pytest.approx(torch.linalg.eigvalsh(hessian).max().item(), rel=1e-6)


def test_step_size_past_two_over_curvature_diverges_and_below_it_does_not():
    """The stability limit the pre-flight check uses: gamma * lambda_max < 2 (past it the energy rises at some
    steps; the nonlinearity may keep it bounded, so rises, not blow-ups, are what is watched)."""
    _, _, net = make_net(depth=6)
    x, y = batch(size=16)
    engine = PCEngine(net, Inference(steps=1, step_size=0.1))
    engine.feedforward_init(x, y)
    limit = 2 / activity_curvature(engine).max().item()
    for factor, unstable in ((0.9, False), (1.2, True)):
        result = PCEngine(net, Inference(steps=200, step_size=factor * limit)).train_batch(
            x, y, lambda: None, trace_energy=True
        )
        assert bool((result.energy_trace.diff() > 0).any()) is unstable
        assert (result.energy_rises.item() > 0) is unstable  # the engine's own watch sees it too


def test_heavy_ball_inference_reaches_a_fixed_point_of_the_same_energy_in_fewer_steps():
    """Momentum changes the path, not the fixed points: the heavy ball ends where dE/dx = 0 (autograd's), and at a
    small T it is much closer to converged than plain descent. (The energy is not convex: the two may settle in
    different minima, so the test compares each with its own end point.)"""
    _, _, net = make_net(depth=8, sizes=(12, 16, 5))
    x, y = batch(size=8)
    energy = {}
    for momentum, steps in ((0.0, 64), (0.9, 64), (0.0, 80000), (0.9, 8000)):
        engine = PCEngine(net, Inference(steps=steps, step_size=0.1, momentum=momentum))
        energy[momentum, steps] = engine.train_batch(x, y, apply_update=lambda: None).energy_end.item()
        if steps > 64:
            assert max(g.abs().max().item() for g in ref.autograd_activity_gradients(net, engine.x)) < 1e-12
    plain_gap = energy[0.0, 64] - energy[0.0, 80000]
    heavy_gap = energy[0.9, 64] - energy[0.9, 8000]
    assert 0 <= heavy_gap < 0.5 * plain_gap  # 0.026 vs 0.099 here


@pytest.mark.parametrize("width,trick", [(9, "error_front"), (9, "transposed_copy"), (514, "thread_balance")])
def test_each_speed_trick_switched_off_computes_the_same_training(width, trick):
    """pcsweep.bench.tables times the engine with each trick off; the numbers must not depend on it (float64, 1e-12)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, _, net = make_net(variance="neuron", sizes=(12, width, 5), depth=4)
        off_net = copy.deepcopy(net)
        x, y = batch()
        inference = Inference(steps=6, step_size=0.1, update_every=3)
        on = PCEngine(net, inference)
        off = PCEngine(off_net, inference, tricks=Tricks(**{trick: False}))
        for engine, network in ((on, net), (off, off_net)):
            engine.train_batch(x, y, apply_update=torch.optim.SGD(network.parameters(), lr=0.1).step)
        for a, b in zip(net.parameters(), off_net.parameters()):
            assert rel(a.detach(), b.detach()) <= 1e-12
        if trick == "transposed_copy":
            assert on.store.products.w_t_copy is not None and off.store.products.w_t_copy is None
        if trick == "thread_balance":
            assert on.store.products._from(0).balanced == 2 and off.store.products._from(0).balanced == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not PREPACK_AVAILABLE, reason="this torch build has no oneDNN")
def test_prepacked_weights_compute_the_same_training_within_float32_rounding():
    """float32 at width 520 (wide): the products through oneDNN's packed weights against the batched ones, over a
    relax-2 batch (weights repacked after each of its updates) and a converged one: within float32 rounding."""
    _, _, net = make_net(variance="neuron", sizes=(12, 520, 5), depth=4)
    net = Network(
        [w.detach().float().requires_grad_() for w in net.weights],
        [b.detach().float().requires_grad_() for b in net.biases],
        [None if s is None else s.detach().float().requires_grad_() for s in net.log_variances],
        net.activation,
    )
    off_net = copy.deepcopy(net)
    x, y = (t.float() for t in batch())
    for inference in (Inference(steps=6, step_size=0.1, update_every=3), Inference(steps=12, step_size=0.1)):
        on, off = PCEngine(net, inference), PCEngine(off_net, inference, tricks=Tricks(prepacked=False))
        results = [
            engine.train_batch(x, y, apply_update=torch.optim.SGD(network.parameters(), lr=0.1).step)
            for engine, network in ((on, net), (off, off_net))
        ]
        assert (
            on.store.products.packed is not None and off.store.products.packed is None
        )  # the trick was in use, and off when asked
        assert torch.allclose(results[0].energy_end, results[1].energy_end, rtol=1e-4)
        for a, b in zip(net.parameters(), off_net.parameters()):
            assert rel(a.detach(), b.detach()) <= 1e-4  # float32 rounding (a wrong product is off by O(1))
