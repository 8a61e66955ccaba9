"""Every verdict a run gets about itself, in one place: did it learn, did inference converge (condition 2) and stay
stable, what did its variances do. The measurements come from ``pcsweep.track.conditions`` and ``pcsweep.pc.stability``;
the thresholds from ``TrackingSettings``. The summary's ``checks``, the sweep table and the report read these."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from pcsweep.config.settings import Settings, TrackingSettings

UNIFORM_SPREAD = 1e-3  # log S spread across a layer's neurons below which the variance is one number per layer


def condition2_verdict(
    probes: Sequence[dict], relaxed: bool, limits: TrackingSettings, history: Sequence[dict] = ()
) -> dict:
    """``held`` / ``violated`` (or ``relaxed`` for relax 2 and 23, by design) from every epoch's probe and every
    batch's residual (``history``: the per-epoch training means), with the worst numbers; ``not measured`` without
    probes of the update error. Held: on every probed batch, every layer's weight update where inference stopped is
    within ``condition2_max_update_error`` (relative) of the update at the equilibrium, and at most
    ``condition2_max_unconverged`` of any epoch's batches ended at T short of ``inference.tolerance`` (a run whose
    batches routinely did so did not hold condition 2, whatever its probe batches said). The cosine and the norm ratio
    are implied by the update error (error e: cosine >= sqrt(1 - e^2), ratio within 1 +- e); they and the energy gap
    are reported, not judged."""
    measured = [p for p in probes if "update_error_max" in p]  # a resumed run's records from before it: not judged
    if not measured:
        return {"verdict": "not measured"}
    worst_probe = max(measured, key=lambda p: _finite(p["update_error_max"]))
    worst_error, worst_layer = worst_probe["update_error_max"], worst_probe["worst_layer"]
    shares = [r["train_unconverged"] for r in history if r.get("train_unconverged") is not None]
    worst_share = max(shares, default=None)
    limit = limits.condition2_max_update_error
    close = _finite(worst_error) <= limit
    routine = worst_share is not None and worst_share > limits.condition2_max_unconverged
    verdict = "relaxed" if relaxed else ("held" if close and not routine else "violated")
    residuals = [r["train_residual_max"] for r in history if r.get("train_residual_max") is not None]
    references = [p["reference"] for p in measured]
    short = [r for r in references if not r["converged"]]
    off = f"layer {worst_layer}'s update is {percent(worst_error)} off the converged update (limit {percent(limit)})"
    if verdict == "violated" and close and worst_share is not None:  # by the batches that ended short of it
        reason = (
            f"condition 2 violated: {100 * worst_share:.0f}% of an epoch's batches ended at T short of "
            f"inference.tolerance (limit {100 * limits.condition2_max_unconverged:.0f}%); worst probed update: {off}"
        )
    else:
        reason = f"condition 2 {verdict}: {off}"
    if short:
        worst_reference = max(short, key=lambda r: _finite(r["residual"]))
        reason += (
            f"; the reference fell short of a residual of {worst_reference['tolerance']:.0e} on {len(short)} of "
            f"{len(references)} probes (reached {worst_reference['residual']:.1e} in {worst_reference['steps']} steps)"
        )
    return {
        "verdict": verdict,
        "reason": reason,
        "worst_update_error": worst_error,  # |u_stop - u*| / |u*|, the worst layer of any probed batch
        "worst_layer": worst_layer,  # 1: W1
        "worst_epoch": worst_probe.get("epoch"),
        "max_update_error": limit,
        "worst_gap": max(p["gap"] for p in measured),  # reported: (E_stop - E*) / E_stop
        "worst_cosine": min(min(p["cosine"]) for p in measured),  # reported: implied by the update error
        "probed_epochs": len(measured),
        "probed_batches": sum(p.get("probed_batches", 1) for p in measured),
        "reference_short": len(short),  # probes whose float64 reference did not reach its tolerance
        "worst_unconverged_share": worst_share,  # of an epoch's batches, ended at T short of the tolerance
        "max_unconverged_share": limits.condition2_max_unconverged,
        "worst_residual": max(residuals, default=None),  # the largest relative residual any batch stopped at
    }


def percent(share: float) -> str:
    """0.043 as ``4.3%``, 0.00012 as ``0.012%``, 3.9 as ``390%``."""
    value = 100 * share
    return f"{value:.2g}%" if value < 100 else f"{value:.0f}%"


def _finite(value: float) -> float:
    """NaN (a probe that blew up) as the worst value there is."""
    return value if not math.isnan(value) else math.inf


def learned(settings: Settings, final_acc: Optional[float], num_classes: int) -> bool:
    """A final accuracy more than ``tracking.chance_margin`` above chance."""
    return final_acc is not None and final_acc >= 1.0 / num_classes + settings.tracking.chance_margin


def judged_accuracy(record: dict) -> Optional[float]:
    """The accuracy that decides whether a run learned: the validation split's where there is one (the tuning stage
    and the claims exclude runs that failed to learn, so the test split must not decide it), else the test's."""
    return record.get("val_acc") if record.get("val_acc") is not None else record.get("test_acc")


def run_checks(settings: Settings, summary: dict, records: Optional[list], stability: Optional[dict]) -> dict:
    """Whether the run's assumptions held, each with a verdict and its numbers (the summary's ``checks``).
    ``records``: a PC run's per-epoch condition records (None for BP); ``stability``: its pre-flight."""
    on_validation = summary.get("final_val_acc") is not None
    final = summary["final_val_acc"] if on_validation else summary.get("final_test_acc")
    checks: dict[str, Any] = {
        "learned": {
            "verdict": "learned" if learned(settings, final, summary["num_classes"]) else "failed to learn",
            "judged_on": "validation" if on_validation else "test (no validation split)",
            "final_acc": final,
            "final_test_acc": summary.get("final_test_acc"),
            "chance": 1.0 / summary["num_classes"],
            "margin": settings.tracking.chance_margin,
        }
    }
    if records is None:
        return checks
    assert stability is not None  # measured for every PC run, the only runs with conditions
    checks["condition2"] = condition2_verdict(
        [{**r["condition2"], "epoch": r["epoch"]} for r in records],
        settings.inference.update_every is not None,
        settings.tracking,
        summary["history"],
    )
    checks["inference"] = inference_check(settings, summary["history"], records, stability)
    if stability["log_variance_min"] is not None and records and "variance" in records[-1]:
        checks["variance"] = variance_check(settings, records[-1], stability)
    return checks


def inference_check(settings: Settings, history: list, records: list, stability: dict) -> dict:
    """Stable (``step_size * lambda_max`` below the limit at every probe), with the step size and steps used."""
    worst = max((r["stiffness"] for r in records), default=stability["stiffness"])
    rises = [r.get("train_energy_rises") for r in history if r.get("train_energy_rises") is not None]
    used = [r["train_inference_steps"] for r in history if r.get("train_inference_steps") is not None]
    return {
        "verdict": "stable" if worst < stability["limit"] else "unstable",
        "stiffness_initial": stability["stiffness"],
        "stiffness_worst": worst,
        "limit": stability["limit"],
        "lambda_max_initial": stability["lambda_max"],
        "step_size": settings.inference.step_size,  # auto: it followed the curvature
        "step_size_initial": stability["step_size"],
        "step_size_final": records[-1].get("step_size", stability["step_size"]) if records else stability["step_size"],
        "energy_rises_per_batch": rises,
        # per epoch, the mean inference steps a batch ran: T, or fewer where inference.tolerance saw it converge
        "steps": settings.inference.steps,
        "solver": settings.inference.solver,
        "tolerance": settings.inference.tolerance,
        "steps_used_per_epoch": used,
        "steps_max_per_epoch": [r.get("train_inference_steps_max") for r in history],
        # per epoch, the relative residual |dE/dx| / |dE/dx|_0 where each batch stopped: mean, worst; and the batches
        # that ended at T short of the tolerance
        "residual_mean_per_epoch": [r.get("train_residual") for r in history],
        "residual_max_per_epoch": [r.get("train_residual_max") for r in history],
        "unconverged_batches_per_epoch": [r.get("train_unconverged_batches") for r in history],
    }


def variance_check(settings: Settings, last: dict, stability: dict) -> dict:
    """What the trainable variances did by the last probe: on the floor, one drift for all, or learned per neuron."""
    layers = last["variance"]
    # the output layer's variance is not a hidden one; with a cross-entropy output there is none (mlp.py)
    hidden = layers if settings.output_loss == "ce" else layers[:-1]
    at_floor = sum(layer["at_floor"] for layer in hidden) / max(len(hidden), 1)
    spread = max(layer["std"] for layer in layers)  # across the neurons of a layer
    # ∂E/∂log S is about +1/2 for every inferred neuron: Adam moves them all alike unless the data tell them apart
    verdict = (
        "hidden variances at the floor"
        if at_floor > 0.5
        else "uniform drift (not a per-neuron variance)"
        if spread < UNIFORM_SPREAD
        else "learned per neuron"
    )
    return {
        "verdict": verdict,
        "spread": spread,
        "log_variance_min_initial": stability["log_variance_min"],
        "log_variance_min": last["log_variance_min"],
        "hidden_at_floor": at_floor,
        "layers": layers,
    }
