"""PCX 0.6.3 (JAX) on pcsweep's benchmark workload, so the bench can time a peer library in the same run.

Workload (the one in ``shared/perf-notes.md``): MLP 784 -> ``depth`` hidden layers of ``width`` (tanh) -> 10 with a
linear output layer, written the PCX way (``x = vode(tanh(linear(x)))``, so ``mu_l = tanh(W_l x_{l-1} + b_l)``);
Gaussian vodes (``pxc.se_energy``: 0.5 * ||x_l - mu_l||^2, unit variance) on every hidden layer and on the output,
whose ``h`` is frozen and clamped to a one-hot target; the input is clamped (it is not a vode). One training batch is:

- feedforward initialisation of every vode (``STATUS.INIT``), output clamped;
- ``steps`` inference steps of ``optax.sgd(step)`` on the free vodes' ``h``; the energy is summed over the batch
  (``jax.lax.psum(model.energy(), "batch")`` inside ``pxf.vmap``, as PCX's examples do), so each sample moves on its
  own: ``x <- x - step * dE/dx`` exactly;
- weight updates with ``optax.sgd(lr)`` on the same summed energy scaled by ``1/B`` (= the batch mean): once after the
  last step (schedule ``converged``) or after every ``every``-th step (schedule ``every``), without re-initialising
  the activities in between.

All of it is ONE ``pxf.jit`` function; the Python loop over the steps is unrolled at trace time as in PCX's examples
(``--loop scan`` rolls it into ``pxf.scan`` instead). Timing: two warm-up calls, then ``repeats`` calls each ended by
``block_until_ready``; the median ms per batch is reported (``ms_per_batch``; every timed call in ``ms_all``).
``compile_s`` is the first call (trace + compile + one run, also given as ``first_call_s``) minus that median.
``foreign_cpu`` is the share of all cores' time that OTHER processes used during the timed calls (from /proc; null
when unavailable or the window is too short to tell): anything above a few percent means the numbers are contended.

    python -m pcsweep.bench.pcx_mlp --width 256 --depth 8 --batch 64 --steps 64 --every 8 --repeats 5 \\
        --schedules converged every --threads 2
    python -m pcsweep.bench.pcx_mlp --check

prints one JSON line (or ``ok`` for ``--check``). Needs ``pip install "pcx==0.6.3" "jax[cpu]>=0.4.33,<0.5"``;
everything up to argument parsing works without them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

IN_DIM, OUT_DIM = 784, 10
LOOPS = ("unroll", "scan")  # how train_on_batch runs the T steps (--loop)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pcsweep.bench.pcx_mlp", description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=8, help="number of hidden layers")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=64, help="inference steps T per batch")
    p.add_argument("--every", type=int, default=8, help="k of the 'every' schedule: a weight update every k steps")
    p.add_argument("--step-size", type=float, default=0.1, help="SGD step on the activities")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate on the weights")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (compiling) one")
    p.add_argument("--schedules", nargs="+", choices=("converged", "every"), default=["converged", "every"])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for XLA (pins the process to that many cores; 1 also turns off Eigen threading)",
    )
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="unroll",
        help="unroll the T steps in Python at trace time (PCX examples) or roll them into pxf.scan",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="tiny-net correctness check against plain JAX; prints 'ok'")
    args = p.parse_args(argv)
    if args.steps % args.every:
        p.error("--steps must be a multiple of --every")
    return args


def limit_threads(threads: int | None) -> dict:
    """Must run before jax is imported. XLA's CPU thread pool is sized from the cores this process may run on."""
    info: dict[str, Any] = {"threads": threads, "affinity": None}
    if not threads or threads <= 0:
        return info
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = None
    if cores and threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
        info["affinity"] = cores[:threads]
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            flags = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
            os.environ["XLA_FLAGS"] = flags
    return info


def import_pcx() -> SimpleNamespace:
    # imported here: PCX and JAX are optional extras (pcsweep[peers]), and XLA must start after limit_threads
    try:
        import jax
        import optax
        import pcx
        import pcx.functional as pxf
        import pcx.nn as pxnn
        import pcx.predictive_coding as pxc
        import pcx.utils as pxu
    except ImportError as exc:  # one clear line, no traceback
        sys.exit(
            f"pcsweep.bench.pcx_mlp needs PCX and JAX ({exc}); "
            'install them with: pip install "pcx==0.6.3" "jax[cpu]>=0.4.33,<0.5"'
        )
    return SimpleNamespace(
        jax=jax,
        jnp=jax.numpy,
        optax=optax,
        px=pcx,
        pxf=pxf,
        pxnn=pxnn,
        pxc=pxc,
        pxu=pxu,
        pcx_version=version("pcx"),
        jax_version=jax.__version__,
    )


def build(api: SimpleNamespace):
    """The model and the jitted training batch, written with PCX's own API (as in its MLP examples)."""
    px, pxc, pxnn, pxu = api.px, api.pxc, api.pxnn, api.pxu
    model_class, parts = _model_class(api), _batch_parts(api)

    def make(width: int, depth: int, batch: int, step_size: float, lr: float, seed: int):
        px.RKG.seed(seed)
        model = model_class(width, depth)
        # one untimed eager forward to give every vode its batch shape (PCX's examples do this before training)
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            parts.forward(api.jnp.zeros((batch, IN_DIM)), None, model=model)
        optim_h = pxu.Optim(lambda: api.optax.sgd(step_size))
        optim_w = pxu.Optim(lambda: api.optax.sgd(lr), pxu.M(pxnn.LayerParam)(model))
        return model, optim_w, optim_h

    return make, _train_on_batch(api, parts)


def _model_class(api: SimpleNamespace) -> type:
    """The MLP the PCX way: ``x = vode(tanh(linear(x)))``, a linear output whose vode is clamped to the target."""
    jax, px, pxnn, pxc = api.jax, api.px, api.pxnn, api.pxc

    class Model(pxc.EnergyModule):  # type: ignore[name-defined]  # PCX, imported at run time (import_pcx)
        def __init__(self, width: int, depth: int) -> None:
            super().__init__()
            self.act_fn = px.static(jax.nn.tanh)
            sizes = [IN_DIM] + [width] * depth + [OUT_DIM]
            self.layers = [pxnn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
            self.vodes = [pxc.Vode(pxc.se_energy) for _ in range(depth + 1)]
            self.vodes[-1].h.frozen = True  # the output is clamped: never touched by the activity optimiser

        def __call__(self, x, y=None):
            for vode, layer in zip(self.vodes[:-1], self.layers[:-1]):
                x = vode(self.act_fn(layer(x)))
            x = self.vodes[-1](self.layers[-1](x))  # linear output
            if y is not None:
                self.vodes[-1].set("h", y)
            return self.vodes[-1].get("u")

    return Model


def _batch_parts(api: SimpleNamespace) -> SimpleNamespace:
    """What a training batch is made of: the feedforward pass (``forward``), the free vodes' mask (``free_vodes``),
    and one inference step and one learning step on the energy summed over the batch."""
    jax, pxf, pxnn, pxc, pxu = api.jax, api.pxf, api.pxnn, api.pxc, api.pxu
    vode_axes = pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0))

    @pxf.vmap(vode_axes, in_axes=(0, 0), out_axes=0)
    def forward(x, y, *, model):
        return model(x, y)

    @pxf.vmap(vode_axes, in_axes=(0,), out_axes=(None, 0), axis_name="batch")
    def energy(x, *, model):
        y_ = model(x, None)
        return jax.lax.psum(model.energy(), "batch"), y_  # summed over the batch

    def free_vodes():  # a fresh mask each time: M.to() sets the mapping on the mask itself and returns it
        return pxu.M_hasnot(pxc.VodeParam, frozen=True)

    h_grad = pxf.value_and_grad(free_vodes().to([False, True]), has_aux=True)(energy)
    w_grad = pxf.value_and_grad(pxu.M(pxnn.LayerParam).to([False, True]), has_aux=True)(energy)

    def inference_step(x, *, model, optim_h):
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            (e, _), g = h_grad(x, model=model)
        optim_h.step(model, g["model"])
        return e

    def learning_step(x, *, model, optim_w):
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            (e, _), g = w_grad(x, model=model)
        optim_w.step(model, g["model"], scale_by=1.0 / x.shape[0])  # mean over the batch
        return e

    return SimpleNamespace(
        forward=forward, free_vodes=free_vodes, inference_step=inference_step, learning_step=learning_step
    )


def _train_on_batch(api: SimpleNamespace, parts: SimpleNamespace):
    """One training batch as ONE ``pxf.jit`` function: feedforward init, the T inference steps, the weight updates."""
    pxf, pxc, pxu = api.pxf, api.pxc, api.pxu
    inference_step, learning_step = parts.inference_step, parts.learning_step

    @pxf.jit(static_argnums=(0, 1, 2))
    def train_on_batch(steps, every, loop, x, y, *, model, optim_w, optim_h):
        """Returns (energy at the feedforward init, energy just before the first weight update), both summed."""
        model.train()
        # (INIT, None): back to no status afterwards, so that a pxf.scan carry keeps one structure
        with pxu.step(model, (pxc.STATUS.INIT, None), clear_params=pxc.VodeParam.Cache):
            parts.forward(x, y, model=model)
        optim_h.init(parts.free_vodes()(model))
        if loop == "unroll":
            e_first = e_update = None
            for t in range(1, steps + 1):
                e = inference_step(x, model=model, optim_h=optim_h)
                e_first = e if e_first is None else e_first
                if t % every == 0:
                    e_w = learning_step(x, model=model, optim_w=optim_w)
                    e_update = e_w if e_update is None else e_update
        else:

            def inner(_, *, model, optim_h):
                return (), inference_step(x, model=model, optim_h=optim_h)

            def outer(_, *, model, optim_w, optim_h):
                _, es = pxf.scan(inner, length=every)(model=model, optim_h=optim_h)
                return (), (es[0], learning_step(x, model=model, optim_w=optim_w))

            _, (e_firsts, e_updates) = pxf.scan(outer, length=steps // every)(
                model=model, optim_w=optim_w, optim_h=optim_h
            )
            e_first, e_update = e_firsts[0], e_updates[0]
        optim_h.clear()
        return e_first, e_update

    return train_on_batch


def make_batches(api, n: int, batch: int, seed: int):
    jax, jnp = api.jax, api.jnp
    out = []
    key = jax.random.PRNGKey(seed + 12345)
    for _ in range(n):
        key, kx, ky = jax.random.split(key, 3)
        x = jax.random.uniform(kx, (batch, IN_DIM), dtype=jnp.float32)
        y = jax.nn.one_hot(jax.random.randint(ky, (batch,), 0, OUT_DIM), OUT_DIM, dtype=jnp.float32)
        out.append((x, y))
    return out


def _cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process) from /proc, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            s = f.read().rsplit(")", 1)[1].split()
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], v[3] + v[4], int(s[11]) + int(s[12])
    except (OSError, ValueError, IndexError):
        return None


def foreign_cpu(t0, t1):
    """Share of the machine's CPU time that other processes used between two _cpu_ticks() (contention check)."""
    if t0 is None or t1 is None:
        return None
    busy, idle, own = (b - a for a, b in zip(t0, t1))
    if busy + idle < 50:  # under ~0.5 core-seconds the 10 ms ticks say nothing
        return None
    return round(max(busy - own, 0) / max(busy + idle, 1), 3)


def weights(api, model):
    return [(layer.nn.weight.get(), layer.nn.bias.get()) for layer in model.layers]


def benchmark(args, api) -> dict:
    make, train_on_batch = build(api)
    every_of = {"converged": args.steps, "every": args.every}
    batches = make_batches(api, 4, args.batch, args.seed)
    ms, ms_all, compile_s, first_s, foreign = {}, {}, {}, {}, {}
    for schedule in args.schedules:
        model, optim_w, optim_h = make(args.width, args.depth, args.batch, args.step_size, args.lr, args.seed)

        def call(i, every=every_of[schedule], model=model, optim_w=optim_w, optim_h=optim_h):
            x, y = batches[i % len(batches)]
            out = train_on_batch(args.steps, every, args.loop, x, y, model=model, optim_w=optim_w, optim_h=optim_h)
            api.jax.block_until_ready((out, api.jax.tree_util.tree_leaves(model)))

        t0 = time.perf_counter()
        call(0)  # trace + compile + one run
        first = time.perf_counter() - t0
        for i in range(args.warmup):
            call(i + 1)
        times = []
        ticks = _cpu_ticks()
        for i in range(args.repeats):
            t0 = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - t0)
        foreign[schedule] = foreign_cpu(ticks, _cpu_ticks())
        med = statistics.median(times)
        ms[schedule] = round(med * 1e3, 3)
        ms_all[schedule] = [round(t * 1e3, 1) for t in times]
        first_s[schedule] = round(first, 3)
        compile_s[schedule] = round(first - med, 3)
    # foreign_cpu: share of all cores' time taken by OTHER processes during the timed calls (0 = a quiet machine)
    return {
        "ms_per_batch": ms,
        "ms_all": ms_all,
        "compile_s": compile_s,
        "first_call_s": first_s,
        "foreign_cpu": foreign,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = limit_threads(args.threads)
    api = import_pcx()
    if args.check:
        from pcsweep.bench.pcx_check import check

        check(args, api)
        return
    result = {
        "pcx_version": api.pcx_version,
        "jax_version": api.jax_version,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "device": str(api.jax.devices()[0]),
        "width": args.width,
        "depth": args.depth,
        "batch": args.batch,
        "steps": args.steps,
        "every": args.every,
        "repeats": args.repeats,
        "loop": args.loop,
        **threads,
    }
    result.update(benchmark(args, api))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
