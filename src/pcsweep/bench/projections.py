"""The paper's grid projected from the bench's timings: hours for one sweep at the paper's scale (938 batches
per MNIST epoch, 20 epochs), untuned and with tune=lr's trials."""

from __future__ import annotations

from typing import Optional

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
