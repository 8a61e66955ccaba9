"""The benchmark's bookkeeping: its floor counts exactly the products the engine runs, and its report is complete."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcsweep import bench
from pcsweep.pc import PCEngine, mkl_packing_available


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every matrix product that runs, in-place and out= forms included."""

    PRODUCTS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}
    PACKED = "_mkl_linear"  # (input, packed weight, weight (n x k), bias, batch)

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
        elif name == self.PACKED:
            a, w = args[0], args[2]
            self.flops += 2 * a.shape[0] * a.shape[1] * w.shape[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("products", ["batched", pytest.param("mkl", marks=pytest.mark.skipif(
    not mkl_packing_available(torch.empty(0)), reason="this torch has no MKL packed GEMM"))])
@pytest.mark.parametrize("twin", list(bench.TWINS))
def test_floor_counts_exactly_the_engines_matmul_flops(twin, products):
    setup = bench.Setup(width=32, depth=4, batch=8, steps=16, every=4, n_in=20, n_out=10, device=torch.device("cpu"))
    mlp, log_vars, net, every = bench.make_twin(setup, twin)
    engine = PCEngine(net, steps=setup.steps, step_size=0.05, update_every=every, products=products)
    opt = bench.sgd(mlp, log_vars)
    x, y = bench.make_batch(setup)
    engine.train_batch(x, y, opt.step)  # warm: buffers allocated
    with MatmulFlops() as counter:
        result = engine.train_batch(x, y, opt.step)
    assert counter.flops > 0
    assert counter.flops == bench.flops(bench.matmul_shapes(setup, result.updates))


def test_bench_quick_run_reports_every_measure(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--widths", "16", "--depth", "2", "--steps", "8", "--every", "4", "--input", "20", "--quick",
                         "--pipeline-batches", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["machine"]["best_matmul_gflops"] > 0
    width = report["widths"]["16"]
    assert width["bp_ms"] > 0 and set(width["twins"]) == set(bench.TWINS)
    for row in width["twins"].values():
        assert row["ms_per_batch"] > 0 and 0 < row["floor_ms"] and row["efficiency"] > 0
        assert row["plan"] == "batched" and row["batched_ms"] == row["ms_per_batch"]  # narrow: no other plan
        assert row["speedup_vs_autograd"] > 0 and row["pc_bp_flops"] > 1
    assert width["twins"]["pc_rc2"]["updates"] == 2 and width["twins"]["pc"]["updates"] == 1
    assert width["pipeline"]["lightning_s"] > 0 and width["pipeline"]["raw_s"] > 0
