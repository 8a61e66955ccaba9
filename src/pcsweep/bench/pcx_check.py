"""``python -m pcsweep.bench.pcx_mlp --check``: PCX on a tiny net against a plain-JAX transcription of the same
algorithm, so the peer the bench times is known to compute what our twins compute."""

from __future__ import annotations

import sys

from pcsweep.bench.pcx_mlp import build, make_batches, weights

IN_DIM, OUT_DIM = 784, 10
LOOPS = ("unroll", "scan")  # how train_on_batch runs the T steps (--loop)


def check(args, api) -> None:
    """Tiny net: inference lowers the energy, a weight update changes the weights, and one whole PCX batch matches
    a plain-JAX transcription of the algorithm (x <- x - step * dE/dx, E summed; W <- W - lr * dE/dW / B)."""
    width, depth, batch, steps = 16, 2, 4, 4
    step_size, lr = 0.1, 0.05  # a larger lr so the weight change is well above float32 noise
    make, train_on_batch = build(api)
    ((x, y),) = make_batches(api, 1, batch, args.seed)
    for schedule, every in (("converged", steps), ("every", 2)):
        model, optim_w, optim_h = make(width, depth, batch, step_size, lr, args.seed)
        before = weights(api, model)
        e_first, e_update = train_on_batch(steps, every, args.loop, x, y, model=model, optim_w=optim_w, optim_h=optim_h)
        after = weights(api, model)
        e_first, e_update = float(e_first), float(e_update)
        if not e_update < e_first:
            raise AssertionError(f"{schedule}: energy did not decrease with inference: {e_first} -> {e_update}")
        change = _largest_difference(api, after, before)
        if not change > 0:
            raise AssertionError(f"{schedule}: the weight update left the weights unchanged")
        # the same batch in plain JAX from the same initial weights
        ref_first, ref_update, ref_after = _plain_jax_batch(api, x, y, before, steps, every, step_size, lr)
        for name, got, want in (("E at init", e_first, ref_first), ("E at update", e_update, ref_update)):
            if abs(got - want) > 1e-4 * max(1.0, abs(want)):
                raise AssertionError(f"{schedule}: {name}: PCX {got} vs plain JAX {want}")
        err = _largest_difference(api, after, ref_after)
        if err > 1e-5:
            raise AssertionError(f"{schedule}: PCX weights after one batch differ from plain JAX by {err}")
        print(
            f"{schedule}: E {e_first:.6g} -> {e_update:.6g}, max |dW| {change:.3g}, max |W_pcx - W_ref| {err:.2g}",
            file=sys.stderr,
        )
    print("ok")


def _largest_difference(api, after, before) -> float:
    """The largest |difference| between two ``weights`` lists, over every weight and bias."""
    return max(
        float(api.jnp.abs(a - b).max()) for (wa, ba), (wb, bb) in zip(after, before) for a, b in ((wa, wb), (ba, bb))
    )


def _plain_jax_batch(api, x, y, params, steps: int, every: int, step_size: float, lr: float):
    """One training batch in plain JAX from the weights ``params``, the algorithm as written (x <- x - step * dE/dx,
    E summed over the batch; W <- W - lr * dE/dW / B): E at the feedforward init, E just before the first weight
    update, and the weights after the batch."""
    jax, jnp = api.jax, api.jnp
    batch = x.shape[0]

    def hidden_energy(xs, params):
        e, below = 0.0, x
        for (w, b), h in zip(params, xs + [y]):
            a = below @ w.T + b
            mu = a if h is y else jnp.tanh(a)
            e = e + 0.5 * jnp.sum((h - mu) ** 2)
            below = h
        return e

    xs, below = [], x
    for w, b in params[:-1]:
        below = jnp.tanh(below @ w.T + b)
        xs.append(below)
    ref_first = hidden_energy(xs, params)
    ref_update = None
    for t in range(1, steps + 1):
        g = jax.grad(hidden_energy)(xs, params)
        xs = [h - step_size * gh for h, gh in zip(xs, g)]
        if t % every == 0:
            e_ref, gw = jax.value_and_grad(hidden_energy, argnums=1)(xs, params)
            ref_update = e_ref if ref_update is None else ref_update
            params = [(w - lr * gw_ / batch, b - lr * gb_ / batch) for (w, b), (gw_, gb_) in zip(params, gw)]
    assert ref_update is not None  # every <= steps: at least one update
    return float(ref_first), float(ref_update), params
