"""The report on constructed sweeps (summary.json files as the runs write them, no training): configurations chosen on
validation and never on test, the one-line refusal when only the test split could choose, folders set aside, the
tuning section, and the numbers of the "why a gap remains" sections against hand computations."""

import json
import math

import pandas as pd
import pytest
import torch

from pcsweep.config.errors import UserError
from pcsweep.report import (
    accuracy_curve_frame,
    benchmark_frame,
    build_report,
    coinciding,
    depth_gap_frame,
    energy_share_frame,
    energy_table,
    generalization_frame,
    generalization_table,
    load_sweep,
    run_fact,
    summary_frame,
)
from pcsweep.report import main as report_main
from pcsweep.report.claim_runs import SelectionError, twin_runs
from pcsweep.report.claims import evaluate, groups_of

T_975_1 = 12.706204736174707  # Student's t, 97.5% quantile, 1 degree of freedom: two seeds
EPOCHS, EVALS = 2, 10  # each run: two epochs of 10 batches, one evaluation per batch


def write_run(sweep, twin, seed, test, *, depth=3, lr=1e-3, val=None, train=None, folder=None, energy=None, **extra):
    """One finished run's folder: summary.json with the fields pcsweep.run.task writes, and a small weights.pt."""
    algo, _, relax = twin.partition("_rc")
    name = f"{algo}_16_{depth}" + (f"_rc{relax}" if relax else "")
    config = {
        "width": 16,
        "depth": depth,
        "seed": seed,
        "algo": {"name": algo},
        "relax": {"name": relax or "none"},
        "optimizer": {"lr": lr},
        "dataset": {"name": "digits", "val_fraction": 0.1 if val is not None else 0.0},
        "weight_decay": 0.0,
    }
    rise = lambda step: test * (1 - math.exp(-step / 5))  # the same trajectory for the same final accuracy
    curve = [
        {
            "epoch": (step - 1) // EVALS,
            "epochs": step / EVALS,
            "step": step,
            "train_seconds": step,
            "test_acc": rise(step),
        }
        for step in range(1, EPOCHS * EVALS + 1)
    ]
    loss = lambda e: (1 - test) / (e + 1)  # train loss; the test loss is three times it
    history = [
        {
            "epoch": e,
            "step": (e + 1) * EVALS,
            "test_acc": rise((e + 1) * EVALS),
            "train_acc": train,
            "train_loss": loss(e),
            "test_loss": 3 * loss(e),
        }
        for e in range(EPOCHS)
    ]
    summary = {
        "name": name,
        "dataset": "digits",
        "status": "complete",
        "final_test_acc": test,
        "best_test_acc": test,
        "final_train_loss": loss(EPOCHS - 1),
        "final_test_loss": 3 * loss(EPOCHS - 1),
        "final_train_acc": train,
        "lr": lr,
        "lr_origin": "tuned: the fixture's choice",  # "default" would leave the claims untested
        "val_score": val,
        "history": history,
        "curve": curve,
        "checks": {},
        "conditions": [{"condition2": {"layer_energy_at_T": energy}}] if energy else [],
        "layers": [{"change": [0.5 / (l + 1) for l in range(depth)], "gaussian_distance": [0.01] * depth}],
        "config": config,
        **extra,
    }
    path = sweep / (folder or f"{name}_digits-lr{lr:g}-seed{seed}")
    path.mkdir(parents=True)
    summary["run_dir"] = path.name
    (path / "summary.json").write_text(json.dumps(summary))
    torch.manual_seed(seed)
    sizes = [8] + [16] * (depth - 1) + [4]
    state = {}
    for l in range(depth):
        state[f"mlp.layers.{l}.weight"] = torch.randn(sizes[l + 1], sizes[l])
        state[f"mlp.layers.{l}.bias"] = torch.zeros(sizes[l + 1])
    torch.save(state, path / "weights.pt")
    return path


TUNING = {
    "key": "optimizer.lr",
    "candidates": [1e-4, 1e-3, 3e-3, 1e-2],
    "seeds": [0, 1],
    "score": "mean validation accuracy of the last 5 evaluations",
    "epochs": 5,
    "wall_seconds": 123.4,
    "families": [
        {
            "family": "pc_16_10_digits-1a2b3c4d",
            "model": "pc_16_10",
            "twin": "pc",
            "dataset": "digits",
            "width": 16,
            "depth": 10,
            "candidates": [
                {"value": 1e-4, "scores": {"0": 0.80, "1": 0.82}, "mean": 0.81, "std": 0.014, "status": "ok"},
                {"value": 1e-3, "scores": {"0": 0.86, "1": 0.88}, "mean": 0.87, "std": 0.014, "status": "ok"},
                {"value": 3e-3, "scores": {"0": 0.90, "1": 0.92}, "mean": 0.91, "std": 0.014, "status": "ok"},
                {
                    "value": 1e-2,
                    "scores": {"0": 0.1},
                    "mean": None,
                    "std": None,
                    "status": "excluded: inference unstable",
                },
            ],
            "chosen": 3e-3,
            "score": 0.91,
            "spread": 0.01,
            "edge": False,
            "origin": "tuned: 0.003 of 4 candidates, val 0.910 ± 0.010",
        },
        {
            "family": "bp_16_10_digits-5e6f7a8b",
            "model": "bp_16_10",
            "twin": "bp",
            "dataset": "digits",
            "width": 16,
            "depth": 10,
            "candidates": [
                {"value": v, "scores": {"0": s, "1": s}, "mean": s, "std": 0.0, "status": "ok"}
                for v, s in ((1e-4, 0.95), (1e-3, 0.9), (3e-3, 0.85), (1e-2, 0.8))
            ],
            "chosen": 1e-4,
            "score": 0.95,
            "spread": 0.0,
            "edge": True,
            "origin": "tuned: 0.0001 of 4 candidates, val 0.950 ± 0.000",
        },
    ],
}

# depth 3: pc in two configurations. lr 1e-2 has the better test accuracy but the worse validation score.
BP = {3: {0: 0.90, 1: 0.92, 2: 0.91}, 10: {0: 0.93, 1: 0.95}}
PC_CHOSEN = {3: {0: 0.85, 1: 0.84}, 10: {0: 0.88, 1: 0.86}}  # lr 1e-3 at depth 3 (validation 0.86)
PC_TEST_BEST = {0: 0.97, 1: 0.96}  # lr 1e-2 at depth 3 (validation 0.70): never chosen
RC2 = {3: {0: 0.80, 1: 0.83}, 10: {0: 0.70, 1: 0.76}}


@pytest.fixture(scope="module")
def tuned_sweep(tmp_path_factory):
    """Two depths (10 before 3 in name order), two seeds, bp, pc (two configurations at depth 3), pc_rc2 and pc_rc3
    (pc's very curve), a validation split, a tuning record with trials in tuning/, and a folder set aside; the report
    built once."""
    sweep = tmp_path_factory.mktemp("sweep") / "tuned"
    for depth in (3, 10):
        for seed, acc in BP[depth].items():
            write_run(sweep, "bp", seed, acc, depth=depth, val=acc - 0.01, train=acc + 0.02)
        for seed, acc in PC_CHOSEN[depth].items():
            energy = [1.0, 1.0, 2.0 + seed] + [4.0] * (depth - 3)
            write_run(sweep, "pc", seed, acc, depth=depth, val=0.86, train=acc + 0.1, energy=energy)
            write_run(sweep, "pc_rc3", seed, acc, depth=depth, val=0.86, train=acc + 0.1, energy=energy)
        for seed, acc in RC2[depth].items():
            write_run(sweep, "pc_rc2", seed, acc, depth=depth, val=acc, train=acc + 0.05, energy=[1.0] * depth)
    for seed, acc in PC_TEST_BEST.items():
        write_run(sweep, "pc", seed, acc, depth=3, lr=1e-2, val=0.70, train=0.99)
    write_run(sweep, "pc", 0, 0.5, depth=3, lr=0.5, val=0.99, folder="pc_16_3_digits-1a2b3c4d.other-9f8e7d6c")
    write_run(sweep / "tuning", "pc", 0, 0.6, depth=10, lr=1e-2, val=0.99, folder="pc_16_10_digits-trial")
    (sweep / "tuning" / "tuning.json").write_text(json.dumps(TUNING))
    build_report(sweep, landscapes=False, quiet=True)
    return sweep


# ------------------------------------------------------------------------------------------------ choosing
def fact(twin, seed, test, val, family, **extra):
    return {
        "twin": twin,
        "dataset": "digits",
        "width": 64,
        "seed": seed,
        "family": family,
        "status": "complete",
        "final_acc": test,
        "val_score": val,
        **extra,
    }


def test_configurations_are_chosen_on_validation_never_on_test():
    better_test = [fact("pc", s, 0.95, 0.80, "a") for s in range(2)]
    better_validation = [fact("pc", s, 0.90, 0.85, "b") for s in range(2)]
    chosen = twin_runs(better_test + better_validation, "pc")
    assert {f["family"] for f in chosen.values()} == {"b"}
    bp = [fact("bp", s, 0.90 + 0.001 * s, None, "bp") for s in range(2)]  # one configuration: no choice to make
    claim1 = evaluate(bp + better_test + better_validation)[0]["groups"][0]
    assert claim1["per_seed"] == pytest.approx([0.0, -0.001])  # judged on the validation choice's test accuracy
    # a configuration whose seeds did not all finish ranks below one whose seeds did
    diverged = [fact("pc", 0, None, 0.99, "c", status="diverged"), fact("pc", 1, 0.9, 0.99, "c")]
    assert {f["family"] for f in twin_runs(diverged + better_validation, "pc").values()} == {"b"}


def test_only_the_test_split_could_choose_is_refused_in_one_line(tmp_path, capsys):
    no_split = [fact("pc_rc2", s, 0.9, None, family) for s in range(2) for family in ("a", "b", "c")]
    with pytest.raises(SelectionError, match="pc_rc2 has 3 configurations in this sweep") as raised:
        twin_runs(no_split, "pc_rc2")
    assert isinstance(raised.value, UserError) and isinstance(raised.value, ValueError)
    assert "dataset.val_fraction=0.1" in str(raised.value) and "tune=lr" in str(raised.value)
    one_config = [f for f in no_split if f["family"] == "a"]
    assert len(twin_runs(one_config, "pc_rc2")) == 2  # one configuration without a validation score: nothing to choose
    diverged = [fact("pc_rc2", s, None, None, "b", status="diverged") for s in range(2)]
    assert {f["family"] for f in twin_runs(one_config + diverged, "pc_rc2").values()} == {"a"}  # no split needed
    sweep = tmp_path / "untuned"
    for seed in range(2):
        write_run(sweep, "bp", seed, 0.9)
        for lr in (1e-3, 1e-2):
            write_run(sweep, "pc", seed, 0.9, lr=lr)
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(sweep), "--no-landscapes"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "pcsweep-report: error: pc has 2 configurations in this sweep (digits, width 16, depth 3) and no"
    )
    assert "\n" not in err
    assert not (sweep / "report").exists()  # refused before any figure is drawn


def test_the_report_chooses_on_validation(tuned_sweep):
    claims = json.loads((tuned_sweep / "report" / "claims.json").read_text())["claims"]
    claim1 = {g["depth"]: g for g in claims[0]["groups"]}
    expected = [PC_CHOSEN[3][s] - BP[3][s] for s in (0, 1)]
    assert claim1[3]["per_seed"] == pytest.approx(expected)  # lr 1e-2's better test accuracy was not chosen
    assert claim1[10]["per_seed"] == pytest.approx([PC_CHOSEN[10][s] - BP[10][s] for s in (0, 1)])


# ------------------------------------------------------------------------------------------------ what enters
def test_folders_set_aside_and_tuning_trials_never_enter_a_report(tuned_sweep):
    sweep = load_sweep(tuned_sweep)
    names = {run.path.name for run in sweep.runs}
    assert len(names) == (3 + 2 + 2 + 2) + (2 + 2 + 2 + 2) + 2  # bp, pc, rc3, rc2 at depths 3 and 10; pc's lr 1e-2
    assert not any(".other-" in name or "trial" in name for name in names)
    markdown = (tuned_sweep / "report" / "report.md").read_text()
    assert ".other-" not in markdown and "trial" not in markdown


def test_the_runs_table_says_the_learning_rate_and_where_it_came_from(tuned_sweep, tmp_path):
    frame = summary_frame(load_sweep(tuned_sweep))
    assert {"lr", "lr from", "val score"} <= set(frame.columns)
    assert set(frame["lr"]) == {1e-3, 1e-2} and set(frame["lr from"]) == {"tuned: the fixture's choice"}
    old = write_run(tmp_path / "old", "bp", 0, 0.9, lr=3e-4)  # a summary from before lr was written
    summary = json.loads((old / "summary.json").read_text())
    del summary["lr"], summary["lr_origin"], summary["val_score"], summary["final_train_acc"]
    (old / "summary.json").write_text(json.dumps(summary))
    row = summary_frame(load_sweep(tmp_path / "old")).iloc[0]
    assert row["lr"] == 3e-4 and row["lr from"] is None


# ------------------------------------------------------------------------------------------------ sections
def test_every_new_section_is_in_both_documents(tuned_sweep):
    report = tuned_sweep / "report"
    markdown, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    for title in (
        "Learning rate (tuning)",
        "Why a gap remains: train vs test",
        "Why a gap remains: error energy per layer",
        "Why a gap remains: depth",
    ):
        assert f"## {title}" in markdown and f"<h2>{title}</h2>" in page, title
    for figure in ("tuning", "generalization_digits_16", "energy_digits_16", "depth_digits_16", "curves_digits_16"):
        assert (report / f"{figure}.png").is_file() and f"![{figure}]({figure}.png)" in markdown
    assert page.count("data:image/png;base64,") == 8  # benchmark, curves, weights, layers, three gaps, tuning
    runs_table = markdown.split("## Runs")[1].split("\n## ")[0]
    assert "lr from" in runs_table and "val score" in runs_table


def test_the_tuning_section_shows_the_chosen_value(tuned_sweep):
    markdown = (tuned_sweep / "report" / "report.md").read_text()
    section = markdown.split("## Learning rate (tuning)")[1].split("\n## ")[0]
    assert "tuned: 0.003 of 4 candidates, val 0.910 ± 0.010" in section
    chosen_row = next(line for line in section.splitlines() if "| pc_16_10" in line)
    assert "0.003" in chosen_row and "0.910 ± 0.010" in chosen_row
    assert "inference unstable" in section and "4 candidates x 2 seeds, 5 epochs each" in section
    assert "bp_16_10 (digits): 0.0001 is the smallest candidate" in section  # the edge of the range is said
    assert "pc_16_10 (digits)" not in section.split("Note:")[1].split("\n")[0]  # and only there


def test_without_tuning_there_is_no_tuning_section(tmp_path):
    sweep = tmp_path / "plain"
    for seed in range(2):
        write_run(sweep, "bp", seed, 0.9 + 0.01 * seed, train=0.95)
        write_run(sweep, "pc", seed, 0.8 + 0.01 * seed, train=0.99, energy=[1.0, 2.0, 3.0])
    build_report(sweep, landscapes=False, quiet=True)
    markdown = (sweep / "report" / "report.md").read_text()
    assert "tuning" not in markdown.lower() and "## Why a gap remains: depth" not in markdown  # one depth
    assert "## Why a gap remains: train vs test" in markdown


def test_the_depth_gap_is_paired_by_seed(tuned_sweep):
    groups = groups_of([run_fact(run) for run in load_sweep(tuned_sweep).runs])
    frame = depth_gap_frame(groups).set_index(["twin", "depth"])
    for twin, accs in (("pc", PC_CHOSEN), ("pc_rc3", PC_CHOSEN), ("pc_rc2", RC2)):
        for depth in (3, 10):
            gaps = [accs[depth][s] - BP[depth][s] for s in (0, 1)]  # bp's seed 2 at depth 3 has no partner
            row = frame.loc[(twin, depth)]
            half = T_975_1 * abs(gaps[0] - gaps[1]) / 2  # t * sd / sqrt(2), sd = |a - b| / sqrt(2)
            assert row["seeds"] == 2
            assert row["PC - BP"] == pytest.approx(sum(gaps) / 2)
            assert (row["ci low"], row["ci high"]) == pytest.approx((sum(gaps) / 2 - half, sum(gaps) / 2 + half))
    assert ("pc_rc23", 3) not in frame.index


def test_the_generalization_gap_table(tuned_sweep, tmp_path):
    table = generalization_table(generalization_frame(load_sweep(tuned_sweep))).set_index("model")
    rc2 = table.loc["pc_16_10_rc2"]
    assert rc2["train acc"] == pytest.approx(sum(RC2[10].values()) / 2 + 0.05)
    assert rc2["test acc"] == pytest.approx(sum(RC2[10].values()) / 2)
    assert rc2["gap"] == pytest.approx(0.05) and rc2["gap 95% CI"] == "[0.05, 0.05]"
    sweep = tmp_path / "old"  # summaries without final_train_acc: the last epoch's train accuracy
    for seed, (train, test) in enumerate(((0.99, 0.90), (0.97, 0.92))):
        path = write_run(sweep, "bp", seed, test, train=train)
        summary = json.loads((path / "summary.json").read_text())
        del summary["final_train_acc"]
        (path / "summary.json").write_text(json.dumps(summary))
    row = generalization_table(generalization_frame(load_sweep(sweep))).iloc[0]
    gaps = [0.99 - 0.90, 0.97 - 0.92]
    half = T_975_1 * abs(gaps[0] - gaps[1]) / 2
    assert row["train acc"] == pytest.approx(0.98) and row["gap"] == pytest.approx(0.07)
    assert row["gap 95% CI"] == f"[{0.07 - half:.3g}, {0.07 + half:.3g}]"


def test_energy_shares_sum_to_one_per_run(tuned_sweep):
    frame = energy_share_frame(load_sweep(tuned_sweep))
    assert set(frame["twin"]) == {"pc", "pc_rc2", "pc_rc3"}  # bp has no error energy
    assert frame.groupby(["model", "seed"])["energy share"].sum().to_numpy() == pytest.approx(1.0)
    row = energy_table(frame).set_index("model").loc["pc_16_3 [" + _variant(tuned_sweep, "pc_16_3", 1e-3) + "]"]
    # seed 0: [1, 1, 2] / 4, seed 1: [1, 1, 3] / 5
    assert row["input layer share"] == pytest.approx((0.25 + 0.2) / 2)
    assert row["output layer share"] == pytest.approx((0.5 + 0.6) / 2)


def _variant(sweep, name, lr):
    return next(run.family[:6] for run in load_sweep(sweep).runs if run.name == name and run.lr == lr)


# ------------------------------------------------------------------------------------------------ figures
def curve(model, values):
    return pd.DataFrame({"model": model, "seed": 0, "training batches": range(len(values)), "test accuracy": values})


def test_coinciding_curves_are_named_and_distinct_ones_are_not():
    base = [0.1, 0.5, 0.8, 0.9]
    same = pd.concat([curve("pc_16_3", base), curve("pc_16_3_rc3", base), curve("bp_16_3", [v + 0.05 for v in base])])
    assert coinciding(same) == ["pc_16_3_rc3 coincides with pc_16_3 (mean |Δ| 0.000, max 0.000)"]
    near = pd.concat([curve("pc_16_3", base), curve("pc_16_3_rc3", [v + 0.001 for v in base])])
    assert coinciding(near) == ["pc_16_3_rc3 coincides with pc_16_3 (mean |Δ| 0.001, max 0.001)"]
    apart = pd.concat([curve("pc_16_3", base), curve("pc_16_3_rc3", base[:3] + [0.95])])
    assert coinciding(apart) == []


def test_the_curves_use_every_evaluation_and_say_which_lines_coincide(tuned_sweep):
    points = accuracy_curve_frame(load_sweep(tuned_sweep))
    assert points.groupby(["model", "seed"]).size().unique().tolist() == [EPOCHS * EVALS]
    markdown = (tuned_sweep / "report" / "report.md").read_text()
    curves = markdown.split("## Curves (Fig 3)")[1].split("\n## ")[0]
    assert "pc_16_10_rc3 coincides with pc_16_10 (mean |Δ| 0.000, max 0.000)" in curves
    assert "pc_16_10_rc2 coincides" not in curves and "bp_16_10 coincides" not in curves


def test_a_failed_seed_stays_in_the_depth_gap_as_what_it_was(tmp_path):
    """pc's seed 1 failed to learn at depth 10: it is not dropped (which would shrink the gap), its accuracy counts,
    and the row says 1 of 2 failed."""
    sweep = tmp_path / "depths"
    for depth in (3, 10):
        for seed in (0, 1):
            write_run(sweep, "bp", seed, 0.9, depth=depth, val=0.89, train=0.92)
            failed = depth == 10 and seed == 1
            status = {"status": "failed_to_learn"} if failed else {}
            write_run(sweep, "pc", seed, 0.12 if failed else 0.85, depth=depth, val=0.84, train=0.9, **status)
    groups = groups_of([run_fact(run) for run in load_sweep(sweep).runs])
    row = depth_gap_frame(groups).set_index(["twin", "depth"]).loc[("pc", 10)]
    assert row["seeds"] == 2 and row["PC - BP"] == pytest.approx(((0.85 - 0.9) + (0.12 - 0.9)) / 2)
    assert row["failed"] == "1 of 2 (pc), 0 of 2 (bp)"
    # the benchmark figure's accuracy bars keep it too (and its title counts it)
    bars = benchmark_frame(load_sweep(sweep))
    assert len(bars[(bars["model"] == "pc_16_10") & (bars["status"] == "failed_to_learn")]) == 1
