"""The command line as users type it: the default sweep, the paper's grid, bad input, divergence, re-runs."""

import csv
import json

import pytest
import torch

from helpers import SMALL, pcsweep

TWINS = ["bp", "pc", "pc_rc2", "pc_rc3", "pc_rc23"]


def run_folders(sweep_dir):
    return sorted(p.name for p in sweep_dir.iterdir() if (p / "summary.json").is_file())


def test_default_multirun_trains_the_five_twins_and_prints_the_table(tmp_path):
    result = pcsweep(tmp_path, "-m", *SMALL, "tracking.chance_margin=0.05")
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "default"
    names = run_folders(sweep)
    assert sorted(n.split("_digits-")[0] for n in names) == sorted(f"{t.split('_')[0]}_24_3{t[2:]}" for t in TWINS)
    skipped = [line for line in result.stdout.splitlines() if line.startswith("[pcsweep] skipped bp_24_3 relax=")]
    assert len(skipped) == 3  # bp x relax=2,3,23
    for name in names:
        run = sweep / name
        summary = json.loads((run / "summary.json").read_text())
        # seconds of training: a twin with a tiny learning rate (rc23) may not learn, and must then say so
        assert summary["status"] in ("complete", "failed_to_learn") and summary["epochs"] == 2
        if summary["status"] == "failed_to_learn":
            assert summary["final_test_acc"] < 0.15 and summary["time_to_90"] is None
        else:
            assert summary["final_test_acc"] >= 0.15 and summary["time_to_90"] is not None
        assert 0.0 <= summary["final_test_acc"] <= 1.0 and summary["final_train_loss"] > 0
        assert (run / "config.yaml").is_file() and (run / "weights.pt").is_file()
        assert (run / "metrics.csv").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # the table: header and one line per trained model, also saved as summary.csv
    assert "final acc" in result.stdout and "train time [s]" in result.stdout
    for twin in TWINS:
        expected = twin.replace("pc_rc", "pc_24_3_rc") if "rc" in twin else f"{twin}_24_3"
        assert any(line.startswith(expected + " ") for line in result.stdout.splitlines()), expected
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 8 and sum(r["status"] in ("complete", "failed_to_learn") for r in rows) == 5


@pytest.mark.slow
def test_the_paper_grid_command_works_as_typed(tmp_path):
    """`-m algo=bp,pc relax=none,2,3,23 width=256,1024` (shrunk in depth, epochs and T, the report without its
    landscapes: tests/test_report.py has them): 10 runs, 6 skipped."""
    result = pcsweep(
        tmp_path,
        "-m",
        "algo=bp,pc",
        "relax=none,2,3,23",
        "width=256,1024",
        "depth=2",
        "epochs=1",
        "inference.steps=8",
        "report.landscapes=false",
    )
    assert result.returncode == 0, result.stderr
    names = run_folders(tmp_path / "multirun" / "default")
    assert len(names) == 10
    assert {n.split("_digits-")[0] for n in names} == {
        f"{algo}_{w}_2{rc}"
        for w in (256, 1024)
        for algo, rc in [("bp", ""), ("pc", ""), ("pc", "_rc2"), ("pc", "_rc3"), ("pc", "_rc23")]
    }
    assert sum(line.startswith("[pcsweep] skipped bp_") for line in result.stdout.splitlines()) == 6


@pytest.mark.parametrize(
    "override,expected",
    [
        ("algo=foo", "algo must be one of ['bp', 'pc'], got 'foo'"),
        ("relax=5", "relax must be one of ['2', '23', '3', 'none'], got '5'"),
        ("dataset=cifar", "Could not find 'dataset/cifar'"),
    ],
)
@pytest.mark.parametrize("mode", [["-m"], []], ids=["sweep", "single run"])
def test_unknown_choices_list_the_options(tmp_path, override, expected, mode):
    result = pcsweep(tmp_path, *mode, override)
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not any(p.is_dir() for p in (tmp_path / "multirun").rglob("*_digits-*"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("width=0", "width must be >= 1, got 0"),
        ("depth=0", "depth must be >= 1, got 0"),
        ("inference.steps=0", "inference.steps must be >= 1, got 0"),
        ("inference.update_every=0", "inference.update_every must be null or in [1, inference.steps=256], got 0"),
        ("inference.update_every=300", "inference.update_every must be null or in [1, inference.steps=256], got 300"),
        ("optimizer.lr=-1", "optimizer.lr must be > 0, got -1"),
        ("batch_size=0", "batch_size must be >= 1, got 0"),
    ],
)
def test_invalid_numbers_fail_in_one_line_before_training(tmp_path, override, message):
    result = pcsweep(tmp_path, override)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"pcsweep: error: {message}"]
    assert not list(tmp_path.rglob("metrics.csv"))


def test_an_invalid_job_stops_the_whole_sweep_before_any_training(tmp_path):
    result = pcsweep(tmp_path, "-m", *SMALL, "algo=bp,pc", "width=24,0")
    assert result.returncode != 0
    assert "width must be >= 1, got 0" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.csv"))


def test_a_diverging_run_is_marked_and_the_sweep_goes_on(tmp_path):
    # stable inference at the start (a step size past the limit is refused before training), weights that explode:
    # every twin and solver ends DIVERGED (the rules, each twin and solver: tests/test_divergence.py)
    result = pcsweep(tmp_path, "-m", *SMALL, "algo=pc,bp", "optimizer.lr=100", "inference.solver=state")
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "default"
    summaries = {
        n.split("_digits-")[0]: json.loads((sweep / n / "summary.json").read_text()) for n in run_folders(sweep)
    }
    assert summaries["pc_24_3"]["status"] == "diverged" and summaries["pc_24_3"]["diverged"] is True
    assert (sweep / summaries["pc_24_3"]["run_dir"] / "DIVERGED").read_text().strip() == summaries["pc_24_3"][
        "diverged_reason"
    ]
    assert summaries["pc_24_3"]["time_to_90"] is None
    assert summaries["bp_24_3"]["status"] == "diverged"  # BP too: its weights passed 100x their initial norm
    assert "diverged" in result.stdout


def test_running_a_finished_sweep_again_trains_nothing(tmp_path):
    first = pcsweep(tmp_path, "-m", *SMALL, "algo=bp,pc")
    assert first.returncode == 0, first.stderr
    # twins compared at their hand-set default rates: the first lines and the table say so
    untuned = [line for line in first.stdout.splitlines() if line.startswith("[pcsweep] not tuned: bp, pc, pc_rc2")]
    assert untuned and first.stdout.index(untuned[0]) < first.stdout.index("[pcsweep] training ")
    assert "\nnot tuned: bp_24_3, pc_24_3" in first.stdout and "add tune=lr" in first.stdout
    sweep = tmp_path / "multirun" / "default"
    before = {n: (sweep / n / "summary.json").stat().st_mtime_ns for n in run_folders(sweep)}
    second = pcsweep(tmp_path, "-m", *SMALL, "algo=bp,pc")
    assert second.returncode == 0, second.stderr
    # the default relax=none,2,3,23 applies: bp and the four pc twins, each one line
    assert (
        sum(line.startswith("[pcsweep] skipped") and "already complete" in line for line in second.stdout.splitlines())
        == 5
    )
    assert "[pcsweep] training" not in second.stdout and not list(sweep.glob("*/checkpoints/*.partial"))
    assert {n: (sweep / n / "summary.json").stat().st_mtime_ns for n in run_folders(sweep)} == before


@pytest.mark.parametrize("variance", ["neuron", "layer"])
def test_cross_entropy_output_and_variance_options_train(tmp_path, variance):
    result = pcsweep(tmp_path, *SMALL, "relax=23", "output_loss=ce", f"variance={variance}")
    assert result.returncode == 0, result.stderr
    (summary_path,) = tmp_path.rglob("summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "complete" and summary["name"] == "pc_24_3_rc23"
    assert summary["config"]["output_loss"] == "ce" and summary["final_train_loss"] > 0
    weights = torch.load(summary_path.parent / "weights.pt")
    log_variances = sorted(k for k in weights if k.startswith("log_variances."))
    assert len(log_variances) == 3  # hidden layers only: the CE output has no Gaussian variance
    assert all(weights[k].numel() == (24 if variance == "neuron" else 1) for k in log_variances)


def test_a_single_bp_run_with_relax_is_skipped_as_duplicate(tmp_path):
    result = pcsweep(tmp_path, *SMALL, "algo=bp", "relax=3")
    assert result.returncode == 0, result.stderr
    assert "duplicate of bp_24_3_digits" in result.stdout
    assert not list(tmp_path.rglob("metrics.csv"))
