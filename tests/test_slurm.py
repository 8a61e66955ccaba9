"""A real one-node SLURM cluster (slurm/test-cluster.sh): sweeps through submitit, requeue, cancel, bad requests."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import SMALL, pcsweep

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "test-cluster.sh"
# jobs small enough for a 2-core machine
JOB = [
    "launcher=slurm",
    "logger=csv",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=20",
]
LONG = ["algo=pc", "relax=2", "width=128", "depth=3", "epochs=8", "inference.steps=64", "batch_size=32"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("needs root and SLURM's Debian packages (slurm/test-cluster.sh install)")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    yield {"SLURM_CONF": str(folder / "slurm.conf")}
    subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=60)


def squeue_ids(env):
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env={**os.environ, **env})
    return out.stdout.split()


def start_sweep(cwd, env, *args):
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "pcsweep", "-m", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_when_requeued(job, env, seconds=120):
    """SLURM holds a requeued job back for a couple of minutes (its begin time): start it now instead, so the test
    waits for the resume, not for that delay."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env={**os.environ, **env}
        ).stdout.strip()
        if state == "PENDING":
            subprocess.run(
                ["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, env={**os.environ, **env}
            )
            return
        time.sleep(0.5)


def wait_for_checkpoint(sweep_dir, seconds=180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = list(sweep_dir.glob("*/checkpoints/last.ckpt"))
        if found:
            return found[0].parent.parent
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same config trained locally without interruption (once for the module's interruption tests)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    result = pcsweep(tmp_path, *LONG, "sweep_name=reference", "logger=csv")
    assert result.returncode == 0, result.stderr
    (run_dir,) = [p for p in (tmp_path / "multirun" / "reference").iterdir() if p.is_dir()]
    return summary(run_dir)


def same_numbers(a, b):
    for key in ("final_test_acc", "best_test_acc", "final_train_loss", "final_test_loss", "epochs", "step_to_90"):
        assert a[key] == b[key], key


def test_a_sweep_through_slurm_completes_every_run(tmp_path, slurm):
    result = pcsweep(tmp_path, "-m", *SMALL, *JOB, "algo=bp,pc", "relax=none,2,3", env=slurm)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "default"
    runs = [p for p in sweep.iterdir() if (p / "summary.json").is_file()]
    assert len(runs) == 4 and all(summary(p)["status"] == "complete" for p in runs)
    assert sum(line.startswith("[pcsweep] skipped bp_24_3 relax=") for line in result.stdout.splitlines()) == 2
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 4  # one SLURM array task per run, none for the duplicates


def test_tuning_trials_run_as_slurm_jobs_like_any_other(tmp_path, slurm):
    tuned = ["algo=bp", "tune=lr", "tune.candidates=[1e-3,1e-2]", "tune.seeds=1", "tune.widen=0"]
    result = pcsweep(tmp_path, "-m", *SMALL, *JOB, *tuned, env=slurm)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "default"
    trials = [p for p in (sweep / "tuning").iterdir() if (p / "summary.json").is_file()]
    assert len(trials) == 2 and all(summary(p)["config"]["tune"]["key"] is None for p in trials)
    chosen = json.loads((sweep / "tuning" / "tuning.json").read_text())["families"][0]["chosen"]
    (grid,) = [p for p in sweep.iterdir() if (p / "summary.json").is_file()]
    assert summary(grid)["lr"] == chosen and summary(grid)["lr_origin"].startswith("tuned: ")
    # the 2 trials and the grid run, trained too: its seed is not a trial's (the runs reported are not those that chose)
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 3


def test_a_requeued_job_resumes_from_its_checkpoint_with_the_same_result(tmp_path, slurm, uninterrupted):
    sweep = start_sweep(tmp_path, slurm, *LONG, *JOB)
    run_dir = wait_for_checkpoint(tmp_path / "multirun" / "default")
    (job,) = squeue_ids(slurm)
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, env={**os.environ, **slurm})
    assert requeue.returncode == 0, requeue.stderr
    start_when_requeued(job, slurm)
    out, err = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, err
    logs = "".join(p.read_text() for p in (tmp_path / "multirun" / "default" / ".submitit").glob("*/*_log.out"))
    assert "resuming " in logs  # the second start picked up the checkpoint (saved at the signal, mid-epoch)
    same_numbers(summary(run_dir), uninterrupted)


def test_the_time_limit_warning_checkpoints_mid_epoch_and_submitit_requeues_the_job_from_there(
    tmp_path, slurm, uninterrupted
):
    """SLURM's warning before a time limit (or a preemption): the batch finishes, a mid-epoch checkpoint is saved,
    submitit requeues the job, and the requeued run continues inside that epoch to the uninterrupted result."""
    sweep = start_sweep(tmp_path, slurm, *LONG, *JOB)
    run_dir = wait_for_checkpoint(tmp_path / "multirun" / "default")
    (job,) = squeue_ids(slurm)
    signalled = subprocess.run(
        ["scancel", "--signal=USR2", job], capture_output=True, text=True, env={**os.environ, **slurm}
    )
    assert signalled.returncode == 0, signalled.stderr
    start_when_requeued(job, slurm)
    out, err = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, err
    logs = "".join(p.read_text() for p in (tmp_path / "multirun" / "default" / ".submitit").glob("*/*_log.*"))
    assert " after batch " in logs  # requeued, resumed inside the epoch the signal landed in
    same_numbers(summary(run_dir), uninterrupted)


def test_a_cancelled_job_is_completed_by_running_the_command_again(tmp_path, slurm, uninterrupted):
    sweep = start_sweep(tmp_path, slurm, *LONG, *JOB)
    run_dir = wait_for_checkpoint(tmp_path / "multirun" / "default")
    (job,) = squeue_ids(slurm)
    subprocess.run(["scancel", job], check=True, env={**os.environ, **slurm})
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode != 0 and "run the same command again" in err and "Traceback" not in err
    assert not (run_dir / "summary.json").exists()
    again = pcsweep(tmp_path, "-m", *LONG, *JOB, env=slurm)
    assert again.returncode == 0, again.stderr
    same_numbers(summary(run_dir), uninterrupted)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("hydra.launcher.partition=nope", "invalid partition"),
        ("hydra.launcher.gpus_per_node=8", "Invalid generic resource (gres) specification"),  # this node has no GPU
    ],
)
def test_an_impossible_request_shows_slurms_own_message(tmp_path, slurm, override, expected):
    result = pcsweep(tmp_path, "-m", *SMALL, *JOB, override, env=slurm)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("pcsweep: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.stderr


def test_launcher_slurm_without_slurm_fails_before_submitting(tmp_path):
    result = pcsweep(tmp_path, "-m", *SMALL, *JOB, env={"PATH": str(tmp_path)})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "pcsweep: error: launcher=slurm needs SLURM, and there is no `sbatch` here: run on a cluster's "
        "login node (or launcher=local)"
    ]
    assert not (tmp_path / "multirun" / "default" / ".submitit").exists()
