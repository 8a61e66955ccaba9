"""PCX on the bench's workload (``pcsweep.bench.pcx_mlp`` in a process of its own, with its XLA flags), for
``--peers``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pcsweep.bench.pcx_mlp import IN_DIM, OUT_DIM
from pcsweep.bench.setup import Setup

# ------------------------------------------------------------------------------------------------ peers
XLA_RUNTIMES = {"default": "", "legacy": "--xla_cpu_use_thunk_runtime=false"}  # perf-notes: each wins somewhere
PEER_SCHEDULES = {"converged": "pc", "every": "pc_rc2"}  # PCX schedule -> our twin with the same work


def run_pcx(setup: Setup, threads: int, repeats: int, loop: str, xla_flags: str, python: str) -> dict:
    """One ``pcsweep.bench.pcx_mlp`` process (a fresh XLA, its own flags) under ``python`` (an environment with PCX,
    which need not have torch: the peer imports no torch); its JSON, or ``{"error": line}``."""
    command = [
        python,
        "-m",
        "pcsweep.bench.pcx_mlp",
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
