"""Packs (pcsweep.run.pack): PC runs of one shape and schedule (seeds, learning rates, pc beside rc3, rc2 beside rc23)
trained side by side as one computation, each still the run it is alone (folder, summary, metrics, checkpoint), to
float64 rounding."""

import dataclasses
import json

import pytest
import torch

from helpers import compose_settings, pcsweep, start
from pcsweep.config.compose import run_dir_name
from pcsweep.run.pack import encode, job_has_gpu, member_settings, pack_groups, pack_jobs

TINY = ["width=16", "depth=2", "epochs=2", "inference.steps=16", "batch_size=128", "tracking.chance_margin=-1"]
RUN = [*TINY, "logger=csv", "report.auto=false", "sweep_name=s", "trainer.precision=64-true"]


def test_pc_runs_of_one_shape_and_schedule_are_packed_and_each_member_keeps_its_own_settings():
    jobs = [
        ["algo=pc", "relax=2", "seed=0"],
        ["algo=pc", "relax=23", "seed=0"],
        ["algo=pc", "relax=none", "seed=0"],
        ["algo=pc", "relax=3", "seed=1"],
        ["algo=pc", "relax=none", "seed=2", "variance=layer"],  # per layer does not pack with rc3's per neuron
        ["algo=pc", "relax=none", "seed=3", "width=32"],  # another shape
        ["algo=bp", "seed=0"],
        ["algo=bp", "seed=1"],
    ]
    settings = [compose_settings(*job) for job in jobs]
    pc = [s if s.algo == "pc" else None for s in settings]
    launched = pack_jobs(jobs, pc, pack_groups(pc, [2] * len(jobs)))
    assert launched[:2] == [["algo=bp", "seed=0"], ["algo=bp", "seed=1"]]  # BP runs alone
    assert [job[:3] for job in launched[2:]] == [jobs[0], jobs[2], jobs[4][:3], jobs[5][:3]]
    packs = {tuple(job[:3]): member_settings(compose_settings(*job)) for job in launched if "pack.members" in job[-1]}
    assert len(packs) == 2
    for members, alone in ((packs[tuple(jobs[0])], settings[:2]), (packs[tuple(jobs[2])], settings[2:4])):
        # rc2 beside rc23, pc beside rc3: each member's settings are its own run's, variance and learning rate too
        assert [dataclasses.asdict(m) for m in members] == [dataclasses.asdict(s) for s in alone]
        assert [run_dir_name(m) for m in members] == [run_dir_name(s) for s in alone]
    assert pack_jobs(jobs, pc, pack_groups(pc, [1] * len(jobs))) == jobs[:]  # pack.size=1: every run alone
    trials = [["algo=pc", "optimizer.lr=0.001", "seed=0"], ["algo=pc", "optimizer.lr=0.01", "seed=0"]]
    trial_settings = [compose_settings(*t) for t in trials]
    (pack,) = pack_jobs(trials, trial_settings, pack_groups(trial_settings, [16, 16]))  # tuning candidates pack too
    assert pack[-1] == f"++pack.members='{encode([{}, {'optimizer.lr': 0.01}])}'"
    assert [m.optimizer["lr"] for m in member_settings(compose_settings(*pack))] == [0.001, 0.01]


def test_the_pack_size_is_planned_per_group_and_on_slurm_follows_the_gpus_each_job_requests():
    """Two groups: seeds at pack.size=2 pack, seeds at pack.size=1 stay alone (the first job's size no longer
    decides for all). pack.size=auto: on SLURM the GPUs a job requests decide, not the login node (no GPU here)."""
    jobs = [["algo=pc", f"seed={s}", f"pack.size={size}"] for size in (2, 1) for s in (0, 1)]
    settings = [compose_settings(*job) for job in jobs]
    launched = pack_jobs(jobs, settings, pack_groups(settings, [s.pack.members_per_pack(False) for s in settings]))
    packs = [job for job in launched if "pack.members" in job[-1]]
    assert len(packs) == 1 and packs[0][:3] == jobs[0] and [j for j in launched if j not in packs] == jobs[2:]
    auto = compose_settings("algo=pc")
    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "gpus_per_node": 1}
    assert job_has_gpu(auto, slurm) and not job_has_gpu(auto, {**slurm, "gpus_per_node": 0})
    assert not job_has_gpu(compose_settings("algo=pc", "trainer.accelerator=cpu"), slurm)
    assert not job_has_gpu(auto, {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})
    assert auto.pack.members_per_pack(job_has_gpu(auto, slurm)) == 16


def run_folders(root):
    return {d.name: d for d in (root / "multirun" / "s").iterdir() if d.is_dir() and "_digits-" in d.name}


def assert_same_runs(packed_root, alone_root, atol=1e-10):
    packed, alone = run_folders(packed_root), run_folders(alone_root)
    assert packed.keys() == alone.keys() and packed
    for name in packed:
        a, b = torch.load(packed[name] / "weights.pt"), torch.load(alone[name] / "weights.pt")
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=atol), (name, key)
        sa, sb = (json.loads((d[name] / "summary.json").read_text()) for d in (packed, alone))
        for key in ("final_test_acc", "final_train_loss", "final_test_loss", "best_val_acc"):
            assert sa[key] == pytest.approx(sb[key], abs=atol) if sb[key] is not None else sa[key] is None, key
        assert sa["status"] == sb["status"] and sa["checks"].keys() == sb["checks"].keys()
        steps = [s["checks"].get("inference", {}).get("steps_used_per_epoch") for s in (sa, sb)]
        assert steps[0] == steps[1]
        assert (packed[name] / "checkpoints" / "last.ckpt").is_file() and (packed[name] / "metrics.csv").is_file()
        # a member's files hold its own weights, not its pack's stacks (torch.save writes a view's whole storage)
        for file in ("weights.pt", "checkpoints/last.ckpt"):
            assert (packed[name] / file).stat().st_size <= (alone[name] / file).stat().st_size + 4096, (name, file)


@pytest.mark.slow
def test_every_pc_twin_packed_equals_its_runs_alone(tmp_path):
    """pc, rc2, rc3 and rc23 at two seeds, packed four by four (pc with rc3, rc2 with rc23), against the same sweep
    one run at a time: every run's own folder, checkpoint and summary, its weights and numbers equal to 1e-10 in
    float64."""
    grid = ["-m", "algo=pc", "relax=none,2,3,23", "seed=0,1", *RUN]
    (tmp_path / "packed").mkdir()
    (tmp_path / "alone").mkdir()
    packed = pcsweep(tmp_path / "packed", *grid, "pack.size=4")
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert packed.stdout.count("a pack of 4 runs: 4 train together") == 2
    alone = pcsweep(tmp_path / "alone", *grid, "pack.size=1")
    assert alone.returncode == 0 and "a pack of" not in alone.stdout
    assert_same_runs(tmp_path / "packed", tmp_path / "alone")
    again = pcsweep(tmp_path / "packed", *grid, "pack.size=4")  # each member is found finished on its own
    assert again.returncode == 0 and again.stdout.count("already complete") == 8 and "a pack of" not in again.stdout


@pytest.mark.slow
def test_tuning_trains_its_candidates_in_packs_and_a_diverging_one_stops_alone(tmp_path):
    """tune=lr's trials at two learning rates train as one pack; the one at 10 diverges and is marked so, the other
    trains on to the end, equal to the same trial trained alone."""
    tune = ["-m", "algo=pc", "relax=2", "tune=lr", "tune.candidates=[0.001,10.0]", "tune.seeds=1", "tune.widen=0", *RUN]
    (tmp_path / "packed").mkdir()
    (tmp_path / "alone").mkdir()
    packed = pcsweep(tmp_path / "packed", *tune, "pack.size=2")
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert "a pack of 2 runs: 2 train together" in packed.stdout
    trials = {
        d.name: json.loads((d / "summary.json").read_text())
        for d in (tmp_path / "packed" / "multirun" / "s" / "tuning").iterdir()
        if (d / "summary.json").is_file()
    }
    assert sorted(s["status"] for s in trials.values()) == ["complete", "diverged"]
    alone = pcsweep(tmp_path / "alone", *tune, "pack.size=1")
    assert alone.returncode == 0, alone.stderr[-2000:]
    for name, summary in trials.items():
        solo = json.loads((tmp_path / "alone" / "multirun" / "s" / "tuning" / name / "summary.json").read_text())
        assert summary["status"] == solo["status"] and summary["epochs"] == solo["epochs"]
        if summary["status"] == "complete":
            assert summary["final_test_acc"] == pytest.approx(solo["final_test_acc"], abs=1e-10)


@pytest.mark.slow
def test_a_signal_stops_every_member_at_a_checkpoint_and_the_rerun_resumes_each(tmp_path):
    """SIGTERM inside epoch 1 or 2 of a pack of two: each member checkpoints, the process exits 128 + 15 in one
    line, no member looks finished; the same command again resumes both, and they end as the uninterrupted pack does,
    within float64 rounding (the resumed members may meet at other batches, where each trains alone for a batch)."""
    import signal
    import time

    grid = ["-m", "algo=pc", "relax=2", "seed=0,1", "pack.size=2", *RUN, "epochs=3", "batch_size=8"]
    (tmp_path / "straight").mkdir()
    (tmp_path / "stopped").mkdir()
    straight = pcsweep(tmp_path / "straight", *grid)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = start(tmp_path / "stopped", *grid)
    sweep = tmp_path / "stopped" / "multirun" / "s"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(sweep.glob("*/checkpoints/last.ckpt"))) < 2:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("pcsweep:")]
    assert len(lines) == 1 and lines[0].startswith("pcsweep: interrupted (SIGTERM)"), err[-2000:]
    assert not list(sweep.glob("*/summary.json"))  # neither member looks finished
    resumed = pcsweep(tmp_path / "stopped", *grid)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    assert_same_runs(tmp_path / "stopped", tmp_path / "straight")


@pytest.mark.slow
def test_a_second_ctrl_c_stops_the_whole_pack_now_and_the_rerun_resumes_every_member(tmp_path):
    """Ctrl-C twice inside a pack of two, within one (long) batch: each member stops at that batch's end without
    saving, the process ends in one line, exit 130, with no member looking finished; the same command again resumes
    both members from their epoch checkpoints and finishes them. (A batch takes about half a second here.)"""
    import signal
    import subprocess
    import time

    long_batches = ["width=128", "depth=4", "inference.steps=256", "batch_size=256"]
    grid = ["-m", "algo=pc", "relax=2", "seed=0,1", "pack.size=2", *RUN, *long_batches]
    proc = start(tmp_path, *grid)
    sweep = tmp_path / "multirun" / "s"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(sweep.glob("*/checkpoints/last.ckpt"))) < 2:
        time.sleep(0.02)
    time.sleep(0.3)  # inside a batch of epoch 1
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the pack trained on after a second Ctrl-C") from None
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("pcsweep:")]
    assert len(lines) == 1 and lines[0].startswith("pcsweep: stopped (a second SIGINT)"), err[-2000:]
    assert "Traceback" not in err
    assert not list(sweep.glob("*/summary.json"))  # no member looks finished
    resumed = pcsweep(tmp_path, *grid)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("resuming") == 2, resumed.stdout
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert [s["epochs"] for s in summaries] == [2, 2]


def test_a_signal_caught_while_a_member_sets_up_reaches_it_when_it_starts_training(tmp_path):
    """A pack's main thread forwards signals to its members: one caught before a member started training (it was
    setting up) is not lost; a second Ctrl-C stops the members without saving; a third ends the main thread."""
    import signal
    import threading

    from pcsweep.run.interruption import _FOLLOWERS, MidEpochCheckpoints, forwarding

    member = MidEpochCheckpoints(tmp_path / "last.ckpt", 0)
    try:
        with forwarding():
            signal.raise_signal(signal.SIGINT)
            thread = threading.Thread(target=member.on_train_start, args=(None, None))
            thread.start()
            thread.join()
            assert member.signum == signal.SIGINT and not member.stop_now
            signal.raise_signal(signal.SIGINT)
            assert member.stop_now
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
    finally:
        _FOLLOWERS.discard(member)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
