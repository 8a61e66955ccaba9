"""The bench's floor: the matrix products a training batch needs (``matmul_shapes``) and their FLOPs, timed as
bare products at the best rate this device reaches: no implementation of the same products can be faster."""

from __future__ import annotations

import math
from typing import Callable

import torch

from pcsweep.bench.setup import Setup, median_seconds


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
