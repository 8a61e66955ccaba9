"""Tracking: time to 90%, W&B runs read back from their offline files, sweep summaries, no hang without a server."""

import csv
import json
import socket
import threading
import time

import pytest
import yaml

from helpers import SMALL, pcsweep
from pcsweep.history import History, time_to_fraction
from pcsweep.tracking import steps_to_tolerance, trim_metrics
from wandb_records import read_run

WANDB_OFFLINE = {"WANDB_MODE": "offline", "WANDB_API_KEY": ""}


def curve(accs, seconds_per_epoch=2.0, steps_per_epoch=10):
    return [{"epoch": e, "step": (e + 1) * steps_per_epoch, "train_seconds": (e + 1) * seconds_per_epoch, "test_acc": a}
            for e, a in enumerate(accs)]


def test_time_to_90_uses_the_final_accuracy():
    record = time_to_fraction(curve([0.2, 0.5, 0.86, 0.92, 0.95]))
    assert record["epoch"] == 2 and record["train_seconds"] == 6.0 and record["step"] == 30  # 0.86 >= 0.9 * 0.95 > 0.5


def test_time_to_90_when_accuracy_goes_down():
    # the final accuracy fell to 0.6: 90% of it (0.54) was first reached at epoch 1, before the peak
    record = time_to_fraction(curve([0.5, 0.7, 0.95, 0.6]))
    assert record["epoch"] == 1 and record["train_seconds"] == 4.0


def test_time_to_90_never_reached_or_undefined():
    assert time_to_fraction([]) is None
    assert time_to_fraction(curve([0.3, 0.0])) is None  # a final accuracy of 0 defines no target
    assert time_to_fraction(curve([0.1])) == curve([0.1])[0]  # one epoch: the final epoch itself


def test_time_to_90_survives_a_resume_mid_run():
    full = curve([0.2, 0.5, 0.85, 0.92, 0.95])
    first = History()
    first.records, first.train_seconds = full[:2], 4.0
    resumed = History()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as through a checkpoint
    resumed.records += full[2:]
    assert time_to_fraction(resumed.records) == time_to_fraction(full)


def test_steps_to_tolerance():
    assert steps_to_tolerance([10.0, 5.0, 4.0, 3.9999], 1e-3) == 3
    assert steps_to_tolerance([10.0, 5.0, 4.0], 1e-3) is None


def test_trim_metrics_keeps_finished_epochs_only(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,9,1.0\n1,19,0.5\n2,25,0.4\n,30,\n")
    trim_metrics(path, last_epoch=1)
    assert [row["epoch"] for row in csv.DictReader(open(path))] == ["0", "1"]


def offline_runs(run_dir):
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_an_offline_wandb_run_holds_what_a_researcher_expects(tmp_path):
    result = pcsweep(tmp_path, *SMALL, "relax=3", "tracking.alignment_every=3", env=WANDB_OFFLINE)
    assert result.returncode == 0, result.stderr
    assert "wandb sync" in result.stdout
    (run_dir,) = [p for p in (tmp_path / "multirun" / "default").iterdir() if p.is_dir()]
    (run_file,) = offline_runs(run_dir)
    data = read_run(run_file)
    run = data["run"]
    assert run.display_name == "pc_24_3_rc3_digits" and run.job_type == "pc_rc3" and run.project == "pcsweep"
    assert run.run_group == "default"  # a single run: the sweep name
    assert sorted(run.tags) == sorted(["digits", "width=24", "depth=3", "relax=3"])
    assert data["config"]["width"] == 24 and data["config"]["relax"]["variance"] == "neuron"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert "${" not in json.dumps(resolved) and resolved["optimizer"]["lr"] == 3e-4  # the twin's own lr
    for key, value in resolved.items():  # the whole resolved config, nothing left to interpolate
        assert data["config"][key] == value, key
    keys = {k for row in data["history"] for k in row}
    for key in ("train/loss", "train/acc", "test/loss", "test/acc", "time/train_seconds", "train/loss_step",
                "train/energy", "inference/steps_to_tolerance", "align/cos_W1", "align/cos_W4", "align/output_error",
                "layers/W1_change", "layers/W4_gaussian_distance", "layers/E1", "layers/E4"):
        assert key in keys, key
    epochs = [row["test/acc"] for row in data["history"] if "test/acc" in row]
    assert len(epochs) == 2
    histograms = [row for row in data["history"] if "weights/W1/_type" in row]  # W&B flattens nested values
    assert len(histograms) == 2 and histograms[0]["weights/W1/_type"] == "histogram"
    assert sum(histograms[0]["weights/W4/values"]) == 24 * 10  # every weight of the output layer counted
    assert histograms[0]["variances/S1/_type"] == "histogram"  # rc3: the variances too
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_test_acc", "best_test_acc", "time_to_90", "epoch_to_90", "step_to_90", "train_seconds",
                "diverged", "name", "status"):
        assert data["summary"][key] == summary[key], key
    assert data["exit_code"] == 0
    layers = summary["layers"]  # per epoch and weight layer: change from W0 and distance from a Gaussian
    assert [r["epoch"] for r in layers] == [0, 1] and all(len(r["change"]) == 4 for r in layers)
    assert 0 < layers[0]["change"][0] < layers[1]["change"][0]  # the first layer moves further each epoch
    logged = [row["layers/W1_change"] for row in data["history"] if "layers/W1_change" in row]
    assert logged == [r["change"][0] for r in layers]
    assert len(summary["conditions"][-1]["condition2"]["layer_energy_at_T"]) == 4
    # the same numbers locally
    assert len(json.loads((run_dir / "histograms.json").read_text())) == 2
    traces = json.loads((run_dir / "energy_traces.json").read_text())["traces"]
    assert sorted(traces) == ["0", "1"] and len(traces["0"]) == 16 + 1


def test_three_jobs_make_three_wandb_runs_in_one_group_and_one_summary(tmp_path):
    result = pcsweep(tmp_path, "-m", *SMALL, "algo=bp,pc", "relax=none,2", env=WANDB_OFFLINE)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "default"
    runs = [read_run(f)["run"] for d in sweep.iterdir() if d.is_dir() and d.name != "report" for f in offline_runs(d)]
    assert len(runs) == 3 and len({r.run_id for r in runs}) == 3
    assert len({r.run_group for r in runs}) == 1 and runs[0].run_group.startswith("default-")
    assert sorted(r.job_type for r in runs) == ["bp", "pc", "pc_rc2"]
    (report_file,) = offline_runs(sweep / "report")  # the report's figures, same group
    report = read_run(report_file)
    assert report["run"].job_type == "report" and report["run"].run_group == runs[0].run_group
    claims = json.loads((sweep / "report" / "claims.json").read_text())["claims"]
    assert [report["summary"][f"claim{c['id']}"] for c in claims] == [c["verdict"] for c in claims]
    assert any(key.startswith("claims") for row in report["history"] for key in row)  # the claims table
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 4 and [r["status"] for r in rows].count("complete") == 3
    assert sum(r["status"].startswith("skipped") for r in rows) == 1


@pytest.fixture
def black_hole():
    """A server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("server", ["closed port", "black hole"])
def test_with_a_key_and_no_reachable_server_the_run_completes_offline(tmp_path, black_hole, server):
    url = "http://127.0.0.1:9" if server == "closed port" else black_hole
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": url}
    start = time.time()
    result = pcsweep(tmp_path, *SMALL, "logger.init_timeout=5", env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert time.time() - start < 120
    assert "logging offline" in result.stdout
    (run_dir,) = [p for p in (tmp_path / "multirun" / "default").iterdir() if p.is_dir()]
    (run_file,) = offline_runs(run_dir)
    assert read_run(run_file)["run"].display_name == "pc_24_3_digits"
