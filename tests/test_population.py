"""R runs of one shape as one computation (PCEngine.of): each member equals its solo run."""

import math

import pytest
import torch

from pcsweep.model.mlp import MLP, make_log_variances
from pcsweep.pc import Inference, PCEngine, train_batch
from pcsweep.pc.members import Member, PackError, check_fits, pack_bytes

# the PC twins' schedules (momentum, update interval, variance, convergence tolerance), as conf/twin/ sets them
TWINS = {
    "pc": dict(momentum=0.9, update_every=None, variance=None, tolerance=0.1, solver="state"),
    "pc_rc2": dict(momentum=0.0, update_every=4, variance=None, tolerance=None, solver="state"),
    "pc_rc3": dict(momentum=0.9, update_every=None, variance="neuron", tolerance=0.2, solver="state"),
    "pc_rc23": dict(momentum=0.0, update_every=4, variance="neuron", tolerance=None, solver="state"),
    # pc and rc3 as they train by default: error optimization (the step size does not enter it)
    "pc_error": dict(momentum=0.0, update_every=None, variance=None, tolerance=1e-4, solver="error"),
    "pc_rc3_error": dict(momentum=0.0, update_every=None, variance="neuron", tolerance=1e-4, solver="error"),
}
SIZES = dict(in_features=12, width=10, depth=3, out_features=4)


def solo_run(twin: str, seed: int, step: float, output_loss: str = "mse", variance: str = "neuron", device="cpu"):
    """One member as it would train alone: its MLP (drawn from ``seed``), log-variances and inference."""
    spec = TWINS[twin]
    torch.manual_seed(seed)
    mlp = MLP(**SIZES).double().to(device)
    log_vars = None
    if spec["variance"] is not None:
        log_vars = make_log_variances(mlp.sizes, variance, output_loss).double().to(device)
        with torch.no_grad():
            for s in log_vars:
                s.uniform_(-0.2, 0.2)
    net = mlp.as_pc_network(log_vars, output_loss)
    inference = Inference(
        steps=64,
        step_size=step,
        momentum=spec["momentum"],
        update_every=spec["update_every"],
        tolerance=spec["tolerance"],
        check_every=4,
        solver=spec["solver"],
    )
    return net, inference


def batches(seed: int, count: int = 3, size: int = 8, device="cpu"):
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(count):
        inputs = torch.rand(size, SIZES["in_features"], generator=gen, dtype=torch.float64)
        labels = torch.randint(0, SIZES["out_features"], (size,), generator=gen)
        yield inputs.to(device), torch.nn.functional.one_hot(labels, SIZES["out_features"]).double().to(device)


def assert_packed_equals_solo(runs, output_loss: str, variance: str = "neuron", device="cpu") -> set:
    """``runs``: (twin, seed, learning rate, step size) per member. Three batches packed against each member alone:
    weights, variances and every batch metric equal to 1e-10. Returns the steps each member used."""
    solos, members, packed_optimizers = [], [], []
    for twin, seed, lr, step in runs:
        # a floor above 0 where the twin learns no variance: a pack must not raise that member's frozen log S = 0
        floor = 0.5 if TWINS[twin]["variance"] is None else -1.0
        net, inference = solo_run(twin, seed, step, output_loss, variance, device)
        solos.append((PCEngine(net, inference, log_variance_min=floor), torch.optim.Adam(net.parameters(), lr=lr)))
        twin_net, _ = solo_run(twin, seed, step, output_loss, variance, device)
        members.append(Member(twin_net, inference, log_variance_min=floor))
        packed_optimizers.append(torch.optim.Adam(twin_net.parameters(), lr=lr))
    population = PCEngine.of(members)
    data = [list(batches(seed, device=device)) for _, seed, _, _ in runs]
    steps_used = set()
    for b in range(3):
        inputs = torch.stack([data[r][b][0] for r in range(len(runs))])
        target = torch.stack([data[r][b][1] for r in range(len(runs))])
        packed = population.train_batches(inputs, target, [opt.step for opt in packed_optimizers], trace_energy=True)
        for r, (engine, optimizer) in enumerate(solos):
            alone = train_batch(engine, engine.inference, inputs[r], target[r], optimizer.step, trace_energy=True)
            assert packed[r].steps_used == alone.steps_used and packed[r].updates == alone.updates
            assert int(packed[r].energy_rises) == int(alone.energy_rises)
            assert packed[r].converged == alone.converged
            names = ("loss", "energy_start", "energy_end", "log_variance_energy", "energy_trace", "logits", "residual")
            for name in names:
                assert torch.allclose(getattr(packed[r], name), getattr(alone, name), rtol=0, atol=1e-10), name
            steps_used.add(alone.steps_used)
    for (engine, _), member in zip(solos, members):
        mine, theirs = list(member.network.parameters()), list(engine.net.parameters())
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert torch.allclose(a, b, rtol=0, atol=1e-10)
    return steps_used


@pytest.mark.parametrize("output_loss", ["mse", "ce"])
@pytest.mark.parametrize("twin", list(TWINS))
def test_a_packed_member_equals_its_solo_run(twin, output_loss):
    """Three members of one twin with their own seeds, data, learning rates and step sizes (the tuning stage's
    candidates): each equals its solo run."""
    runs = [(twin, 0, 1e-3, 0.05), (twin, 1, 3e-3, 0.08), (twin, 2, 1e-2, 0.03)]
    steps_used = assert_packed_equals_solo(runs, output_loss)
    if TWINS[twin]["tolerance"] is not None:  # a converged member stops on its own while the others go on
        assert len(steps_used) > 1 and min(steps_used) < 64, steps_used


@pytest.mark.parametrize("variance", ["neuron", "layer"])
@pytest.mark.parametrize("output_loss", ["mse", "ce"])
@pytest.mark.parametrize("fixed, learned", [("pc", "pc_rc3"), ("pc_rc2", "pc_rc23"), ("pc_error", "pc_rc3_error")])
def test_a_twin_with_fixed_variance_packs_with_its_learned_variance_twin(fixed, learned, output_loss, variance):
    """pc beside rc3, rc2 beside rc23: the fixed member holds a frozen log S = 0 (no parameter of its own, no floor),
    and each member still equals its solo run."""
    runs = [(fixed, 0, 1e-3, 0.05), (learned, 1, 3e-3, 0.08), (fixed, 2, 1e-2, 0.03), (learned, 3, 1e-3, 0.05)]
    assert_packed_equals_solo(runs, output_loss, variance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run it on a lent GPU)")
@pytest.mark.parametrize("twins", [("pc", "pc_rc3"), ("pc_rc2", "pc_rc23")])
def test_on_a_gpu_a_pack_equals_its_runs_alone_there(twins):
    """The same on CUDA, in float64: every member (pc beside rc3, rc2 beside rc23) equals its solo run on the GPU."""
    fixed, learned = twins
    runs = [(fixed, 0, 1e-3, 0.05), (learned, 1, 3e-3, 0.08), (fixed, 2, 1e-2, 0.03), (learned, 3, 1e-3, 0.05)]
    assert_packed_equals_solo(runs, "mse", device="cuda")


def test_members_that_do_not_share_a_shape_or_a_schedule_are_refused_in_one_line():
    a, inference = solo_run("pc", 0, 0.05)
    b, other = solo_run("pc_rc2", 1, 0.05)
    with pytest.raises(PackError, match="member 1 cannot pack with member 0"):
        PCEngine.of([Member(a, inference), Member(b, other)])
    torch.manual_seed(0)
    wider = MLP(12, 11, 3, 4).double().as_pc_network(None, "mse")
    with pytest.raises(PackError, match="member 1 cannot pack with member 0"):
        PCEngine.of([Member(a, inference), Member(wider, inference)])
    per_neuron, learned = solo_run("pc_rc3", 1, 0.05)
    per_layer, _ = solo_run("pc_rc3", 2, 0.05, variance="layer")
    with pytest.raises(PackError, match="per neuron and per layer do not mix"):
        PCEngine.of([Member(a, inference), Member(per_neuron, learned), Member(per_layer, learned)])


def test_a_pack_that_will_not_fit_is_refused_with_its_estimate():
    sizes = [784] + [1024] * 8 + [10]
    one = pack_bytes(1, sizes, 64, 4)
    assert 8.5e6 * 4 * 4 < one < 8.5e6 * 4 * 4 * 1.2  # weights, gradients and Adam's two states dominate
    with pytest.raises(PackError, match=r"a pack of 100000 runs .* needs about .* GiB, and cpu has"):
        check_fits(100_000, sizes, 64, torch.float32, torch.device("cpu"))
    assert check_fits(2, sizes, 64, torch.float32, torch.device("cpu")) == pack_bytes(2, sizes, 64, 4)
    assert math.isclose(pack_bytes(16, sizes, 64, 4), 16 * one)
