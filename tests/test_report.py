"""The report: Li et al.'s landscapes checked against their definition, and every figure from real sweeps."""

import json

import pytest
import torch

from helpers import SMALL, pcsweep
from pcsweep.model.mlp import MLP
from pcsweep.pc import output_loss
from pcsweep.report import build_report
from pcsweep.report.landscape_math import Objective, batched_losses, directions, landscape


def trained_like(seed=0):
    torch.manual_seed(seed)
    mlp = MLP(12, 16, 3, 5).double()
    x = torch.rand(40, 12, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (40,)), 5).double()
    weights = [layer.weight.detach().clone() for layer in mlp.layers]
    biases = [layer.bias.detach().clone() for layer in mlp.layers]
    return mlp, weights, biases, x, y


def test_filter_normalized_rows_have_their_weight_rows_norm_and_are_seeded():
    _, weights, _, _, _ = trained_like()
    d1, d2 = directions(weights, seed=3)
    for w, a, b in zip(weights, d1, d2):
        assert a.shape == w.shape
        assert torch.allclose(a.norm(dim=1), w.norm(dim=1), rtol=1e-12)
        assert torch.allclose(b.norm(dim=1), w.norm(dim=1), rtol=1e-12)
        assert not torch.allclose(a, b)
    again, _ = directions(weights, seed=3)
    other, _ = directions(weights, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(d1, again))
    assert not torch.allclose(d1[0], other[0])


def test_biases_are_not_perturbed():
    mlp, weights, biases, x, y = trained_like()
    d1, d2 = directions(weights)
    shifted = [b + 1.0 for b in biases]  # if biases were moved along the plane, these would differ
    a = torch.tensor([0.3, -0.7], dtype=torch.float64)
    moved = batched_losses(weights, biases, d1, d2, a, -a, x, y, "tanh", "mse")
    manual = []
    for alpha in a.tolist():
        with torch.no_grad():
            for layer, w, u, v in zip(mlp.layers, weights, d1, d2):
                layer.weight.copy_(w + alpha * u - alpha * v)
            manual.append(output_loss(mlp(x), y, "mse").item())
    assert torch.allclose(moved, torch.tensor(manual, dtype=torch.float64), rtol=1e-12)
    assert not torch.allclose(moved, batched_losses(weights, shifted, d1, d2, a, -a, x, y, "tanh", "mse"))


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_landscape_center_is_the_trained_models_loss_and_the_grid_is_symmetric(loss):
    mlp, weights, biases, x, y = trained_like()
    view = landscape(Objective(weights, biases, x, y, "tanh", loss), span=0.5, resolution=11, points_per_pass=7)
    expected = output_loss(mlp(x), y, loss).item()
    assert view.losses[5, 5].item() == pytest.approx(expected, rel=1e-12)  # the grid's middle point is (0, 0)
    assert torch.equal(view.alphas, -view.alphas.flip(0)) and torch.equal(view.alphas, view.betas)
    assert view.losses.shape == (11, 11) and (view.losses > 0).all()
    one_by_one = landscape(Objective(weights, biases, x, y, "tanh", loss), span=0.5, resolution=11, points_per_pass=1)
    assert torch.allclose(view.losses, one_by_one.losses, rtol=1e-12)  # batching changes nothing


@pytest.mark.slow
def test_a_sweep_with_diverged_and_skipped_runs_still_gets_every_figure(tmp_path):
    result = pcsweep(
        tmp_path,
        "-m",
        *SMALL,
        "algo=bp,pc",
        "relax=none,2",
        "optimizer.lr=1e-3,100",
        "dataset.val_fraction=0.1",  # two learning rates per twin: the report chooses on validation, never on test
        "report.resolution=9",
        "report.samples=64",
    )
    assert result.returncode == 0, result.stderr
    report = tmp_path / "multirun" / "default" / "report"
    names = sorted(p.name for p in report.iterdir())
    for figure in (
        "benchmark_digits_24.png",
        "curves_digits_24.png",
        "weights_digits_24.png",
        "layers_digits_24.png",
        "landscapes_digits_24.png",
        "generalization_digits_24.png",
        "energy_digits_24.png",
        "report.html",
        "report.md",
    ):
        assert figure in names, figure
    page = (report / "report.html").read_text()
    # self-contained: benchmark, curves, weights, layers, landscapes, train vs test, error energy per layer
    assert page.count("data:image/png;base64,") == 7
    assert "diverged" in page and "duplicate of bp_24_3_digits" in page
    for twin in ("bp_24_3", "pc_24_3", "pc_24_3_rc2"):
        assert twin in page
    # landscapes are cached in the run folders: a second build computes none
    cached = sorted(tmp_path.glob("multirun/default/*/landscape_*.pt"))
    statuses = [json.loads(p.read_text())["status"] for p in tmp_path.glob("multirun/default/*/summary.json")]
    assert "diverged" in statuses and len(cached) == 2 * statuses.count("complete") >= 2 * 3
    stamps = [p.stat().st_mtime_ns for p in cached]
    build_report(tmp_path / "multirun" / "default", (1.0, 0.1), 9, 64, quiet=True)
    assert [p.stat().st_mtime_ns for p in cached] == stamps


@pytest.mark.slow
def test_weight_decay_preset_gets_its_comparison(tmp_path):
    result = pcsweep(
        tmp_path,
        "-m",
        "experiment=weight_decay",
        "width=24",
        "depth=3",
        "epochs=2",
        "inference.steps=16",
        "report.resolution=9",
        "report.samples=64",
        "tracking.chance_margin=-1",
    )
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "weight_decay"
    configs = [json.loads(p.read_text())["config"] for p in sweep.glob("*/summary.json")]
    assert sorted(c["weight_decay"] for c in configs) == [0.0, 1e-6]
    assert all(c["variance_weight_decay"] == c["weight_decay"] and c["relax"] == "23" for c in configs)
    report = sweep / "report"
    assert (report / "curves_digits_24_weight_decay.png").is_file()
    assert (report / "landscapes_digits_24_weight_decay.png").is_file()
    assert "Weight decay (Fig 6)" in (report / "report.html").read_text()
    assert "pc_24_3_rc23 wd=1e-06" in (report / "report.md").read_text()
