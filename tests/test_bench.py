"""The benchmark's bookkeeping: its floor counts exactly the products the engine runs, and its report is complete."""

import json
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcsweep.bench import floor, peers
from pcsweep.bench import tables as bench
from pcsweep.bench.setup import TWINS, Setup, make_batch, make_twin, sgd
from pcsweep.pc import Inference, PCEngine


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every matrix product that runs, in-place and out= forms included."""

    PRODUCTS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        if name in self.PRODUCTS:
            i, j = self.PRODUCTS[name]
            a, b = args[i], args[j]
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("twin", list(TWINS))
def test_floor_counts_exactly_the_engines_matmul_flops(twin):
    setup = Setup(width=32, depth=4, batch=8, steps=16, every=4, n_in=20, n_out=10, device=torch.device("cpu"))
    mlp, log_vars, net, every = make_twin(setup, twin)
    engine = PCEngine(net, Inference(steps=setup.steps, step_size=0.05, update_every=every))
    opt = sgd(mlp, log_vars)
    x, y = make_batch(setup)
    engine.train_batch(x, y, opt.step)  # warm: buffers allocated
    with MatmulFlops() as counter:
        result = engine.train_batch(x, y, opt.step)
    assert counter.flops > 0
    assert counter.flops == floor.flops(floor.matmul_shapes(setup, result.updates))


def test_bench_quick_run_reports_every_measure(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--widths",
            "16",
            "--depth",
            "2",
            "--steps",
            "8",
            "--every",
            "4",
            "--input",
            "20",
            "--quick",
            "--pipeline-batches",
            "3",
            "--packs",
            "1",
            "3",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["machine"]["best_matmul_gflops"] > 0
    width = report["widths"]["16"]
    assert width["bp_ms"] > 0 and set(width["twins"]) == set(TWINS)
    for row in width["twins"].values():
        assert row["ms_per_batch"] > 0 and 0 < row["floor_ms"] and row["efficiency"] > 0
        assert row["speedup_vs_autograd"] > 0 and row["pc_bp_flops"] > 1
    assert width["twins"]["pc_rc2"]["updates"] == 2 and width["twins"]["pc"]["updates"] == 1
    assert width["pipeline"]["lightning_s"] > 0 and width["pipeline"]["raw_s"] > 0
    # each engine trick measured against the engine with all of them (width 16 on a CPU: the transposed copy)
    assert set(width["tricks"]) == {"all tricks", "no error front", "no transposed copy", "plain reference"}
    assert all(ms > 0 for ms in width["tricks"].values())
    assert 0 < width["pipeline"]["engine_in_lightning_s"] < width["pipeline"]["lightning_s"]
    grid = report["paper_grid"]
    assert grid["runs"] == 2 * 5  # 2 datasets x (bp + 4 PC twins) at the one width measured
    batches = 2 * 20 * 938
    expected = (width["bp_ms"] + sum(r["ms_per_batch"] for r in width["twins"].values()) * 256 / 8) / 1e3 * batches
    assert grid["hours"] == pytest.approx(expected / 3600)
    # R runs as one computation against one by one, and the tuned grid at the largest pack's speed-up
    packs = width["packs"]
    assert set(packs) == {"1", "3"} and all(row["packed_ms"] > 0 and row["one_by_one_ms"] > 0 for row in packs.values())
    assert packs["3"]["speedup"] == pytest.approx(packs["3"]["one_by_one_ms"] / packs["3"]["packed_ms"])
    # the solvers table: pc and pc_rc3 with each solver stopped at one residual; the grid with them converged
    solvers = width["solvers"]
    assert set(solvers) == {"pc", "pc_rc3"} and all(set(t["solvers"]) == {"state", "error"} for t in solvers.values())
    converged = {t: solvers[t]["solvers"]["error"]["ms_per_batch"] for t in solvers}
    at_t = {t: r["ms_per_batch"] * 256 / 8 for t, r in width["twins"].items() if t not in solvers}
    expected = (width["bp_ms"] + sum(converged.values()) + sum(at_t.values())) / 1e3 * batches
    assert grid["hours_converged"] == pytest.approx(expected / 3600)
    tuned = report["tuned_grid"]
    assert tuned["hours_one_by_one"] == pytest.approx(grid["hours_converged"] * 15)  # 14 trials + the run, each family
    assert grid["hours"] < tuned["hours_packed"] < tuned["hours_one_by_one"] or packs["3"]["speedup"] < 1
    assert tuned["packs_slower"] == (packs["3"]["speedup"] < 1)  # then the line says pack.size=auto leaves them


def test_peer_figure_is_the_best_xla_runtime_and_failures_are_one_line(monkeypatch, capsys):
    setup = Setup(width=16, depth=2, batch=8, steps=8, every=4, n_in=784, n_out=10, device=torch.device("cpu"))
    runs = {
        "": {"pcx_version": "0.6.3", "jax_version": "0.4.38", "ms_per_batch": {"converged": 30.0, "every": 12.0}},
        "--xla_cpu_use_thunk_runtime=false": {
            "pcx_version": "0.6.3",
            "jax_version": "0.4.38",
            "ms_per_batch": {"converged": 20.0, "every": 40.0},
        },
    }
    monkeypatch.setattr(peers, "run_pcx", lambda setup, threads, repeats, loop, flags, python: runs[flags])
    peer = peers.time_pcx(setup, 2, 3, "scan")
    assert peer["best"] == {
        "converged": {"ms_per_batch": 20.0, "runtime": "legacy"},
        "every": {"ms_per_batch": 12.0, "runtime": "default"},
    }
    monkeypatch.setattr(peers, "run_pcx", lambda *args: {"error": "pcx missing"})
    assert peers.time_pcx(setup, 2, 3, "scan")["error"] == "pcx missing"
    other = Setup(width=16, depth=2, batch=8, steps=8, every=4, n_in=20, n_out=10, device=torch.device("cpu"))
    assert "784 inputs" in peers.time_pcx(other, 2, 3, "scan")["error"]

    # in the report: each schedule's best beside the twin that does the same work
    monkeypatch.setattr(peers, "run_pcx", lambda setup, threads, repeats, loop, flags, python: runs[flags])
    report = bench.main(
        [
            "--widths",
            "16",
            "--depth",
            "2",
            "--steps",
            "8",
            "--every",
            "4",
            "--quick",
            "--no-reference",
            "--no-pipeline",
            "--twins",
            "pc",
            "pc_rc2",
            "--peers",
        ]
    )
    twins = report["widths"]["16"]["twins"]
    assert twins["pc"]["pcx_ms"] == 20.0 and twins["pc_rc2"]["pcx_ms"] == 12.0
    assert twins["pc"]["speedup_vs_pcx"] == pytest.approx(20.0 / twins["pc"]["ms_per_batch"])
    assert "legacy XLA runtime" in capsys.readouterr().out


@pytest.mark.slow
def test_real_pcx_peer_runs_and_agrees_with_plain_jax():
    pytest.importorskip("pcx", reason="the peer library is an optional extra: pip install 'pcsweep[peers]'")
    import subprocess

    check = subprocess.run([sys.executable, "-m", "pcsweep.bench.pcx_mlp", "--check"], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr
    setup = Setup(width=32, depth=2, batch=8, steps=8, every=4, n_in=784, n_out=10, device=torch.device("cpu"))
    peer = peers.run_pcx(setup, threads=1, repeats=2, loop="scan", xla_flags="", python=sys.executable)
    assert peer["pcx_version"] == "0.6.3" and peer["width"] == 32
    assert set(peer["ms_per_batch"]) == {"converged", "every"} and min(peer["ms_per_batch"].values()) > 0
