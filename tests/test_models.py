"""The Lightning twins: same MLP, same start, each trains on its own rule."""

import dataclasses

import pytest
import torch

from helpers import compose_settings
from pcsweep.model.twins import BPModule, PCModule
from pcsweep.run.task import build_model


def twin_cfg(algo, relax="none"):
    """The real config, composed as the command line would, shrunk to a small MLP."""
    return compose_settings("width=32", "depth=3", f"algo={algo}", f"relax={relax}")


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
    other = dataclasses.replace(twin_cfg("bp"), seed=1)
    assert not torch.equal(build_model(other, 64, 10).mlp.layers[0].weight, bp.mlp.layers[0].weight)


def test_relax_settings_reach_the_engine():
    pc = build_model(twin_cfg("pc", "none"), 64, 10)
    rc2 = build_model(twin_cfg("pc", "2"), 64, 10)
    rc3 = build_model(twin_cfg("pc", "3"), 64, 10)
    assert pc.engine.inference.update_every is None and pc.log_variances is None and pc.engine.inference.steps == 256
    assert rc2.engine.inference.update_every == 8 and rc2.log_variances is None
    assert rc2.engine.inference.momentum == 0.0 and pc.engine.inference.momentum == 0.95  # conf/twin/pc_rc2.yaml
    assert rc3.engine.inference.update_every is None and [p.shape[0] for p in rc3.log_variances] == [32, 32, 32, 10]
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
