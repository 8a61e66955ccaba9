"""A run killed at a random point and started again ends exactly where an uninterrupted one does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import pcsweep

# big enough that an epoch takes a visible fraction of a second, so the kill lands mid-run
CFG = ["algo=pc", "relax=2", "width=64", "depth=3", "epochs=12", "inference.steps=32", "batch_size=32"]
EPOCHS = 12


def start(cwd, *args):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "pcsweep", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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

    a, b = json.loads(reference.read_text()), json.loads((run_dir / "summary.json").read_text())
    assert b["epochs"] == a["epochs"] == EPOCHS
    for key in ("final_test_acc", "best_test_acc", "final_train_loss", "final_test_loss", "epoch_to_90", "step_to_90"):
        assert b[key] == a[key], key  # bitwise: same data order (seeded by epoch), same optimizer state, same CPU
    assert b["layers"] == a["layers"] and len(a["layers"]) == EPOCHS  # W0 redrawn from the seed, records restored
    wa, wb = torch.load(reference.parent / "weights.pt"), torch.load(run_dir / "weights.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the CSV log holds each epoch once, as the uninterrupted one does
    import csv
    epochs = lambda p: [r["epoch"] for r in csv.DictReader(open(p)) if r["test/acc"]]
    assert epochs(run_dir / "metrics.csv") == epochs(reference.parent / "metrics.csv") == [str(e) for e in range(EPOCHS)]
