"""``python -m pcsweep.bench``: how fast PC trains here, against the floor, the reference and the pipeline, in one run.

For each width it prints, per twin, the milliseconds per training batch of the engine the Lightning module uses;
the matmul floor (exactly the products that batch needs, each by the fastest kernel this machine has for its shape,
timed alone in this run) and the efficiency floor/actual; the PC/BP time ratio beside the FLOP ratio; the speedup
over the plain autograd implementation of the same energy (``pcsweep.pc.reference``); the pipeline's cost (one epoch
through the Lightning module versus the raw engine on the same batches); and with ``--peers``, PCX on the same
workload under each XLA CPU runtime. Speed claims are ratios measured in the same run; the absolute numbers are
for comparing machines (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from typing import Any, Optional

import torch

from pcsweep.bench.engine import time_bp, time_engine, time_reference, time_tricks
from pcsweep.bench.floor import best_matmul_rate, bp_flops, flops, matmul_floor, matmul_shapes
from pcsweep.bench.packs import PACKS, measure_packs
from pcsweep.bench.peers import PEER_SCHEDULES, time_pcx
from pcsweep.bench.pipeline import time_pipeline
from pcsweep.bench.projections import paper_grid_hours, tuned_grid_hours
from pcsweep.bench.setup import TWINS, Setup
from pcsweep.bench.solvers import measure_solvers

# ------------------------------------------------------------------------------------------------ main
HEADER = (
    f"{'model':<16}{'ms/batch':>10}{'floor ms':>10}{'floor/act':>10}{'GFLOP/s':>9}{'PC/BP time':>11}"
    f"{'PC/BP FLOP':>11}{'vs autograd':>12}"
)


def measure_twin(setup: Setup, twin: str, bp_seconds: float, args: argparse.Namespace, repeats: int) -> dict:
    """One row of the width's table: the engine's time against the matmul floor, BP and the autograd reference."""
    seconds, updates = time_engine(setup, twin, repeats)
    shapes = matmul_shapes(setup, updates)
    floor = matmul_floor(shapes, setup.device, 3 if args.quick else 5)
    ref_seconds = time_reference(setup, twin, 1 if args.quick else 2) if not args.no_reference else math.nan
    work = flops(shapes)
    row = {
        "ms_per_batch": seconds * 1e3,
        "floor_ms": floor * 1e3,
        "efficiency": floor / seconds,
        "gflops": work / seconds / 1e9,
        "updates": updates,
        "pc_bp_time": seconds / bp_seconds,
        "pc_bp_flops": work / bp_flops(setup),
        "reference_ms": ref_seconds * 1e3,
        "speedup_vs_autograd": ref_seconds / seconds,
    }
    speedup = f"{row['speedup_vs_autograd']:>11.2f}x" if not math.isnan(ref_seconds) else f"{'-':>12}"
    print(
        f"{twin + '_' + str(setup.width) + '_' + str(setup.depth):<16}{row['ms_per_batch']:>10.1f}"
        f"{row['floor_ms']:>10.1f}{row['efficiency']:>10.2f}{row['gflops']:>9.0f}"
        f"{row['pc_bp_time']:>10.0f}x{row['pc_bp_flops']:>10.0f}x{speedup}"
    )
    return row


def measure_pipeline(setup: Setup, twin: str, batches: int) -> dict:
    lightning_s, raw_s, inside_s = time_pipeline(setup, twin, batches)
    print(
        f"pipeline ({twin}, {batches} batches): Lightning epoch {lightning_s:.2f} s, raw engine "
        f"{raw_s:.2f} s, overhead {100 * (lightning_s / raw_s - 1):+.1f}%; within the Lightning epoch, "
        f"all but the engine's train_batch: {100 * (lightning_s / inside_s - 1):+.1f}%"
    )
    return {
        "twin": twin,
        "batches": batches,
        "lightning_s": lightning_s,
        "raw_s": raw_s,
        "overhead": lightning_s / raw_s - 1,
        "engine_in_lightning_s": inside_s,
        "overhead_in_epoch": lightning_s / inside_s - 1,
    }


def measure_tricks(setup: Setup, twin: str, repeats: int) -> dict:
    """What each of the engine's tricks buys (pcsweep.pc.engine): the time without it over the time with all."""
    times = time_tricks(setup, twin, repeats)
    base = times["all tricks"]
    parts = [f"{name} {ms:.1f} ms ({ms / base:.2f}x)" for name, ms in times.items() if name != "all tricks"]
    print(f"engine tricks ({twin}): all on {base:.1f} ms/batch; " + "; ".join(parts))
    return times


def measure_peers(setup: Setup, entry: dict, repeats: int, loop: str, python: str) -> dict:
    peer = time_pcx(setup, torch.get_num_threads(), repeats, loop, python)
    if "error" in peer:
        print(f"PCX: not measured: {peer['error']}")
        return peer
    for schedule, twin in PEER_SCHEDULES.items():
        if twin not in entry["twins"]:
            continue
        best, ours = peer["best"][schedule], entry["twins"][twin]["ms_per_batch"]
        entry["twins"][twin]["pcx_ms"] = best["ms_per_batch"]
        entry["twins"][twin]["speedup_vs_pcx"] = best["ms_per_batch"] / ours
        print(
            f"PCX {peer['pcx']} (jax {peer['jax']}, {schedule}, {best['runtime']} XLA runtime, "
            f"{peer['loop']}ed loop): {best['ms_per_batch']:.1f} ms/batch; {twin} is "
            f"{entry['twins'][twin]['speedup_vs_pcx']:.2f}x faster"
        )
    return peer


def measure_width(width: int, args: argparse.Namespace, device: torch.device, repeats: int) -> dict:
    setup = Setup(width, args.depth, args.batch, args.steps, args.every, args.input, 10, device)
    bp_seconds = time_bp(setup, repeats)
    entry: dict[str, Any] = {"bp_ms": bp_seconds * 1e3, "bp_gflop": bp_flops(setup) / 1e9, "twins": {}}
    print(f"width {width}: bp {bp_seconds * 1e3:.2f} ms/batch")
    print(HEADER)
    for twin in args.twins:
        entry["twins"][twin] = measure_twin(setup, twin, bp_seconds, args, repeats)
    if not args.no_tricks:
        entry["tricks"] = measure_tricks(setup, args.twins[0], repeats)
    if not args.no_pipeline:
        entry["pipeline"] = measure_pipeline(setup, args.twins[0], args.pipeline_batches)
    if args.peers:
        entry["pcx"] = measure_peers(setup, entry, repeats, args.peer_loop, args.peer_python)
    if args.packs:
        entry["packs"] = measure_packs(setup, args.twins[0], max(3, repeats // 2), args.packs)
    if not args.no_solvers:
        entry["solvers"] = measure_solvers(setup, args.solver_tolerance, max(3, repeats // 2))
    print()
    return entry


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    rate, rate_shape = best_matmul_rate(device, args.quick)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "best_matmul_gflops": rate,
            "best_matmul_shape": rate_shape,
        },
        "settings": {k: getattr(args, k) for k in ("widths", "depth", "batch", "steps", "every", "input", "quick")},
        "widths": {},
    }
    print(
        f"pcsweep.bench.tables  torch {torch.__version__}  {device}  {torch.get_num_threads()} threads  "
        f"best torch.mm rate {rate:.0f} GFLOP/s ({rate_shape})"
    )
    print(
        f"MLP {args.input} -> {args.depth} x width -> 10, batch {args.batch}, T = {args.steps}, relax 2 every "
        f"{args.every}, float32, SGD; median of {repeats}\n"
    )
    for width in args.widths:
        report["widths"][str(width)] = measure_width(width, args, device, repeats)
    report["paper_grid"] = paper_grid_hours(report, args.steps)
    grid = report["paper_grid"]
    print(
        f"paper grid projected on this device: {grid['hours']:.1f} h ({grid['runs']} runs: the twins measured here "
        f"at widths {', '.join(map(str, args.widths))}, on {grid['datasets']} datasets, {grid['epochs']} epochs of "
        f"{grid['batches_per_epoch']} batches, T = {grid['steps']}; time taken as linear in T)"
    )
    if grid.get("hours_converged") is not None:
        print(
            f"  with pc and pc_rc3 at their default, converged inference (error optimization, the solvers table's "
            f"ms per batch): {grid['hours_converged']:.1f} h; with state descent to the same residual: "
            f"{grid['hours_state']:.1f} h"
        )
    report["tuned_grid"] = tuned = tuned_grid_hours(report, args.steps)
    advice = "pack.size=auto trains runs one by one on a CPU" if device.type == "cpu" else "set pack.size=1"
    print(
        f"tuned (tune=lr, {tuned['trials_per_family']} trials a family): {tuned['hours_one_by_one']:.1f} h one by one, "
        f"{tuned['hours_packed']:.1f} h with PC trials in packs of {max(args.packs or [1])} (measured speed-up)"
        + (f"; packs are slower here: {advice}" if tuned["packs_slower"] else "")
    )
    return report


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pcsweep.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--depth", type=int, default=8, help="hidden layers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64, help="inference steps T")
    parser.add_argument("--every", type=int, default=8, help="relax 2: a weight update every k steps")
    parser.add_argument("--input", type=int, default=784, help="input features (784: MNIST)")
    parser.add_argument("--twins", nargs="+", default=list(TWINS), choices=list(TWINS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pipeline-batches", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke test")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) autograd reference")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the Lightning pipeline measurement")
    parser.add_argument("--no-tricks", action="store_true", help="skip timing the engine with each trick switched off")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also time PCX on the same workload (needs pip install 'pcsweep[peers]'; minutes of XLA compilation)",
    )
    parser.add_argument(
        "--peer-loop",
        choices=("unroll", "scan"),
        default="unroll",
        help="PCX's T loop: unrolled as in its examples, or a scan (compiles in seconds)",
    )
    parser.add_argument(
        "--peer-python",
        default=sys.executable,
        help="the Python of an environment with PCX installed (default: this one)",
    )
    parser.add_argument(
        "--packs", type=int, nargs="*", default=list(PACKS), help="pack sizes R to time against one by one (none: skip)"
    )
    parser.add_argument("--no-solvers", action="store_true", help="skip the inference solvers table")
    parser.add_argument(
        "--solver-tolerance", type=float, default=1e-3, help="the relative residual every solver is stopped at"
    )
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"results written to {args.json}")
    return report
