"""``python -m pcsweep.bench``'s packing table: R runs of one shape trained as one computation (``PCEngine.of``)
against the same R runs one after another (``PCEngine``, every trick on), and what that makes of the paper's grid."""

from __future__ import annotations

import torch

from pcsweep.bench.setup import Setup, make_batch, make_twin, median_seconds, sgd
from pcsweep.pc import Inference, PCEngine
from pcsweep.pc.members import Member, check_fits

PACKS = (1, 4, 8, 16)
RUN_BATCHES = 20 * 938  # one paper run: 20 MNIST epochs of 938 batches


def pack_timers(setup: Setup, twin: str, members: int):
    """(one packed batch of ``members`` runs, the same runs' batches one after another), each a callable, warmed
    up once. Each run has its own seed, data and optimizer; the bench's inference (T, step 0.05, no tolerance)."""
    check_fits(members, setup.sizes, setup.batch, torch.float32, setup.device)
    solos, packed, packed_optimizers, data = [], [], [], []
    for r in range(members):
        mlp, log_vars, net, every = make_twin(setup, twin, seed=r)
        inference = Inference(steps=setup.steps, step_size=0.05, update_every=every)
        solos.append((PCEngine(net, inference, log_variance_min=-2.0), sgd(mlp, log_vars)))
        mlp, log_vars, net, _ = make_twin(setup, twin, seed=r)
        packed.append(Member(net, inference, log_variance_min=-2.0))
        packed_optimizers.append(sgd(mlp, log_vars))
        data.append(make_batch(setup, seed=r))
    population = PCEngine.of(packed)
    inputs, target = torch.stack([x for x, _ in data]), torch.stack([y for _, y in data])
    steps = [opt.step for opt in packed_optimizers]

    def one_by_one() -> None:
        for (engine, opt), (x, y) in zip(solos, data):
            engine.train_batch(x, y, opt.step)

    def together() -> None:
        population.train_batches(inputs, target, steps)

    one_by_one()
    together()
    return together, one_by_one


def runs_per_hour(seconds_per_batch_per_run: float, steps: int, paper_steps: int = 256) -> float:
    """Paper-scale runs an hour at this time per batch (measured at T = ``steps``; time is about linear in T)."""
    return 3600 / (seconds_per_batch_per_run * RUN_BATCHES * paper_steps / steps)


def measure_packs(setup: Setup, twin: str, repeats: int, packs=PACKS) -> dict:
    """The packing table for one width: ms per batch of all R runs, packed and one by one, and runs per hour."""
    rows = {}
    print(f"packing ({twin}, width {setup.width}): R runs as one computation against one after another")
    print(
        f"{'R':>3} {'packed ms':>10} {'one by one ms':>14} {'speed-up':>9} {'runs/h packed':>14} {'runs/h alone':>13}"
    )
    for members in packs:
        together, one_by_one = pack_timers(setup, twin, members)
        packed_s = median_seconds(together, setup.device, repeats, warmup=0)
        alone_s = median_seconds(one_by_one, setup.device, repeats, warmup=0)
        row = {
            "packed_ms": packed_s * 1e3,
            "one_by_one_ms": alone_s * 1e3,
            "speedup": alone_s / packed_s,
            "runs_per_hour_packed": runs_per_hour(packed_s / members, setup.steps),
            "runs_per_hour_alone": runs_per_hour(alone_s / members, setup.steps),
        }
        rows[str(members)] = row
        print(
            f"{members:>3} {row['packed_ms']:>10.1f} {row['one_by_one_ms']:>14.1f} {row['speedup']:>8.2f}x "
            f"{row['runs_per_hour_packed']:>14.2f} {row['runs_per_hour_alone']:>13.2f}"
        )
        del together, one_by_one
    return rows
