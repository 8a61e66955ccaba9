"""``python -m pcsweep.bench.update_error``: how far the weight update at inference's stop is from the update at the
equilibrium, per tolerance (the unit the twins' premise is about, not the residual).

On ``digits28`` batches at the paper's depth, for pc (mse and ce) and pc_rc3 (a learned variance), at the initial
weights and after ``--train-batches`` batches of training at the defaults: per tolerance, the worst layer's
``|dW_stop - dW*| / |dW*|`` and the steps used, against the same solver run to a relative residual of 1e-8 (in
float64). The default tolerance is the loosest one whose worst error stays within the bound.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F

from pcsweep.data.datasets import load_digits28
from pcsweep.model.mlp import MLP, make_log_variances
from pcsweep.pc import Inference, PCEngine

CASES = {"pc": ("mse", False), "pc_ce": ("ce", False), "pc_rc3": ("mse", True)}  # name -> (output loss, learned S)


def weight_updates(engine: PCEngine) -> list[torch.Tensor]:
    engine.write_gradients()
    return [w.grad.detach().clone() for w in engine.net.weights if w.grad is not None]


def worst_update_error(net, inference: Inference, reference: list, inputs, target) -> tuple[float, int]:
    """(worst layer's relative update error, steps) of ``inference`` on ``net`` against the ``reference`` update."""
    engine = PCEngine(copy.deepcopy(net), inference)
    result = engine.train_batch(inputs, target, lambda: None)
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(weight_updates(engine), reference) if b.norm() > 0]
    return max(errors), result.steps_used


def exact_update(net, inference: Inference, inputs, target) -> list[torch.Tensor]:
    """The update at the equilibrium: the same solver to a relative residual of 1e-8 (the condition-2 probe's)."""
    engine = PCEngine(copy.deepcopy(net), replace(inference, steps=20000, tolerance=1e-8))
    result = engine.train_batch(inputs, target, lambda: None)
    if not result.converged:  # said, not hidden: the errors are then against a reference that far from x*
        print(f"  (the reference stopped at a relative residual of {float(result.residual or 0):.2e}, short of 1e-8)")
    return weight_updates(engine)


def measure(
    width: int,
    depth: int,
    tolerances: list[float],
    train_batches: int,
    batch: int = 64,
    probes: int = 2,
    cases: Sequence[str] = tuple(CASES),
) -> dict:
    data = load_digits28().train
    x = data.inputs.double()
    y = F.one_hot(data.labels, 10).double()
    probe = [(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(probes)]
    table: dict = {}
    for name in cases:
        loss, learned = CASES[name]
        torch.manual_seed(0)
        mlp = MLP(784, width, depth, 10).double()
        log_vars = make_log_variances(mlp.sizes, "neuron", loss).double() if learned else None
        if log_vars is not None:  # a learned Sigma away from 1, as training leaves it
            with torch.no_grad():
                for log_s in log_vars:
                    log_s.uniform_(-0.5, 0.5)
        net = mlp.as_pc_network(list(log_vars) if log_vars is not None else None, loss)
        inference = Inference(steps=256, solver="error", tolerance=3e-3, check_every=4)
        for stage in ("initial", "trained"):
            if stage == "trained":  # the defaults: Adam 3e-4, error optimization at 3e-3, variance floor log S >= -2
                params = list(mlp.parameters()) + (list(log_vars) if log_vars is not None else [])
                optimizer = torch.optim.Adam(params, lr=3e-4)
                engine = PCEngine(net, inference, log_variance_min=-2.0)
                for i in range(probes, probes + train_batches):
                    engine.train_batch(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch], optimizer.step)
            rows = []
            for inputs, target in probe:
                exact = exact_update(net, inference, inputs, target)
                rows.append(
                    [
                        worst_update_error(net, replace(inference, tolerance=t), exact, inputs, target)
                        for t in tolerances
                    ]
                )
            table[f"{name}/{stage}"] = {
                str(tol): {"error_max": max(r[i][0] for r in rows), "steps_max": max(r[i][1] for r in rows)}
                for i, tol in enumerate(tolerances)
            }
            cells = "  ".join(f"{tol:g}: {table[f'{name}/{stage}'][str(tol)]['error_max']:.2%} "
                              f"({table[f'{name}/{stage}'][str(tol)]['steps_max']})" for tol in tolerances)  # fmt: skip
            print(f"  {name:<7} {stage:<8} width {width}: {cells}", flush=True)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[3e-3, 1e-3, 3e-4, 1e-4])
    parser.add_argument("--train-batches", type=int, default=100)
    parser.add_argument("--probes", type=int, default=2, help="probe batches")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args(argv)
    print(f"worst layer's update error at each tolerance (max steps), over {args.probes} digits28 batches of 64:")
    out = {
        w: measure(w, args.depth, args.tolerances, args.train_batches, probes=args.probes, cases=args.cases)
        for w in args.widths
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
