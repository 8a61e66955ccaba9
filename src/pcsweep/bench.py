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
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F

from pcsweep.bench_packs import PACKS, measure_packs
from pcsweep.bench_setup import TWINS, Setup, make_batch, make_twin, median_seconds, sgd, sync
from pcsweep.bench_solvers import measure_solvers
from pcsweep.data import Dataset, Split
from pcsweep.datamodule import TensorBatches, TensorDataModule
from pcsweep.models import PCModule
from pcsweep.pc import Inference, PCEngine, output_loss
from pcsweep.pc.kernels import NARROW_MAX_WIDTH, PREPACK_AVAILABLE, Tricks
from pcsweep.pc.reference import ReferencePC
from pcsweep.peers.pcx_mlp import IN_DIM, OUT_DIM
from pcsweep.run import quiet_lightning
from pcsweep.settings import InferenceSettings, Settings, TrackingSettings


# ------------------------------------------------------------------------------------------------ FLOPs and floor
def matmul_shapes(setup: Setup, updates: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every product one PC training batch needs, as the engine schedules them.

    Feedforward: every layer once. Each step: predictions of layers 2..L (x_0 is clamped, so W_1 x_0 is reused
    until W_1 changes) and feedbacks into layers 1..L-1 (W_1^T is never needed); until the first update, only
    those above the error front (step t moves the top t hidden layers). Each update: the L weight gradients,
    then the predictions again (the weights changed), W_1 x_0 included unless it was the last step. The residual
    the batch records (without a tolerance: at the feedforward state, the top layer's alone, and at the last step,
    every feedback and the top).
    """
    s, B = setup.sizes, setup.batch
    L = len(s) - 1
    forward_all = [(B, s[l - 1], s[l]) for l in range(1, L + 1)]
    first_update = setup.steps // updates
    shapes = list(forward_all)
    for t in range(1, setup.steps + 1):
        lo = max(L - 1 - t, 0) if t <= first_update else 0  # the lowest hidden row (x_{lo+1}) step t moves
        shapes += [(B, s[l - 1], s[l]) for l in range(lo + 2, L + 1)]  # predictions whose input moved
        shapes += [(B, s[l + 1], s[l]) for l in range(lo + 1, L - 1)] + [(B, s[L], s[L - 1])]  # nonzero feedbacks
    grads = [(s[l], B, s[l - 1]) for l in range(1, L + 1)]
    shapes += updates * grads + (updates - 1) * forward_all  # re-predict after every update but the last
    top = (B, s[L], s[L - 1])
    shapes += [top] + [(B, s[l + 1], s[l]) for l in range(1, L - 1)] + [top]  # the residual, first and last
    return shapes


def flops(shapes: list[tuple[int, int, int]]) -> float:
    return float(sum(2 * m * k * n for m, k, n in shapes))


def bp_flops(setup: Setup) -> float:
    s, B = setup.sizes, setup.batch
    fwd = sum(2 * B * a * b for a, b in zip(s[:-1], s[1:]))
    first = 2 * B * s[0] * s[1]
    return fwd + (2 * fwd - first)  # backward: weight grads for all, input grads for all but the first layer


def product_kernels(m: int, k: int, n: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """Every way this machine can compute one (m x k) @ (k x n) product: ``torch.mm`` with the right operand in
    either memory layout, and MKL's packed-weight GEMM (packing excluded) where it exists."""
    a, b, out = torch.randn(m, k, device=device), torch.randn(k, n, device=device), torch.empty(m, n, device=device)
    b_t = b.t().contiguous()
    kernels: dict[str, Callable[[], object]] = {
        "mm": lambda: torch.mm(a, b, out=out),
        "mm_t": lambda: torch.mm(a, b_t.t(), out=out),
    }
    if device.type == "cpu" and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        packed = torch.ops.mkl._mkl_reorder_linear_weight(b_t, m)
        kernels["mkl_packed"] = lambda: torch.ops.mkl._mkl_linear(a, packed, b_t, None, m)
    return kernels


def matmul_floor(shapes: list[tuple[int, int, int]], device: torch.device, repeats: int) -> float:
    """Time exactly these products, nothing else: each shape by the fastest of ``product_kernels``."""
    distinct: dict[tuple[int, int, int], int] = {}
    for shape in shapes:
        distinct[shape] = distinct.get(shape, 0) + 1
    total = 0.0
    for (m, k, n), count in distinct.items():
        reps = max(5, min(200, int(2e8 / (2 * m * k * n))))
        best = math.inf
        for kernel in product_kernels(m, k, n, device).values():

            def run(kernel=kernel, reps=reps):
                for _ in range(reps):
                    kernel()

            best = min(best, median_seconds(run, device, repeats) / reps)
        total += count * best
    return total


def best_matmul_rate(device: torch.device, quick: bool) -> tuple[float, str]:
    """The best GFLOP/s any of ``product_kernels`` reaches here over a few shapes (square and the engine's)."""
    shapes = [(1024, 1024, 1024), (64, 1024, 1024), (512, 1024, 1024)] + ([] if quick else [(2048, 2048, 2048)])
    best, best_shape = 0.0, ""
    for m, k, n in shapes:
        for name, kernel in product_kernels(m, k, n, device).items():
            seconds = median_seconds(kernel, device, 5 if quick else 11)
            rate = 2 * m * k * n / seconds / 1e9
            if rate > best:
                best, best_shape = rate, f"{m}x{k}x{n} {name}"
    return best, best_shape


# ------------------------------------------------------------------------------------------------ measurements
def engine_batch(setup: Setup, twin: str, tricks: Tricks = Tricks(), reference: Optional[str] = None):
    """A callable training one batch of ``twin`` (the engine, or the plain/autograd reference), warmed up once,
    and the weight updates a batch makes."""
    mlp, log_vars, net, every = make_twin(setup, twin)
    inference = Inference(steps=setup.steps, step_size=0.05, update_every=every)
    engine: PCEngine | ReferencePC
    if reference is None:
        engine = PCEngine(net, inference, log_variance_min=-2.0, tricks=tricks)
    else:
        engine = ReferencePC(net, inference, reference)
    opt = sgd(mlp, log_vars)
    x, y = make_batch(setup)
    result = engine.train_batch(x, y, opt.step)
    return (lambda: engine.train_batch(x, y, opt.step)), result.updates


def time_engine(setup: Setup, twin: str, repeats: int, tricks: Tricks = Tricks()) -> tuple[float, int]:
    """(seconds per training batch, weight updates per batch)."""
    batch, updates = engine_batch(setup, twin, tricks)
    return median_seconds(batch, setup.device, repeats, warmup=0), updates


def time_tricks(setup: Setup, twin: str, repeats: int) -> dict[str, float]:
    """ms per batch of ``twin`` with every engine trick on, with each applicable one off in turn, and through the
    plain reference (per-layer lists, no buffers: none of the tricks). The variants take turns, ``repeats`` rounds,
    and each keeps its best round: a ratio is measured under the same drift of the machine."""
    narrow = setup.device.type == "cpu" and setup.width <= NARROW_MAX_WIDTH
    wide = setup.device.type == "cpu" and not narrow and torch.get_num_threads() > 1
    variants = {"all tricks": Tricks(), "no error front": Tricks(error_front=False)}
    if narrow:
        variants["no transposed copy"] = Tricks(transposed_copy=False)
    if wide:
        variants["no thread balance, no prepacking"] = Tricks(thread_balance=False, prepacked=False)
    if setup.device.type == "cpu" and not narrow and PREPACK_AVAILABLE:
        variants["no prepacked weights"] = Tricks(prepacked=False)
    batches = {name: engine_batch(setup, twin, tricks)[0] for name, tricks in variants.items()}
    batches["plain reference"] = engine_batch(setup, twin, reference="plain")[0]
    best = {name: math.inf for name in batches}
    for _ in range(max(repeats, 2)):
        for name, batch in batches.items():
            best[name] = min(best[name], median_seconds(batch, setup.device, 1, warmup=0) * 1e3)
    return best


def time_reference(setup: Setup, twin: str, repeats: int, gradients: str = "autograd") -> float:
    batch, _ = engine_batch(setup, twin, reference=gradients)
    return median_seconds(batch, setup.device, repeats, warmup=0)


def time_bp(setup: Setup, repeats: int) -> float:
    mlp, log_vars, _, _ = make_twin(setup, "pc")
    opt = sgd(mlp, None)
    x, y = make_batch(setup)

    def step():
        opt.zero_grad()
        output_loss(mlp(x), y, "mse").backward()
        opt.step()

    return median_seconds(step, setup.device, repeats * 5, warmup=3)


def pipeline_module(setup: Setup, twin: str):
    """The Lightning PC module on the bench's workload (SGD 1e-3, plain descent, fixed floor, no tracking)."""
    every, variance = TWINS[twin]
    settings = Settings(
        width=setup.width,
        depth=setup.depth,
        seed=0,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1e-3},
        inference=InferenceSettings(
            steps=setup.steps, step_size=0.05, momentum=0.0, update_every=setup.every if every else None
        ),
        variance="neuron" if variance else "fixed",
        log_variance_min=-2.0,
        tracking=TrackingSettings(energy_trace=False, alignment_every=0),
    )
    return PCModule(settings, setup.n_in, setup.n_out)


class _EpochClock(L.Callback):
    """Wall time of the training epoch, the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.seconds = device, 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        sync(self.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def _lightning_epoch(setup: Setup, twin: str, dataset: Dataset) -> tuple[float, float]:
    """One epoch through Lightning's Trainer: its wall time, and the time the engine's ``train_batch`` took in it."""
    clock, pc_module = _EpochClock(setup.device), pipeline_module(setup, twin)
    engine_seconds, train_batch = [0.0], pc_module.engine.train_batch

    def timed_train_batch(*args, **kwargs):
        sync(setup.device)
        start = time.perf_counter()
        result = train_batch(*args, **kwargs)
        sync(setup.device)
        engine_seconds[0] += time.perf_counter() - start
        return result

    pc_module.engine.train_batch = timed_train_batch
    trainer = L.Trainer(
        max_epochs=1,
        accelerator=setup.device.type,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(pc_module, datamodule=TensorDataModule(dataset, setup.batch, seed=0))
    return clock.seconds, engine_seconds[0]


def time_pipeline(setup: Setup, twin: str, batches: int) -> tuple[float, float, float]:
    """One epoch of ``batches`` batches: through the Lightning PC module, through the raw engine, and the time the
    engine's ``train_batch`` took inside that Lightning epoch (the rest of the epoch is the pipeline's own cost,
    measured free of the machine's drift between epochs)."""
    quiet_lightning()
    n = batches * setup.batch
    gen = torch.Generator().manual_seed(1)
    split = Split(torch.rand(n, setup.n_in, generator=gen), torch.randint(0, setup.n_out, (n,), generator=gen))
    dataset = Dataset("bench", split, Split(split.inputs[: setup.batch], split.labels[: setup.batch]), setup.n_out)
    raw = pipeline_module(setup, twin).to(setup.device)
    opt = torch.optim.SGD(raw.configure_optimizers().param_groups, lr=1e-3)
    batches_on_device = TensorBatches(split.to(setup.device), setup.batch, shuffle=True, seed=0)

    def raw_epoch() -> float:
        sync(setup.device)
        start = time.perf_counter()
        for inputs, labels in batches_on_device:
            raw.engine.train_batch(inputs, F.one_hot(labels, setup.n_out).float(), opt.step)
        sync(setup.device)
        return time.perf_counter() - start

    # alternate which goes first, so that neither side gets all the warm caches or one phase of the machine's
    # drift (+-10% over minutes here): the best of three each
    raw_seconds: list[float] = []
    lightning_runs: list[tuple[float, float]] = []  # (lightning seconds, engine seconds)
    for rounds in range(3):
        for first in (True, False) if rounds % 2 == 0 else (False, True):
            if first:
                raw_seconds.append(raw_epoch())
            else:
                lightning_runs.append(_lightning_epoch(setup, twin, dataset))
    lightning_seconds, engine_seconds = min(lightning_runs)
    return lightning_seconds, min(raw_seconds), engine_seconds


# ------------------------------------------------------------------------------------------------ peers
XLA_RUNTIMES = {"default": "", "legacy": "--xla_cpu_use_thunk_runtime=false"}  # perf-notes: each wins somewhere
PEER_SCHEDULES = {"converged": "pc", "every": "pc_rc2"}  # PCX schedule -> our twin with the same work


def run_pcx(setup: Setup, threads: int, repeats: int, loop: str, xla_flags: str, python: str) -> dict:
    """One ``pcsweep.peers.pcx_mlp`` process (a fresh XLA, its own flags) under ``python`` (an environment with PCX,
    which need not have torch: the peer imports no torch); its JSON, or ``{"error": line}``."""
    command = [
        python,
        "-m",
        "pcsweep.peers.pcx_mlp",
        "--width",
        str(setup.width),
        "--depth",
        str(setup.depth),
        "--batch",
        str(setup.batch),
        "--steps",
        str(setup.steps),
        "--every",
        str(setup.every),
        "--step-size",
        "0.05",
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
        "--loop",
        loop,
    ]
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
    if python != sys.executable:  # another environment: it finds this pcsweep's peer module on its path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_pcx(setup: Setup, threads: int, repeats: int, loop: str, python: str = sys.executable) -> dict:
    """PCX on the same workload under each XLA CPU runtime; the best per schedule is its figure."""
    if (setup.n_in, setup.n_out) != (IN_DIM, OUT_DIM):
        return {"error": f"the PCX peer is written for {IN_DIM} inputs and {OUT_DIM} outputs (MNIST)"}
    runs = {name: run_pcx(setup, threads, repeats, loop, flags, python) for name, flags in XLA_RUNTIMES.items()}
    ok = {name: r for name, r in runs.items() if "error" not in r}
    if not ok:
        return {"error": next(iter(runs.values()))["error"], "runs": runs}
    best = {}
    for schedule in PEER_SCHEDULES:
        runtime = min(ok, key=lambda name: ok[name]["ms_per_batch"][schedule])
        best[schedule] = {"ms_per_batch": ok[runtime]["ms_per_batch"][schedule], "runtime": runtime}
    version = next(iter(ok.values()))
    return {"pcx": version["pcx_version"], "jax": version["jax_version"], "loop": loop, "best": best, "runs": runs}


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
        f"pcsweep.bench  torch {torch.__version__}  {device}  {torch.get_num_threads()} threads  "
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


PAPER_GRID = {"datasets": 2, "epochs": 20, "batches_per_epoch": 938, "steps": 256}  # MNIST/FashionMNIST, batch 64


def twin_seconds(entry: dict, twin: str, steps: int, solver: Optional[str] = None) -> float:
    """Seconds a batch of ``twin`` takes at the paper's schedule: from this run's ms per batch scaled from its T to
    the paper's (the work per step is constant), or, for pc and pc_rc3 with ``solver``, the solvers table's converged
    ms per batch (inference stopped at the table's residual)."""
    converged = (entry.get("solvers") or {}).get(twin)
    if solver is not None and converged is not None:
        return converged["solvers"][solver]["ms_per_batch"] / 1e3
    return entry["twins"][twin]["ms_per_batch"] / 1e3 * PAPER_GRID["steps"] / steps


def paper_grid_hours(report: dict, steps: int) -> dict:
    """Wall time of the paper's grid (every measured width x twin, BP included, on both datasets) from this run's
    ms per batch: every PC twin at T = 256 (``hours``), and with pc and pc_rc3 at converged inference by each solver
    (``hours_converged``: error optimization, the default; ``hours_state``), when the solvers table was measured."""
    batches = PAPER_GRID["datasets"] * PAPER_GRID["epochs"] * PAPER_GRID["batches_per_epoch"]
    widths = report["widths"].values()
    bp = sum(entry["bp_ms"] / 1e3 * batches for entry in widths)

    def total(solver: Optional[str]) -> float:
        return bp + sum(twin_seconds(e, twin, steps, solver) * batches for e in widths for twin in e["twins"])

    measured = all("solvers" in entry for entry in widths)
    return {
        "hours": total(None) / 3600,
        "runs": sum(PAPER_GRID["datasets"] * (1 + len(entry["twins"])) for entry in widths),
        "hours_converged": total("error") / 3600 if measured else None,
        "hours_state": total("state") / 3600 if measured else None,
        **PAPER_GRID,
    }


TUNING_TRIALS = 7 * 2  # tune=lr's default: 7 candidates x 2 seeds for every family


def tuned_grid_hours(report: dict, steps: int) -> dict:
    """The paper's grid with ``tune=lr`` in front: every family's 14 trials on top of its run, trained one by one,
    or (PC) in packs at the speed-up the packing table measured for the width's largest pack."""
    batches = PAPER_GRID["datasets"] * PAPER_GRID["epochs"] * PAPER_GRID["batches_per_epoch"]
    alone = packed = 0.0
    for entry in report["widths"].values():
        bp = entry["bp_ms"] / 1e3 * batches
        solver = "error" if "solvers" in entry else None  # pc and pc_rc3 at their default, converged inference
        pc = sum(twin_seconds(entry, twin, steps, solver) for twin in entry["twins"]) * batches
        packs = entry.get("packs") or {}
        speedup = packs[max(packs, key=int)]["speedup"] if packs else 1.0
        alone += (1 + TUNING_TRIALS) * (bp + pc)  # both datasets (in ``batches``), every twin of the width
        packed += bp + pc + TUNING_TRIALS * (bp + pc / speedup)
    return {
        "trials_per_family": TUNING_TRIALS,
        "hours_one_by_one": alone / 3600,
        "hours_packed": packed / 3600,
        "packs_slower": packed > alone,
    }


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
        "--solver-tolerance", type=float, default=3e-3, help="the relative residual every solver is stopped at"
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


if __name__ == "__main__":
    main()
