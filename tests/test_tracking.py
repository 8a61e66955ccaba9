"""Tracking: time to 90%, W&B runs read back from their offline files, sweep summaries, no hang without a server."""

import csv
import dataclasses
import json
import socket
import threading
import time

import pytest
import yaml

from helpers import SMALL, compose, pcsweep
from pcsweep.config.compose import family_name, paper_name, run_dir_name, settings_from, settings_from_container
from pcsweep.track.diagnostics import steps_to_tolerance
from pcsweep.track.history import History, time_to_fraction
from pcsweep.track.metrics_log import EPOCH, SECONDS, STEP, trim_metrics
from pcsweep.track.wandb_run import run_labels
from wandb_records import read_run

WANDB_OFFLINE = {"WANDB_MODE": "offline", "WANDB_API_KEY": ""}


def offline(tmp_path) -> dict:
    """Offline W&B, its staging and cache (artifacts) in the test's folder, not the home directory."""
    return {
        **WANDB_OFFLINE,
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
    }


def curve(accs, seconds_per_epoch=2.0, steps_per_epoch=10):
    return [
        {"epoch": e, "step": (e + 1) * steps_per_epoch, "train_seconds": (e + 1) * seconds_per_epoch, "test_acc": a}
        for e, a in enumerate(accs)
    ]


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


def test_a_run_is_grouped_with_its_other_seeds_and_tagged_to_be_filtered():
    def labels(*overrides):
        settings = settings_from(compose(*overrides))
        return settings, run_labels(settings)

    cfg, seed1 = labels("seed=1", "relax=2")
    _, seed2 = labels("seed=2", "relax=2")
    _, wider = labels("seed=1", "relax=2", "width=32")
    _, in_a_sweep = labels("seed=1", "relax=2", "tracking.group=default-0123abcd")
    assert seed1["group"] == seed2["group"] == in_a_sweep["group"] != wider["group"]  # W&B aggregates the seeds
    assert run_dir_name(cfg) != run_dir_name(
        settings_from(compose("seed=2", "relax=2"))
    )  # each seed still has its own folder
    assert seed1["group"] == family_name(cfg) and seed1["group"].startswith(f"{paper_name(cfg)}_digits-")
    stored = dataclasses.asdict(cfg)  # as a run's config.yaml holds it
    assert family_name(cfg) == family_name(settings_from_container(stored))  # as read back from a run
    from pcsweep.report import Run  # the report's notion of a family: the same hash

    assert Run(None, {}, stored).family == seed1["group"].rsplit("-", 1)[1]
    assert seed1["job_type"] == "pc_rc2"
    assert sorted(seed1["tags"]) == sorted(
        [f"width={cfg.width}", f"depth={cfg.depth}", "twin=pc_rc2", "dataset=digits", "sweep=default", "seed=1"]
    )
    assert "sweep=default-0123abcd" in in_a_sweep["tags"]  # the sweep id: a tag, not the group
    config = in_a_sweep["config"]
    assert (config["twin"], config["family"], config["sweep"], config["seed"]) == (
        "pc_rc2",
        seed1["group"],
        "default-0123abcd",
        1,
    )


def test_an_offline_wandb_run_holds_what_a_researcher_expects(tmp_path):
    result = pcsweep(tmp_path, *SMALL, "relax=3", "tracking.alignment_every=3", env=offline(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "wandb sync" in result.stdout
    (run_dir,) = [p for p in (tmp_path / "multirun" / "default").iterdir() if p.is_dir()]
    (run_file,) = offline_runs(run_dir)
    data = read_run(run_file)
    run = data["run"]
    assert run.display_name == "pc_24_3_rc3_digits" and run.job_type == "pc_rc3" and run.project == "pcsweep"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run.run_group == family_name(settings_from_container(resolved))  # the run's identity without its seed
    assert sorted(run.tags) == sorted(
        ["twin=pc_rc3", "width=24", "depth=3", "dataset=digits", "sweep=default", "seed=0"]
    )
    assert (data["config"]["twin"], data["config"]["family"], data["config"]["sweep"]) == (
        "pc_rc3",
        run.run_group,
        "default",
    )
    assert data["config"]["width"] == 24 and data["config"]["variance"] == "neuron"
    assert "${" not in json.dumps(resolved) and resolved["optimizer"]["lr"] == 3e-4  # the twin's own lr
    for key, value in resolved.items():  # the whole resolved config, nothing left to interpolate
        assert data["config"][key] == value, key
    keys = {k for row in data["history"] for k in row}
    for key in (
        "train/loss",
        "train/acc",
        "test/loss",
        "test/acc",
        "time/train_seconds",
        "train/loss_step",
        "train/energy",
        "inference/steps_to_tolerance",
        "align/cos_W1",
        "align/cos_W4",
        "align/output_error",
        "layers/W1_change",
        "layers/W4_gaussian_distance",
        "layers/E1",
        "layers/E4",
        "cond2/update_error_max",  # condition 2: the worst layer's update error where inference stopped ...
        "cond2/update_error_W1",  # ... and each layer's
        "cond2/update_error_W4",
    ):
        assert key in keys, key
    epochs = [row["test/acc"] for row in data["history"] if "test/acc" in row]
    assert len(epochs) == 2
    histograms = [row for row in data["history"] if "weights/W1/_type" in row]  # W&B flattens nested values
    assert len(histograms) == 2 and histograms[0]["weights/W1/_type"] == "histogram"
    assert sum(histograms[0]["weights/W4/values"]) == 24 * 10  # every weight of the output layer counted
    assert histograms[0]["variances/S1/_type"] == "histogram"  # rc3: the variances too
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "final_test_acc",
        "best_test_acc",
        "time_to_90",
        "epoch_to_90",
        "step_to_90",
        "train_seconds",
        "diverged",
        "name",
        "status",
    ):
        assert data["summary"][key] == summary[key], key
    for name, check in summary["checks"].items():  # each check's verdict, a string to filter by
        assert data["summary"][f"checks/{name}"] == check["verdict"], name
    assert data["exit_code"] == 0
    # the x-axes: every metric charted against trainer/global_step (batches), epoch and training time in every row
    metrics = data["metrics"]
    assert metrics["*"]["step_metric"] == STEP and metrics["*"]["step_sync"]
    assert all(m["step_metric"] == STEP for name, m in metrics.items() if name != STEP), metrics
    assert "max" in metrics["test/acc"]["summary"] and "last" in metrics["train/loss"]["summary"]
    assert data["summary"]["test/acc"]["max"] == summary["best_test_acc"]
    assert data["summary"]["test/acc"]["last"] == summary["final_test_acc"]
    assert data["summary"]["test/loss"]["last"] == summary["final_test_loss"]
    for row in data["history"]:
        assert {STEP, EPOCH, SECONDS} <= row.keys(), row.keys()
    steps = [row[STEP] for row in data["history"]]
    assert steps == sorted(steps)  # one x-axis, moving forward
    per_batch = [row[STEP] for row in data["history"] if "train/loss_step" in row]
    batches = [row[STEP] + 1 for row in data["history"] if "test/acc" in row]  # batches trained by each epoch's end
    assert batches[1] == 2 * batches[0] and max(steps) == batches[1] - 1 and per_batch and max(per_batch) < batches[1]
    seconds = [row[SECONDS] for row in data["history"]]
    assert seconds == sorted(seconds) and seconds[-1] == summary["train_seconds"]
    assert [row[EPOCH] for row in data["history"] if "test/acc" in row] == [0, 1]
    # the final weights, with the config and summary they belong to
    (model,) = [a for a in data["artifacts"] if a["type"] == "model"]
    assert model["name"] == f"weights-{run_dir.name}" and "weights.pt" in model["files"]
    assert {"config.yaml", "summary.json"} <= set(model["files"])
    assert model["metadata"]["status"] == "complete" and model["metadata"]["seed"] == 0
    assert model["metadata"]["final_test_acc"] == summary["final_test_acc"]
    layers = summary["layers"]  # per epoch and weight layer: change from W0 and distance from a Gaussian
    assert [r["epoch"] for r in layers] == [0, 1] and all(len(r["change"]) == 4 for r in layers)
    assert 0 < layers[0]["change"][0] < layers[1]["change"][0]  # the first layer moves further each epoch
    logged = [row["layers/W1_change"] for row in data["history"] if "layers/W1_change" in row]
    assert logged == [r["change"][0] for r in layers]
    assert len(summary["conditions"][-1]["condition2"]["layer_energy_at_T"]) == 4
    probe, c2 = summary["conditions"][-1]["condition2"], summary["checks"]["condition2"]
    assert len(probe["update_error"]) == 4 and probe["probed_batches"] == len(probe["batches"]) == 2
    logged = [row["cond2/update_error_max"] for row in data["history"] if "cond2/update_error_max" in row]
    assert logged == [r["condition2"]["update_error_max"] for r in summary["conditions"]]
    assert c2["worst_update_error"] == max(logged) and f"layer {c2['worst_layer']}'s update is " in c2["reason"]
    # the same numbers locally
    assert len(json.loads((run_dir / "histograms.json").read_text())) == 2
    traces = json.loads((run_dir / "energy_traces.json").read_text())["traces"]
    assert sorted(traces) == ["0", "1"] and len(traces["0"]) == 16 + 1


def test_three_jobs_make_three_wandb_runs_of_one_sweep_on_one_axis_and_one_summary(tmp_path):
    result = pcsweep(tmp_path, "-m", *SMALL, "algo=bp,pc", "relax=none,2", env=offline(tmp_path))
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "default"
    folders = [d for d in sweep.iterdir() if d.is_dir() and d.name != "report" and offline_runs(d)]
    data = {d.name: read_run(offline_runs(d)[0]) for d in folders}
    runs = [run["run"] for run in data.values()]
    assert len(runs) == 3 and len({r.run_id for r in runs}) == 3
    for d in folders:  # one group per family (a seed of it would join it), one sweep tag for all
        assert data[d.name]["run"].run_group == family_name(
            settings_from_container(yaml.safe_load((d / "config.yaml").read_text()))
        )
    assert len({r.run_group for r in runs}) == 3
    (sweep_tag,) = {t for r in runs for t in r.tags if t.startswith("sweep=")}
    assert sweep_tag.startswith("sweep=default-")
    assert sorted(r.job_type for r in runs) == ["bp", "pc", "pc_rc2"]
    # BP and PC curves overlay: the same x (batches trained), however many optimizer steps PC takes per batch
    by_twin = {run["run"].job_type: run for run in data.values()}
    bp_folder = next(d for d in folders if data[d.name]["run"].job_type == "bp")
    bp_summary = json.loads((bp_folder / "summary.json").read_text())
    batches = bp_summary["history"][0]["step"] + 1  # the index of epoch 0's last batch
    for twin, run in by_twin.items():
        assert [row[STEP] for row in run["history"] if "test/acc" in row] == [batches - 1, 2 * batches - 1], twin
        folder = next(d for d in folders if data[d.name]["run"].job_type == twin)  # summary.json: the same axis
        summary = json.loads((folder / "summary.json").read_text())
        assert [record["step"] for record in summary["history"]] == [batches - 1, 2 * batches - 1], twin
        assert max(row[STEP] for row in run["history"]) == 2 * batches - 1, twin
    (report_file,) = offline_runs(sweep / "report")  # the report's figures: the sweep's group and tag
    report = read_run(report_file)
    assert report["run"].job_type == "report" and report["run"].run_group == sweep_tag.split("=", 1)[1]
    assert list(report["run"].tags) == [sweep_tag]
    (folder,) = [a for a in report["artifacts"] if a["type"] == "report"]  # the report itself, to download
    assert {"report.html", "report.md", "claims.json"} <= set(folder["files"])
    assert any(f.endswith(".png") for f in folder["files"]) and not any("/" in f for f in folder["files"])
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
    result = pcsweep(tmp_path, *SMALL, "logger.wandb.init_timeout=5", env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert time.time() - start < 120
    assert "logging offline" in result.stdout
    (run_dir,) = [p for p in (tmp_path / "multirun" / "default").iterdir() if p.is_dir()]
    (run_file,) = offline_runs(run_dir)
    assert read_run(run_file)["run"].display_name == "pc_24_3_digits"
