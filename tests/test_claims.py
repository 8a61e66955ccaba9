"""The paper's claims: verdict rules on constructed runs (one that holds, one that does not, inconclusive ones), the
statistics they read (layer learning, landscape shape) against their definitions, and the section from a real sweep."""

import json
import math
import shutil
import statistics

import pytest
import torch

from helpers import pcsweep
from pcsweep.report import build_report
from pcsweep.report import main as report_main
from pcsweep.report.claim_rules import FAILS, HOLDS, INCONCLUSIVE, NOT_TESTED, ClaimRules, interval
from pcsweep.report.claims import evaluate
from pcsweep.report.landscape_math import Objective, hessian_extremes, output_loss, plane_convexity, sharpness
from pcsweep.track.layers import gaussian_distance, relative_change, wasserstein1


def run(twin, seed, acc=0.9, width=64, **extra):
    fact = {
        "label": twin,
        "twin": twin,
        "dataset": "digits",
        "width": width,
        "seed": seed,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "status": "complete",
        "final_acc": acc,
        "test_loss": 0.1,
        "t90": 10.0,
        "condition2": "held",
        "inference": "stable",
        "change": [0.5] * 9,
        "gaussian": [0.01] * 9,
        "shape": None,
    }
    fact.update(extra)
    return fact


def claim(results, number):
    return next(c for c in results if c["id"] == number)


NOISE = [0.001, -0.002, 0.0015]  # per-seed scatter of the accuracies


def test_claim1_holds_fails_and_is_inconclusive_for_the_right_reasons():
    bp = [run("bp", s, 0.90 + NOISE[s]) for s in range(3)]
    similar = evaluate(bp + [run("pc", s, 0.895 + NOISE[s] / 2) for s in range(3)])
    assert claim(similar, 1)["verdict"] == HOLDS
    group = claim(similar, 1)["groups"][0]
    assert group["n"] == 3 and group["ci"][0] < group["value"] < group["ci"][1]
    differences = group["per_seed"]  # Cohen's d_z: the paired differences' mean over their standard deviation
    assert group["effect_size"] == pytest.approx(statistics.fmean(differences) / statistics.stdev(differences))
    worse = evaluate(bp + [run("pc", s, 0.80 + NOISE[s]) for s in range(3)])
    assert claim(worse, 1)["verdict"] == FAILS
    one_seed = claim(evaluate(bp[:1] + [run("pc", 0, 0.895)]), 1)
    assert one_seed["verdict"] == INCONCLUSIVE and "no interval" in one_seed["reason"]
    assert one_seed["groups"][0]["value"] == pytest.approx(0.895 - 0.901)  # the value is still shown
    failed = evaluate(bp + [run("pc", s, 0.895) for s in range(2)] + [run("pc", 2, 0.1, status="failed_to_learn")])
    assert claim(failed, 1)["verdict"] == INCONCLUSIVE and "failed to learn" in claim(failed, 1)["reason"]
    unconverged = evaluate(bp + [run("pc", s, 0.895 + NOISE[s], condition2="violated") for s in range(3)])
    assert claim(unconverged, 1)["verdict"] == INCONCLUSIVE and "condition 2" in claim(unconverged, 1)["reason"]
    straddles = evaluate(bp + [run("pc", s, 0.885 + 5 * NOISE[s]) for s in range(3)])
    assert claim(straddles, 1)["verdict"] == INCONCLUSIVE and "straddles" in claim(straddles, 1)["reason"]


def test_a_comparison_at_untuned_learning_rates_gives_no_verdict():
    """bp and pc at their hand defaults: claim 1 is "not tested: learning rates not tuned", with what would tune
    them; tuned or given rates are tested (a run's lr_origin says which)."""
    bp = [run("bp", s, 0.90 + NOISE[s], lr_origin="default") for s in range(3)]
    pc = [run("pc", s, 0.895 + NOISE[s] / 2, lr_origin="default") for s in range(3)]
    untuned = claim(evaluate(bp + pc), 1)
    assert (
        untuned["verdict"] == NOT_TESTED and "learning rates not tuned (bp, pc at hand defaults)" in untuned["reason"]
    )
    assert "tune=lr" in untuned["reason"]
    tuned = [dict(f, lr_origin="tuned: 0.001 of 7 candidates") for f in pc]
    assert claim(evaluate([dict(f, lr_origin="given") for f in bp] + tuned), 1)["verdict"] == HOLDS


def test_claims_without_their_twins_are_not_tested():
    results = evaluate([run("bp", s) for s in range(2)] + [run("pc", s) for s in range(2)])
    assert {c["id"]: c["verdict"] for c in results if c["verdict"] == NOT_TESTED}.keys() == {3, 4, 5, 6, 7, 8}
    assert "pc_rc2" in claim(results, 4)["reason"]
    assert "weight decay" in claim(results, 8)["reason"]


def test_claim2_needs_the_narrow_network_to_be_worse_than_the_wide_one():
    def sweep(narrow_gap, wide_gap):
        return (
            [run("bp", s, 0.9 + NOISE[s], width=w) for s in range(3) for w in (16, 64)]
            + [run("pc", s, 0.9 + NOISE[s] - narrow_gap, width=16) for s in range(3)]
            + [run("pc", s, 0.9 + NOISE[s] - wide_gap, width=64) for s in range(3)]
        )

    assert claim(evaluate(sweep(0.10, 0.01)), 2)["verdict"] == HOLDS
    assert claim(evaluate(sweep(0.10, 0.20)), 2)["verdict"] == FAILS  # worse, but not "especially in narrow"
    assert claim(evaluate(sweep(0.0, 0.0)), 2)["verdict"] == FAILS


def test_claim4_reads_time_ratios_paired_by_seed():
    base = [run("bp", s, t90=2.0) for s in range(3)] + [run("pc", s, t90=100.0 * (1 + 0.1 * s)) for s in range(3)]
    fast = evaluate(base + [run("pc_rc2", s, t90=20.0 * (1 + 0.1 * s)) for s in range(3)])
    assert claim(fast, 4)["verdict"] == HOLDS and claim(fast, 4)["groups"][0]["value"] == pytest.approx(0.2)
    slow = evaluate(base + [run("pc_rc2", s, t90=90.0 * (1 + 0.1 * s)) for s in range(3)])
    assert claim(slow, 4)["verdict"] == FAILS


def test_claim7_deep_layers_and_gaussian_weights():
    deep = lambda scale: [0.5 * scale, 0.5 * scale] + [0.5] * 7
    bp = [run("bp", s, change=[0.5] * 9) for s in range(3)]
    others = [run(t, s, change=deep(0.1 + 0.01 * s)) for t in ("pc", "pc_rc2", "pc_rc23") for s in range(3)]
    rc3 = [run("pc_rc3", s, change=deep(0.9 + 0.01 * s)) for s in range(3)]
    assert claim(evaluate(bp + others + rc3), 7)["verdict"] == HOLDS
    rc3_stuck = [run("pc_rc3", s, change=deep(0.1 + 0.01 * s)) for s in range(3)]
    assert claim(evaluate(bp + others + rc3_stuck), 7)["verdict"] == FAILS
    rc3_irregular = [run("pc_rc3", s, change=deep(0.9 + 0.01 * s), gaussian=[0.01] * 8 + [0.2]) for s in range(3)]
    assert claim(evaluate(bp + others + rc3_irregular), 7)["verdict"] == FAILS


def test_claims_5_6_8_read_the_landscape_shape():
    def shape(wide, zoomed=1.0, rise=1.0):
        return {
            "wide": {"convex_fraction": wide},
            "zoomed": {"convex_fraction": zoomed},
            "sharpness": {"increase": rise},
        }

    pc = [run("pc", s, shape=shape(0.6 + 0.01 * s, rise=0.1 * (1 + 0.05 * s))) for s in range(3)]
    rc2 = [run("pc_rc2", s, shape=shape(0.58 + 0.01 * s, rise=1.0 * (1 + 0.04 * s))) for s in range(3)]
    rc23 = [run("pc_rc23", s, shape=shape(0.2 + 0.01 * s, zoomed=0.97)) for s in range(3)]
    decayed = [
        run("pc_rc23", s, weight_decay=1e-6, shape=shape(0.5 + 0.01 * s), gaussian=[0.005] * 9) for s in range(3)
    ]
    results = evaluate(pc + rc2 + rc23 + decayed)
    assert [claim(results, n)["verdict"] for n in (5, 6, 8)] == [HOLDS, HOLDS, HOLDS]
    assert claim(results, 8)["groups"][0]["learning_rate"] == 1e-3  # both arms at one rate, which it says
    assert claim(results, 6)["groups"][0]["learning_rates"] == "not tested: one learning rate"  # the grid's only
    # a tuned sweep: claim 6 reads every rate its tuning tried for rc23 (the grid trains at one)
    family = {"twin": "pc_rc23", "dataset": "digits", "width": 64, "depth": None}
    candidates = [{"value": 1e-3, "status": "ok"}, {"value": 1e-2, "status": "excluded: diverged"}]
    tuned = evaluate(pc + rc2 + rc23 + decayed, tuning={"families": [{**family, "candidates": candidates}]})
    assert claim(tuned, 6)["groups"][0]["learning_rates"] == {"0.001": ["ok"], "0.01": ["excluded: diverged"]}
    # one effect at a time: arms at different rates leave the effect of decay mixed with a change of rate
    other_rate = evaluate(pc + rc2 + rc23 + [dict(f, lr=3e-4) for f in decayed])
    assert claim(other_rate, 8)["verdict"] == NOT_TESTED
    assert "different learning rates (0.0003, 0.001)" in claim(other_rate, 8)["reason"]
    rc23_convex = [run("pc_rc23", s, shape=shape(0.6 + 0.005 * s)) for s in range(3)]  # as convex as pc's
    results = evaluate(pc + rc2 + rc23_convex + decayed)
    assert claim(results, 6)["verdict"] == FAILS and claim(results, 8)["verdict"] == FAILS
    rc2_bent = [run("pc_rc2", s, shape=shape(0.3 + 0.01 * s, rise=1.0 * (1 + 0.04 * s))) for s in range(3)]
    claim5 = claim(evaluate(pc + rc2_bent), 5)
    assert claim5["verdict"] == FAILS and "less convex than pc's" in claim5["reason"]  # sharper, but not convex
    not_a_minimum = [run("pc", s, shape=shape(0.99, rise=-0.01)) for s in range(3)]  # the loss falls around it
    claim5 = claim(evaluate(not_a_minimum + rc2), 5)
    assert claim5["verdict"] == INCONCLUSIVE and "not at a minimum" in claim5["reason"]
    rc23_chaotic = [run("pc_rc23", s, shape=shape(0.2 + 0.01 * s, zoomed=0.5)) for s in range(3)]
    claim6 = claim(evaluate(pc + rc2 + rc23_chaotic), 6)
    assert claim6["verdict"] == FAILS and "near the minimum" in claim6["groups"][0]["reason"]  # nor when zoomed
    no_landscapes = evaluate([run("pc", s) for s in range(2)] + [run("pc_rc2", s) for s in range(2)])
    assert claim(no_landscapes, 5)["verdict"] == NOT_TESTED and "landscape" in claim(no_landscapes, 5)["reason"]


def test_depths_are_settings_never_configurations_to_choose():
    """A sweep over depths without a validation split: each depth is judged on its own, nothing is chosen."""
    facts = [
        run(twin, s, acc + NOISE[s], depth=depth, family=f"{twin}-{depth}")
        for depth, pc_acc in ((3, 0.895), (8, 0.80))
        for twin, acc in (("bp", 0.90), ("pc", pc_acc))
        for s in range(3)
    ]
    rows = {g["depth"]: g for g in claim(evaluate(facts), 1)["groups"]}
    assert rows[3]["verdict"] == HOLDS and rows[8]["verdict"] == FAILS
    assert rows[8]["value"] == pytest.approx(0.80 - 0.90)
    assert claim(evaluate(facts), 1)["reason"] == "holds in some settings, not in digits/64/8"
    one_depth = evaluate([f for f in facts if f["depth"] == 3])
    assert "depth" not in claim(one_depth, 1)["groups"][0]  # one depth: the settings read as before


def test_rules_are_checked_and_the_interval_is_students():
    with pytest.raises(ValueError, match="accuracy_margn"):
        ClaimRules.from_mapping({"accuracy_margn": 0.1})
    assert ClaimRules.from_mapping({"min_seeds": 3}).min_seeds == 3
    lo, hi = interval([1.0, 2.0, 3.0])
    assert hi - 2.0 == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
    assert interval([1.0]) is None


# ------------------------------------------------------------------------------------------------ statistics
def test_layer_statistics_against_their_definitions():
    torch.manual_seed(0)
    gaussian, uniform = torch.randn(200, 300), torch.rand(200, 300)
    assert gaussian_distance(gaussian) < 0.01 < 0.1 < gaussian_distance(uniform)
    assert gaussian_distance(3 * gaussian + 5) == pytest.approx(gaussian_distance(gaussian), rel=1e-6)  # scale-free
    assert wasserstein1(gaussian, gaussian + 0.25) == pytest.approx(0.25, rel=1e-6)
    assert relative_change(2 * gaussian, gaussian) == pytest.approx(1.0, rel=1e-9)


def tiny_network():
    torch.manual_seed(0)
    shapes = [(5, 4), (5, 5), (3, 5)]
    weights = [0.7 * torch.randn(s, dtype=torch.float64) for s in shapes]
    biases = [0.1 * torch.randn(s[0], dtype=torch.float64) for s in shapes]
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (20,)), 3).double()
    return shapes, weights, biases, x, y


def test_lanczos_finds_the_hessians_extreme_eigenvalues():
    shapes, weights, biases, x, y = tiny_network()

    def loss(flat):
        parts, start = [], 0
        for s in shapes:
            parts.append(flat[start : start + s[0] * s[1]].view(s))
            start += s[0] * s[1]
        return output_loss(parts, biases, x, y, "tanh", "mse")

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, torch.cat([w.flatten() for w in weights])))
    found = hessian_extremes(Objective(weights, biases, x, y), iterations=25)
    assert exact[0] < 0 < exact[-1]  # a saddle: the ratio means something
    assert found["lambda_min"] == pytest.approx(float(exact[0]), rel=1e-6)
    assert found["lambda_max"] == pytest.approx(float(exact[-1]), rel=1e-6)


def test_plane_convexity_and_sharpness_on_known_surfaces():
    c = torch.linspace(-1, 1, 21, dtype=torch.float64)
    a, b = torch.meshgrid(c, c, indexing="ij")
    r2 = a**2 + b**2
    bowl, saddle, dimple = plane_convexity(r2, c), plane_convexity(a**2 - b**2, c), plane_convexity(r2 - 3 * r2**2, c)
    assert bowl["convex_fraction"] == 1.0 and bowl["convex_radius"] == 1.0
    assert saddle["convex_fraction"] == 0.0
    # r^2 - 3 r^4 is convex (both curvatures >= 0) for r < 1/sqrt(18) = 0.236
    assert 0 < dimple["convex_fraction"] < 0.2 and 0.2 <= dimple["convex_radius"] <= 0.3
    _, weights, biases, x, y = tiny_network()
    objective = Objective(weights, biases, x, y)
    near, far = sharpness(objective, radius=0.05), sharpness(objective, radius=0.5)
    assert 0 < near["increase"] < far["increase"]
    assert near == sharpness(objective, radius=0.05)  # seeded


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_claims_smoke_preset_gets_a_claims_section_that_rebuilds_bit_for_bit(tmp_path):
    result = pcsweep(
        tmp_path,
        "-m",
        "experiment=claims_smoke",
        "width=16",
        "depth=3",
        "epochs=2",
        "inference.steps=16",
        "report.resolution=7",
        "report.samples=64",
        "tracking.chance_margin=-1",
        "optimizer.lr=5e-4",  # given: a comparison at hand defaults would be "not tested: learning rates not tuned"
    )
    assert result.returncode == 0, result.stderr
    assert "the paper's claims" in result.stdout and "claim 8:" in result.stdout
    sweep = tmp_path / "multirun" / "claims_smoke"
    decayed = [json.loads(p.read_text())["config"] for p in sweep.glob("*/summary.json")]
    assert sum(1 for c in decayed if c["weight_decay"] > 0) == 2  # the also-grid's rc23 with decay, 2 seeds
    report = sweep / "report"
    document = json.loads((report / "claims.json").read_text())
    assert [c["id"] for c in document["claims"]] == list(range(1, 9))
    assert document["rules"]["accuracy_margin"] == 0.02
    for c in document["claims"]:  # every twin is there, with 2 seeds: nothing is "not tested"
        assert c["verdict"] in (HOLDS, FAILS, INCONCLUSIVE), c
        for group in c["groups"]:
            assert group["n"] == 2 or group["verdict"] == INCONCLUSIVE, (c["id"], group)
    markdown = (report / "report.md").read_text()
    assert "## The paper's claims" in markdown and "### Claim 8" in markdown and "Landscape shape" in markdown
    assert (report / "layers_digits_16.png").is_file()
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    build_report(sweep, (1.0, 0.1), 7, 64, quiet=True)
    after = {p.name: p.read_bytes() for p in report.iterdir()}
    assert before.keys() == after.keys()
    assert [name for name in before if before[name] != after[name]] == []  # same sweep, same report, bit for bit
    # runs of one twin only: every claim says what it cannot check, no traceback
    lone = tmp_path / "lone"
    lone.mkdir()
    for run_dir in sweep.glob("pc_16_3_digits-*"):
        shutil.copytree(run_dir, lone / run_dir.name)
    report_main([str(lone), "--no-landscapes"])
    lone_claims = json.loads((lone / "report" / "claims.json").read_text())["claims"]
    assert {c["verdict"] for c in lone_claims} == {NOT_TESTED}
    assert "no bp runs" in lone_claims[0]["reason"]


def test_a_report_on_a_folder_without_runs_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"pcsweep-report: error: no finished runs (summary.json) under {tmp_path}"
    with pytest.raises(SystemExit):
        report_main([str(tmp_path), "--rule", "accuracy_margn=0.1"])
    assert "unknown claim rule(s) ['accuracy_margn']" in capsys.readouterr().err
