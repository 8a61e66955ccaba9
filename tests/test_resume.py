"""A run killed at a random point and started again ends exactly where an uninterrupted one does."""

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from helpers import pcsweep, start

# big enough that an epoch takes a visible fraction of a second, so the kill lands mid-run
CFG = ["algo=pc", "relax=2", "width=64", "depth=3", "epochs=12", "inference.steps=32", "batch_size=32"]
EPOCHS = 12


@pytest.mark.slow
def test_kill_minus_nine_then_rerun_gives_the_uninterrupted_result(tmp_path):
    straight = pcsweep(tmp_path, *CFG, "sweep_name=straight")
    assert straight.returncode == 0, straight.stderr
    (reference,) = (tmp_path / "multirun" / "straight").glob("*/summary.json")
    epoch_seconds = json.loads(reference.read_text())["train_seconds"] / EPOCHS

    proc = start(tmp_path, *CFG, "sweep_name=killed")
    deadline = time.time() + 120
    ckpts = []
    while time.time() < deadline and not ckpts:
        ckpts = list((tmp_path / "multirun" / "killed").glob("*/checkpoints/last.ckpt"))
        time.sleep(0.02)
    time.sleep(0.5 * epoch_seconds)  # the checkpoint of epoch 0 exists: land somewhere in epoch 1 or 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = ckpts[0].parent.parent
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    resumed = pcsweep(tmp_path, *CFG, "sweep_name=killed")
    assert resumed.returncode == 0, resumed.stderr
    assert run_dir.name == reference.parent.name  # same config, same folder name

    same_result(reference.parent, run_dir, EPOCHS)


def same_result(reference_dir, run_dir, epochs, ignore=("seconds",)):
    """Bitwise the uninterrupted run's numbers: summary, per-epoch history and curve, weights, each epoch logged
    once (history keys containing a word of ``ignore`` aside)."""
    import csv

    a = json.loads((reference_dir / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["epochs"] == a["epochs"] == epochs
    for key in ("final_test_acc", "best_test_acc", "final_train_loss", "final_test_loss", "epoch_to_90", "step_to_90"):
        assert b[key] == a[key], key  # bitwise: same data order (seeded by epoch), same optimizer state, same CPU
    assert b["layers"] == a["layers"] and len(a["layers"]) == epochs  # W0 redrawn from the seed, records restored
    strip = lambda rows: [{k: v for k, v in r.items() if not any(word in k for word in ignore)} for r in rows]
    assert strip(b["history"]) == strip(a["history"])  # the epoch's training means too: they crossed the checkpoint
    assert strip(b["curve"]) == strip(a["curve"])
    wa, wb = torch.load(reference_dir / "weights.pt"), torch.load(run_dir / "weights.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    logged = lambda p: [r["epoch"] for r in csv.DictReader(open(p)) if r["test/acc"]]
    assert logged(run_dir / "metrics.csv") == logged(reference_dir / "metrics.csv") == [str(e) for e in range(epochs)]


SIGNAL_CFG = [
    "algo=pc",
    "relax=2",
    "width=32",
    "depth=3",
    "epochs=3",
    "inference.steps=16",
    "batch_size=8",
    "logger=csv",
    "report.auto=false",
]


def wait_for_progress(run_root, proc, timeout=120):
    """Until the run's first epoch checkpoint exists (so the signal lands inside epoch 1 or 2)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list(run_root.glob("*/checkpoints/last.ckpt")):
            return
        time.sleep(0.02)
    raise AssertionError("the run never reached its first checkpoint")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """SIGNAL_CFG trained without interruption: its summary.json."""
    tmp_path = tmp_path_factory.mktemp("straight")
    straight = pcsweep(tmp_path, *SIGNAL_CFG, "sweep_name=straight")
    assert straight.returncode == 0, straight.stderr
    (summary,) = (tmp_path / "multirun" / "straight").glob("*/summary.json")
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_checkpoints_says_so_exits_nonzero_and_the_rerun_is_bitwise_identical(
    tmp_path, signum, reference
):
    proc = start(tmp_path, *SIGNAL_CFG, "sweep_name=stopped")
    wait_for_progress(tmp_path / "multirun" / "stopped", proc)
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    lines = [line for line in err.splitlines() if line.startswith("pcsweep:")]
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"pcsweep: interrupted ({name}) in epoch ")
    assert lines[0].endswith("; re-run the same command to resume") and "Traceback" not in err
    batch = int(lines[0].split(" at batch ")[1].split(";")[0])
    assert 0 < batch < 250  # mid-epoch: 2000 training samples in batches of 8 (or 1438 on digits' split)
    (run_dir,) = (tmp_path / "multirun" / "stopped").glob("*")
    assert not (run_dir / "summary.json").exists()
    resumed = pcsweep(tmp_path, *SIGNAL_CFG, "sweep_name=stopped")
    assert resumed.returncode == 0, resumed.stderr
    same_result(reference.parent, run_dir, 3)


@pytest.mark.slow
def test_checkpoints_inside_long_epochs_so_a_kill_minus_nine_loses_minutes_not_the_epoch(tmp_path, reference):
    proc = start(tmp_path, *SIGNAL_CFG, "checkpoint.every_minutes=0.002", "sweep_name=killed")
    wait_for_progress(tmp_path / "multirun" / "killed", proc)
    (ckpt,) = (tmp_path / "multirun" / "killed").glob("*/checkpoints/last.ckpt")
    deadline = time.time() + 60
    while time.time() < deadline:  # a checkpoint from inside an epoch 1 (every 0.12 s here)
        saved = torch.load(ckpt, weights_only=False, map_location="cpu")
        if saved.get("mid_epoch") and saved["epoch"] == 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    in_epoch = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert saved["mid_epoch"] == {"epoch": 1, "batches": in_epoch + 1}
    resumed = pcsweep(tmp_path, *SIGNAL_CFG, "checkpoint.every_minutes=0.002", "sweep_name=killed")
    assert resumed.returncode == 0, resumed.stderr
    same_result(reference.parent, ckpt.parent.parent, 3)


@pytest.mark.slow
def test_a_float64_run_resumes_bitwise_too(tmp_path):
    """trainer.precision=64-true: Lightning restores a checkpoint's weights before its precision plugin converts the
    module, so they were loaded into float32 parameters (the resumed run ended 3e-8 from its uninterrupted self);
    the module converts itself first (TwinModule.configure_model)."""
    float64 = [*SIGNAL_CFG, "trainer.precision=64-true"]
    straight = pcsweep(tmp_path, *float64, "sweep_name=straight")
    assert straight.returncode == 0, straight.stderr
    (reference,) = (tmp_path / "multirun" / "straight").glob("*/summary.json")
    proc = start(tmp_path, *float64, "sweep_name=stopped")
    wait_for_progress(tmp_path / "multirun" / "stopped", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    (run_dir,) = (tmp_path / "multirun" / "stopped").glob("*")
    assert not (run_dir / "summary.json").exists()
    resumed = pcsweep(tmp_path, *float64, "sweep_name=stopped")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run_dir / "weights.pt")["mlp.layers.0.weight"].dtype == torch.float64
    same_result(reference.parent, run_dir, 3)


STORED = Path(__file__).parent / "data" / "run_written_by_01a8790"


@pytest.mark.slow
def test_a_run_folder_written_before_the_rooms_moved_still_resumes(tmp_path, reference):
    """tests/data/run_written_by_01a8790: SIGNAL_CFG stopped by SIGINT in epoch 1 by commit 01a8790, before the flat
    modules moved into rooms; its config.yaml names ``pcsweep.track.wandb_run.wandb_logger``. Its identity is still this
    command's (it resumes, not set aside), its old target still imports, and the rerun ends as an uninterrupted run."""
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    stored = OmegaConf.load(STORED / "config.yaml")
    assert stored.logger.wandb._target_ == "pcsweep.track.wandb_run.wandb_logger"
    assert callable(get_method(stored.logger.wandb._target_))
    run_dir = tmp_path / "multirun" / "stopped" / "pc_32_3_rc2_digits-f341cd16"  # as it was written
    shutil.copytree(STORED, run_dir)
    cfg = [c for c in SIGNAL_CFG if c != "logger=csv"]  # as it was launched (W&B disabled, as in start())
    resumed = pcsweep(tmp_path, *cfg, "sweep_name=stopped")
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]  # resumed in place, nothing set aside
    # its epochs recorded the batch-wide residual of then (now the worst sample's): every other number bitwise
    same_result(reference.parent, run_dir, 3, ignore=("seconds", "residual"))


def test_every_old_module_name_imports_as_the_module_it_moved_to():
    """pcsweep.MOVED: the flat modules' old names (in stored configs' _target_ and in users' code) import the very
    module they became, not a copy."""
    import importlib

    from pcsweep import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    assert importlib.import_module(new).__spec__.name == new  # its own name, not the alias
