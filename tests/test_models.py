"""The Lightning twins: same MLP, same start, each trains on its own rule."""

import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pcsweep.config import register_resolvers
from pcsweep.models import BPModule, PCModule
from pcsweep.run import build_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def twin_cfg(algo, relax="none"):
    """The real config, composed as the command line would, shrunk to a small MLP."""
    register_resolvers()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=["width=32", "depth=3", f"algo={algo}", f"relax='{relax}'"])


@pytest.mark.parametrize("relax", ["none", "2", "3", "23"])
def test_bp_and_pc_twins_start_from_identical_weights(relax):
    bp = build_model(twin_cfg("bp"), num_features=64, num_classes=10)
    pc = build_model(twin_cfg("pc", relax), num_features=64, num_classes=10)
    assert isinstance(bp, BPModule) and isinstance(pc, PCModule)
    bp_state, pc_state = bp.mlp.state_dict(), pc.mlp.state_dict()
    assert bp_state.keys() == pc_state.keys() and len(bp_state) == 2 * 4
    for key in bp_state:
        assert torch.equal(bp_state[key], pc_state[key]), key
    # a different seed draws different weights: the comparison above can fail
    other = copy.deepcopy(twin_cfg("bp"))
    with open_dict(other):
        other.seed = 1
    assert not torch.equal(build_model(other, 64, 10).mlp.layers[0].weight, bp.mlp.layers[0].weight)


def test_relax_settings_reach_the_engine():
    pc = build_model(twin_cfg("pc", "none"), 64, 10)
    rc2 = build_model(twin_cfg("pc", "2"), 64, 10)
    rc3 = build_model(twin_cfg("pc", "3"), 64, 10)
    assert pc.engine.update_every is None and pc.log_variances is None and pc.engine.steps == 256
    assert rc2.engine.update_every == 8 and rc2.log_variances is None
    assert rc3.engine.update_every is None and [p.shape[0] for p in rc3.log_variances] == [32, 32, 32, 10]
    assert not pc.automatic_optimization and build_model(twin_cfg("bp"), 64, 10).automatic_optimization


def test_epoch_means_are_exact_over_batches_recorded_in_groups():
    """Batches reach torchmetrics in groups; the epoch's means and accuracy equal plain per-batch arithmetic,
    including a partial group at the end (70 batches, groups of 32)."""
    model = build_model(twin_cfg("pc"), 64, 10)
    model._trainer = type("FakeTrainer", (), {"log_every_n_steps": 10**9})()  # no step logging in this test
    gen = torch.Generator().manual_seed(0)
    losses, energies, correct = [], [], 0
    for i in range(1, 71):
        logits, labels = torch.randn(8, 10, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        loss, energy = torch.rand((), generator=gen), torch.rand((), generator=gen)
        model.record_train(i, loss, logits, labels, energy=energy)
        losses.append(loss.item())
        energies.append(energy.item())
        correct += int((logits.argmax(1) == labels).sum())
    metrics = model.epoch_train_metrics()
    assert metrics["train_loss"] == pytest.approx(sum(losses) / 70, rel=1e-6)
    assert metrics["train_energy"] == pytest.approx(sum(energies) / 70, rel=1e-6)
    assert metrics["train_acc"] == pytest.approx(correct / (70 * 8), rel=1e-6)
    assert not model._unrecorded
