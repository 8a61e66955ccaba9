"""What a cluster does to a sweep, done on purpose to tiny runs: corrupt files, a full disk, two sweeps on one folder,
settings this machine cannot honour. Each fault ends in one line and a state the same command can go on from."""

import csv
import errno
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from helpers import SMALL, compose, compose_settings, pcsweep
from pcsweep.config.compose import run_dir_name, settings_from
from pcsweep.run import files

RUN = [*SMALL, "algo=bp", "logger=csv", "report.auto=false", "sweep_name=s"]


def run_folder(tmp_path, *args):
    return tmp_path / "multirun" / "s" / run_dir_name(compose_settings(*args))


def epochs_logged(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return sorted(int(float(r["epoch"])) for r in csv.DictReader(fh) if r.get("test/acc"))


def trained(tmp_path, *args):
    result = pcsweep(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("content", ['{"status": "compl', ""])
def test_an_unreadable_summary_is_set_aside_and_the_run_finishes_again(tmp_path, content):
    """Invalid JSON, or the empty file a full disk leaves: one line naming it, the sweep goes on, the run is
    rebuilt from its last checkpoint (nothing retrained), and the report reads the new summary."""
    trained(tmp_path, *RUN)
    run_dir = run_folder(tmp_path, *RUN)
    good = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(content)
    result = trained(tmp_path, "-m", *RUN)
    assert f"{run_dir.name}/summary.json is unreadable" in result.stdout
    assert "moved aside to summary.json.corrupt" in result.stdout and "Traceback" not in result.stderr
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["status"] == "complete" and again["final_test_acc"] == good["final_test_acc"]
    assert (run_dir / "summary.json.corrupt").read_text() == content
    assert epochs_logged(run_dir) == [0, 1]


@pytest.mark.parametrize("damage", ["truncated", "zeros"])
def test_an_unloadable_checkpoint_is_set_aside_and_the_run_starts_over_cleanly(tmp_path, damage):
    trained(tmp_path, *RUN)
    run_dir = run_folder(tmp_path, *RUN)
    good = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()  # as if killed after the last checkpoint, before the summary
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(len(data)))
    result = trained(tmp_path, *RUN)
    assert "checkpoints/last.ckpt cannot be loaded" not in result.stderr
    assert "last.ckpt cannot be loaded" in result.stdout and "moved aside to last.ckpt.corrupt" in result.stdout
    assert "metrics.csv is from an attempt with no checkpoint to resume" in result.stdout
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["final_test_acc"] == good["final_test_acc"]  # retrained from scratch: the same numbers
    assert epochs_logged(run_dir) == [0, 1]  # a fresh start does not append to the dead attempt's log


def test_a_run_another_live_process_owns_is_skipped_and_a_dead_owners_lock_is_not_stale(tmp_path):
    run_dir = run_folder(tmp_path, *RUN)
    run_dir.mkdir(parents=True)
    with files.run_lock(run_dir):
        result = trained(tmp_path, *RUN)
        assert f"{run_dir.name}: pid " in result.stdout and "is training it; skipped here" in result.stdout
        assert not (run_dir / "metrics.csv").exists()
    # a holder killed with -9 leaves its .lock file behind, but not its flock: the next run just trains
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from pcsweep.run.files import run_lock\nwith run_lock(Path(sys.argv[1])):\n"
            " print('held', flush=True); time.sleep(60)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert (run_dir / ".lock").is_file()
    result = trained(tmp_path, *RUN)
    assert (
        "test accuracy" in result.stdout and json.loads((run_dir / "summary.json").read_text())["status"] == "complete"
    )


def test_two_identical_sweeps_at_once_train_each_run_once_and_keep_every_log_intact(tmp_path):
    args = ["-m", *SMALL, "algo=bp,pc", "relax=none", "logger=csv", "report.auto=false", "sweep_name=s"]
    env = {"WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    import os

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pcsweep", *args],
            cwd=tmp_path,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    trainings = sum(out.count("[pcsweep] training ") for out, _ in outputs)
    assert trainings == 2  # each of the two runs once, in one sweep or the other
    for name in ("bp", "pc"):
        run_dir = run_folder(
            tmp_path, *SMALL, f"algo={name}", "relax=none", "logger=csv", "report.auto=false", "sweep_name=s"
        )
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"
        assert epochs_logged(run_dir) == [0, 1]


def test_a_full_disk_is_one_line_naming_the_run_and_the_file_and_a_rerun_finishes(tmp_path, monkeypatch):
    from pcsweep.config.errors import UserError
    from pcsweep.run import task as run_module

    cfg = compose(*RUN)
    run_dir = tmp_path / run_dir_name(settings_from(cfg))
    real = files.write_atomic

    def full(path, text):
        if str(path).endswith("summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(run_module, "write_atomic", full)
    with pytest.raises(UserError, match=f"{run_dir.name}: no space left on the device writing {run_dir}/summary.json"):
        run_module.train(cfg, run_dir)
    assert not (run_dir / "summary.json").exists()  # nothing that looks finished
    monkeypatch.setattr(run_module, "write_atomic", real)
    summary = run_module.train(compose(*RUN), run_dir)  # space freed: resumes after the last epoch, writes the summary
    assert summary["status"] == "complete" and epochs_logged(run_dir) == [0, 1]


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.precision=bf16-mixed", "trainer.precision must be 32-true or 64-true"),
        ("trainer.precision=16-mixed", "trainer.precision must be 32-true or 64-true"),
        ("trainer.accelerator=tpu", "trainer.accelerator must be one of"),
    ],
)
def test_settings_this_tool_cannot_honour_are_one_line_before_any_folder(tmp_path, override, message):
    result = pcsweep(tmp_path, *RUN, override)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("pcsweep: error:")
    ]
    assert message in result.stderr and not list(
        tmp_path.glob("multirun/*/*/config.yaml")
    )  # nothing that looks like a run


def test_an_accelerator_this_machine_lacks_is_one_line_before_any_folder(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = pcsweep(tmp_path, *RUN, "trainer.accelerator=gpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pcsweep: error: trainer.accelerator=gpu but no GPU is visible here" in result.stderr
    assert not list(tmp_path.glob("multirun/*/*/config.yaml"))


def test_the_report_counts_seeds_never_copies_or_other_configs(tmp_path):
    """Two copies of one seed-0 config, the same run trained under another accelerator string, another config, and
    seed 1: the copies are listed (not counted), the other config is shown apart, and n is the number of seeds."""
    from pcsweep.report import load_sweep

    def fake_run(folder, *overrides):
        cfg = OmegaConf.to_container(compose(*RUN, *overrides), resolve=True)
        path = tmp_path / "sweep" / folder
        path.mkdir(parents=True)
        (path / "summary.json").write_text(
            json.dumps({"name": "bp_24_3", "dataset": "digits", "status": "complete", "config": cfg})
        )

    fake_run("a", "seed=0")
    fake_run("a_copy", "seed=0")
    fake_run("b", "seed=1")
    fake_run("a_on_cpu", "seed=0", "trainer.accelerator=cpu")  # where a run trains is not what it is
    fake_run("c", "seed=0", "init=torch")
    sweep = load_sweep(tmp_path / "sweep")
    assert [s["model"] for s in sweep.skipped] == ["a_copy", "a_on_cpu"]
    assert "same config and seed as a" in sweep.skipped[0]["reason"]
    labels = {run.path.name: run.label for run in sweep.runs}
    assert labels["a"] == labels["b"] != labels["c"] and labels["a"].startswith("bp_24_3 [")
    seeds = {}
    for run in sweep.runs:
        seeds.setdefault(run.label, []).append(run.config["seed"])
    assert sorted(map(sorted, seeds.values())) == [[0], [0, 1]]


def test_a_signal_in_an_epochs_last_batch_lets_the_epoch_finish_and_checkpoints_its_end(tmp_path, monkeypatch):
    """The epoch's end (validation, history, condition probes) runs after its last batch: a signal there stops the
    run after that work, with an end-of-epoch checkpoint, and the re-run matches an uninterrupted one."""
    import signal

    import torch

    from pcsweep.run import interruption
    from pcsweep.run import task as run_module

    straight = run_module.train(compose(*RUN), tmp_path / "straight")
    original = interruption.MidEpochCheckpoints.on_train_batch_end

    def signalled_in_the_last_batch(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx + 1 == trainer.num_training_batches:
            self.signum = signal.SIGTERM
        original(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(interruption.MidEpochCheckpoints, "on_train_batch_end", signalled_in_the_last_batch)
    run_dir = tmp_path / "stopped"
    with pytest.raises(interruption.Interrupted, match="interrupted \\(SIGTERM\\) in epoch 0 at batch"):
        run_module.train(compose(*RUN), run_dir)
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert saved["epoch"] == 0 and "mid_epoch" not in saved
    monkeypatch.undo()
    resumed = run_module.train(compose(*RUN), run_dir)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(resumed["history"]) == strip(straight["history"]) and len(resumed["history"]) == 2
    assert resumed["final_test_acc"] == straight["final_test_acc"] and epochs_logged(run_dir) == [0, 1]
