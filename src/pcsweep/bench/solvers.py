"""``python -m pcsweep.bench``'s solvers table: converged inference (pc, pc_rc3) with each ``inference.solver``, every
one stopped at the same relative residual |dE/dx| / |dE/dx|_0, on digits28 batches: steps used, the residual
reached, and ms per trained batch; the ratio is the speed-up over state descent measured in the same run."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from pcsweep.bench.setup import Setup, make_batch, make_twin, median_seconds, sgd
from pcsweep.config.settings import AUTO_STEP_FRACTION
from pcsweep.data.datasets import load_digits28
from pcsweep.pc import Inference, PCEngine
from pcsweep.pc.stability import preflight_stability

CONVERGED_TWINS = ("pc", "pc_rc3")
# each solver as the twins' settings run it: state descent as the paper's dynamics with pcsweep's heavy ball and
# automatic step (0.8 of the stability limit at the measured curvature), error optimization as the default
SOLVERS = {
    "state": Inference(steps=256, momentum=0.95, solver="state", check_every=4),
    "error": Inference(steps=256, solver="error", check_every=4),
}


def digits28_batches(setup: Setup, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` training batches of digits28 (784 inputs: the bench's MNIST-sized layer); another input
    size (a smoke test's) gets the bench's random batches."""
    if setup.n_in != 784:
        return [make_batch(setup, seed=i) for i in range(count)]
    data = load_digits28().train
    batches = []
    for i in range(count):
        x = data.inputs[i * setup.batch : (i + 1) * setup.batch].float().to(setup.device)
        y = F.one_hot(data.labels[i * setup.batch : (i + 1) * setup.batch], 10).float().to(setup.device)
        batches.append((x, y))
    return batches


def solver_batch(setup: Setup, twin: str, solver: str, tolerance: float, batch: tuple):
    """A callable training one batch with ``solver`` (the same initial weights for every solver), and its engine."""
    mlp, log_vars, net, _ = make_twin(setup, twin)
    inference = replace(SOLVERS[solver], tolerance=tolerance)
    engine = PCEngine(net, inference, log_variance_min=-2.0)
    inputs, target = batch
    if solver == "state":  # inference.step_size=auto, set by the run's own pre-flight
        preflight_stability(engine, inputs, target, None, False, "auto", AUTO_STEP_FRACTION)
    opt = sgd(mlp, log_vars)
    return (lambda: engine.train_batch(inputs, target, opt.step)), engine


def measure_solvers(setup: Setup, tolerance: float, repeats: int, batches: int = 4) -> dict:
    """Per converged twin and solver: mean steps used, worst residual and median ms per batch over ``batches``
    digits28 batches, each trained ``repeats`` times."""
    data = digits28_batches(setup, batches)
    table: dict = {}
    print(f"solvers (digits28, stopped at a relative residual of {tolerance:g}, checks every 4 steps, T = 256):")
    for twin in CONVERGED_TWINS:
        rows = {}
        for solver in SOLVERS:
            steps, residuals, seconds = [], [], 0.0
            for batch in data:
                train, _ = solver_batch(setup, twin, solver, tolerance, batch)
                result = train()
                steps.append(result.steps_used)
                residuals.append(float(result.residual))
                seconds += median_seconds(train, setup.device, repeats, warmup=0)
            rows[solver] = {
                "steps_mean": sum(steps) / len(steps),
                "steps_max": max(steps),
                "residual_max": max(residuals),
                "ms_per_batch": 1e3 * seconds / len(data),
            }
        speedup = rows["state"]["ms_per_batch"] / rows["error"]["ms_per_batch"]
        table[twin] = {"solvers": rows, "speedup_error_over_state": speedup}
        for solver, row in rows.items():
            print(
                f"  {twin + '_' + str(setup.width):<14}{solver:<7}steps {row['steps_mean']:6.1f} (max "
                f"{row['steps_max']:3d})  residual <= {row['residual_max']:.1e}  {row['ms_per_batch']:8.1f} ms/batch"
            )
        print(f"  {twin + '_' + str(setup.width):<14}error optimization is {speedup:.2f}x faster than state descent")
    return table
