"""``python -m pcsweep.report multirun/<sweep>``: the paper's figures from a sweep's local files, no W&B needed.

Writes into ``<sweep>/report/``: benchmark bars (Fig 2), curves (Fig 3), loss landscapes (Figs 4 and 7, wide and
zoomed, contour and surface), weight distributions (Fig 5), the weight-decay comparison (Fig 6) when the sweep has
one, a self-contained ``report.html`` (figures embedded) and ``report.md``. Runs with several seeds are shown as a
mean with a 95% confidence interval. Landscapes are cached in each run folder.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from pcsweep.claims import ClaimRules, claims_document, evaluate
from pcsweep.errors import exit_with
from pcsweep.files import read_json, write_atomic
from pcsweep.landscape import hessian_extremes, landscape, plane_convexity, sharpness
from pcsweep.layers import wasserstein1
from pcsweep.summary import checks_text, read_manifest

TWIN_ORDER = ["bp", "pc", "pc_rc2", "pc_rc3", "pc_rc23"]
PALETTE = dict(zip(TWIN_ORDER, sns.color_palette("deep", 5)))


def twin_of(label: str) -> str:
    """``pc_256_8_rc2 wd=1e-06`` -> ``pc_rc2``; ``bp_256_8`` -> ``bp``."""
    name = label.split(" ")[0]
    algo = name.split("_")[0]
    return f"{algo}_rc{name.split('_rc')[1]}" if "_rc" in name else algo


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict
    variant: str = ""  # set when runs of different configs share one name: they are shown apart, never pooled

    @cached_property
    def family(self) -> str:
        """The run's identity without its seed: runs of one family are seeds of one experiment."""
        from pcsweep.config import config_hash

        return config_hash({k: v for k, v in self.config.items() if k != "seed"})

    @property
    def name(self) -> str:  # the paper's name: pc_256_8_rc2
        return self.summary["name"]

    @property
    def twin(self) -> str:
        return twin_of(self.name)

    @property
    def label(self) -> str:
        """The paper's name, plus the weight decay when there is one (Fig 6 compares the same twin with and without)."""
        decay = self.config.get("weight_decay", 0) or 0
        return self.name + (f" wd={decay:g}" if decay else "") + self.variant

    @property
    def group(self) -> tuple[str, int, int]:
        return self.summary["dataset"], self.config["width"], self.config["depth"]


@dataclass
class Sweep:
    path: Path
    runs: list[Run]
    skipped: list[dict] = field(default_factory=list)  # duplicates and runs without a summary

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.summary["status"] == "complete"]


def seeds_only(runs: list[Run]) -> tuple[list[Run], list[dict]]:
    """Make every group of runs a set of seeds of one config: a second run of the same config and seed is listed,
    not counted; runs of different configs under one name are told apart (``[family]`` after the name)."""
    kept: list[Run]
    skipped: list[dict]
    seen: dict[tuple[str, Any], str]  # (family, seed) -> the folder that holds it
    kept, skipped, seen = [], [], {}
    for run in runs:
        key = (run.family, run.config.get("seed"))
        if key in seen:
            skipped.append(
                {"model": run.path.name, "reason": f"same config and seed as {seen[key]}: listed, not counted"}
            )
            continue
        seen[key] = run.path.name
        kept.append(run)
    families: dict[tuple, set] = {}
    for run in kept:
        families.setdefault((run.summary["dataset"], run.label), set()).add(run.family)
    for run in kept:
        if len(families[(run.summary["dataset"], run.label)]) > 1:
            run.variant = f" [{run.family[:6]}]"
    return kept, skipped


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a sweep folder")
    runs = []
    for summary_path in sorted(path.glob("*/summary.json")):
        summary = read_json(summary_path)  # an unreadable one is set aside (one line): that run is not reported
        if isinstance(summary, dict):
            runs.append(Run(summary_path.parent, summary, summary.get("config", {})))
    runs, skipped = seeds_only(runs)
    manifest = read_manifest(path)
    if manifest is not None:
        for entry in manifest["runs"]:
            if entry["status"] == "duplicate":
                skipped.append({"model": entry["model"], "reason": f"duplicate of {entry['duplicate_of']}"})
            elif not (path / entry.get("run_dir", "") / "summary.json").is_file():
                skipped.append(
                    {"model": entry.get("run_dir", entry["model"]), "reason": "no summary (failed or unfinished)"}
                )
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {path}")
    return Sweep(path, runs, skipped)


# ------------------------------------------------------------------------------------------------ tables
def summary_frame(sweep: Sweep) -> pd.DataFrame:
    rows = []
    for run in sweep.runs:
        s = run.summary
        rows.append(
            {
                "model": run.label,
                "twin": run.twin,
                "dataset": s["dataset"],
                "width": run.config.get("width"),
                "depth": run.config.get("depth"),
                "seed": run.config.get("seed"),
                "status": s["status"],
                "final acc": s.get("final_test_acc"),
                "best acc": s.get("best_test_acc"),
                "train loss": s.get("final_train_loss"),
                "test loss": s.get("final_test_loss"),
                "train time [s]": s.get("train_seconds"),
                "time to 90% [s]": s.get("time_to_90"),
                "epochs": s.get("epochs"),
                "conditions": checks_text(s.get("checks")),
                "run": run.path.name,
            }
        )
    return pd.DataFrame(rows)


def curves_frame(sweep: Sweep) -> pd.DataFrame:
    rows = []
    for run in sweep.finished:
        for record in run.summary.get("history", []):
            rows.append(
                {
                    "model": run.label,
                    "twin": run.twin,
                    "dataset": run.summary["dataset"],
                    "width": run.config.get("width"),
                    "seed": run.config.get("seed"),
                    "epoch": record["epoch"] + 1,
                    "test accuracy": record.get("test_acc"),
                    "train loss": record.get("train_loss"),
                    "test loss": record.get("test_loss"),
                }
            )
    return pd.DataFrame(rows)


def _order(models) -> list[str]:
    def key(model: str):
        twin = twin_of(model)
        return (TWIN_ORDER.index(twin) if twin in TWIN_ORDER else 99, model)

    return sorted(set(models), key=key)


def _palette(models) -> dict:
    colors = sns.color_palette("deep", max(len(models), 5))
    by_twin: dict[str, list] = {}
    for model in models:
        by_twin.setdefault(twin_of(model), []).append(model)
    palette: dict[Any, Any] = {}  # model -> color
    for twin, members in by_twin.items():
        base = PALETTE.get(twin, colors[len(palette) % len(colors)])
        shades = sns.light_palette(base, n_colors=len(members) + 2, reverse=True)[: len(members)]
        palette.update(dict(zip(members, [base] if len(members) == 1 else shades)))
    return palette


# ------------------------------------------------------------------------------------------------ figures
def figure_benchmark(sweep: Sweep, out: Path) -> list[Path]:
    """Fig 2: final accuracy and time to 90% of it, per model; one figure per dataset and width."""
    frame = summary_frame(sweep)
    frame = frame[frame["status"] == "complete"]
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]):
        order = _order(part["model"])
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.3 * len(order), 4.2))
        palette = _palette(order)
        for ax, column, title in (
            (axes[0], "final acc", "Final test accuracy"),
            (axes[1], "time to 90% [s]", "Time to 90% of final accuracy"),
        ):
            sns.barplot(
                data=part,
                x="model",
                y=column,
                hue="model",
                order=order,
                hue_order=order,
                palette=palette,
                errorbar=("ci", 95),
                seed=0,
                capsize=0.15,
                ax=ax,
                legend=False,
            )
            ax.set_title(title)
            ax.set_xlabel("")
            ax.set_ylabel("accuracy" if column == "final acc" else "training wall time [s]")
            ax.tick_params(axis="x", rotation=30)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
        seeds = part.groupby("model")["seed"].nunique().max()
        fig.suptitle(f"{dataset}, width {width}" + (f" (mean, 95% CI over {seeds} seeds)" if seeds > 1 else ""))
        fig.tight_layout()
        paths.append(_save(fig, out / f"benchmark_{dataset}_{width}.png"))
    return paths


def figure_curves(sweep: Sweep, out: Path, select=None, suffix: str = "") -> list[Path]:
    """Fig 3: test accuracy, train and test loss per epoch; the twins of one dataset and width share axes."""
    frame = curves_frame(sweep)
    if select is not None:
        frame = frame[frame["model"].isin(select)]
    paths = []
    for (dataset, width), part in frame.groupby(["dataset", "width"]):
        order = _order(part["model"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, column in zip(axes, ("test accuracy", "train loss", "test loss")):
            sns.lineplot(
                data=part,
                x="epoch",
                y=column,
                hue="model",
                hue_order=order,
                palette=_palette(order),
                errorbar=("ci", 95),
                seed=0,
                marker="o",
                ax=ax,
            )
            ax.set_title(column.capitalize())
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if "loss" in column and (part[column].dropna() > 0).all():
                ax.set_yscale("log")
            ax.legend(title=None, fontsize=8)
        seeds = part.groupby("model")["seed"].nunique().max()
        fig.suptitle(f"{dataset}, width {width}" + (f" (mean, 95% CI over {seeds} seeds)" if seeds > 1 else ""))
        fig.tight_layout()
        paths.append(_save(fig, out / f"curves_{dataset}_{width}{suffix}.png"))
    return paths


def figure_weights(sweep: Sweep, out: Path) -> list[Path]:
    """Fig 5: distributions of the first two and the last two weight layers, per model (seeds pooled)."""
    paths = []
    for (dataset, width), runs in sorted(_by_model(sweep).items()):
        order = _order(runs)
        L = len(_weights(runs[order[0]][0]))
        layers = sorted({0, 1, L - 2, L - 1})
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6))
        palette = _palette(order)
        for ax, l in zip(axes, layers):
            for model in order:
                values = torch.cat([_weights(run)[l].flatten() for run in runs[model]]).numpy()
                seeds = f" ({len(runs[model])} seeds)" if len(runs[model]) > 1 else ""
                sns.kdeplot(values, ax=ax, label=model + seeds, color=palette[model], fill=False, bw_adjust=0.8, cut=0)
            ax.set_title(f"W{l + 1}" + (" (output)" if l == L - 1 else " (first)" if l == 0 else ""))
            ax.set_xlabel("weight")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Weight distributions, {dataset}, width {width}")
        fig.tight_layout()
        paths.append(_save(fig, out / f"weights_{dataset}_{width}.png"))
    return paths


def _by_model(sweep: Sweep, select=None) -> dict[tuple, dict[str, list[Run]]]:
    """Finished runs by (dataset, width), then by label; several runs under one label are seeds."""
    groups: dict[tuple, dict[str, list[Run]]] = {}
    for run in sweep.finished:
        if select is None or run.label in select:
            groups.setdefault(run.group[:2], {}).setdefault(run.label, []).append(run)
    return groups


def _weights(run: Run) -> list[torch.Tensor]:
    state = torch.load(run.path / "weights.pt", map_location="cpu")
    count = sum(1 for k in state if k.startswith("mlp.layers.") and k.endswith(".weight"))
    return [state[f"mlp.layers.{l}.weight"].float() for l in range(count)]


_DATASETS: dict = {}


def _loss_setting(run: Run, samples: int, seed: int):
    """What a run's landscape is measured on: its trained weights and biases (float64) and a fixed training subset."""
    from pcsweep.data import load_dataset
    from pcsweep.settings import dataset_settings

    cfg = OmegaConf.create(run.config)
    key = OmegaConf.to_yaml(cfg.dataset)
    if key not in _DATASETS:  # one load per dataset for the whole report
        _DATASETS[key] = load_dataset(dataset_settings(run.config["dataset"]))
    data = _DATASETS[key]
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train), generator=gen)[:samples]
    inputs = data.train.inputs[index].double()
    target = torch.nn.functional.one_hot(data.train.labels[index], data.num_classes).double()
    state = torch.load(run.path / "weights.pt", map_location="cpu")
    L = sum(1 for k in state if k.startswith("mlp.layers.") and k.endswith(".weight"))
    weights = [state[f"mlp.layers.{l}.weight"].double() for l in range(L)]
    biases = [state[f"mlp.layers.{l}.bias"].double() for l in range(L)]
    return cfg, weights, biases, inputs, target


def run_landscape(run: Run, span: float, resolution: int, samples: int, seed: int, quiet: bool = False) -> dict:
    """The landscape of one run, cached in its folder under a name that says how it was computed."""
    cache = run.path / f"landscape_span{span:g}_res{resolution}_n{samples}_seed{seed}.pt"
    if cache.is_file():
        return torch.load(cache)
    cfg, weights, biases, inputs, target = _loss_setting(run, samples, seed)

    interactive = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:  # a live counter on a terminal, one line per landscape in a log
        if not quiet and (interactive or done == total):
            print(
                f"{chr(13) if interactive else ''}[pcsweep.report] landscape {run.label} span {span:g}: "
                f"{done}/{total} points",
                end="" if interactive else "\n",
                file=sys.stderr,
                flush=True,
            )

    result = landscape(
        weights,
        biases,
        inputs,
        target,
        cfg.activation,
        cfg.output_loss,
        span=span,
        resolution=resolution,
        seed=seed,
        progress=progress,
    ).to_dict()
    if not quiet and interactive:
        print(file=sys.stderr)
    torch.save(result, cache)
    return result


def figure_landscapes(
    sweep: Sweep,
    out: Path,
    spans=(1.0, 0.1),
    resolution: int = 41,
    samples: int = 1000,
    seed: int = 0,
    select=None,
    suffix: str = "",
    quiet: bool = False,
) -> list[Path]:
    """Figs 4 and 7: per model, contour plots (wide and zoomed) and a 3-D surface of the wide view; with several
    seeds, the mean of their log-loss surfaces."""
    paths = []
    for (dataset, width), runs in sorted(_by_model(sweep, select).items()):
        order = _order(runs)
        fig = plt.figure(figsize=(4.2 * len(order), 3 * 4.0))
        for col, model in enumerate(order):
            views = []
            for span in spans:
                per_seed = [run_landscape(run, span, resolution, samples, seed, quiet) for run in runs[model]]
                mean = torch.stack([torch.log10(v["losses"].clamp_min(1e-12)) for v in per_seed]).mean(0)
                views.append({"alphas": per_seed[0]["alphas"], "betas": per_seed[0]["betas"], "log_losses": mean})
            seeds = f", mean of {len(runs[model])} seeds" if len(runs[model]) > 1 else ""
            for row, (span, view) in enumerate(zip(spans, views)):
                ax = fig.add_subplot(3, len(order), row * len(order) + col + 1)
                a, b = torch.meshgrid(view["alphas"], view["betas"], indexing="ij")
                z = view["log_losses"]
                contour = ax.contourf(a.numpy(), b.numpy(), z.numpy(), levels=30, cmap="viridis")
                ax.contour(a.numpy(), b.numpy(), z.numpy(), levels=10, colors="white", linewidths=0.4)
                ax.plot(0, 0, "r*", markersize=8)
                fig.colorbar(contour, ax=ax, label="log10 loss")
                ax.set_title(f"{model}{seeds}\n{'zoomed ' if row else ''}[-{span:g}, {span:g}]²", fontsize=9)
                ax.set_xlabel("direction 1")
                ax.set_ylabel("direction 2")
            ax3 = fig.add_subplot(3, len(order), 2 * len(order) + col + 1, projection="3d")
            a, b = torch.meshgrid(views[0]["alphas"], views[0]["betas"], indexing="ij")
            z = views[0]["log_losses"]
            ax3.plot_surface(a.numpy(), b.numpy(), z.numpy(), cmap="viridis", linewidth=0, antialiased=True)
            ax3.set_title(f"{model}: surface", fontsize=9)
            ax3.set_zlabel("log10 loss")
        fig.suptitle(f"Loss landscapes (Li et al. 2018, filter-normalized), {dataset}, width {width}")
        fig.tight_layout()
        paths.append(_save(fig, out / f"landscapes_{dataset}_{width}{suffix}.png"))
    return paths


def weight_decay_models(sweep: Sweep) -> Optional[list[str]]:
    """Labels of one twin trained with and without weight decay, if the sweep has such a pair."""
    by_name: dict[str, set] = {}
    for run in sweep.finished:
        by_name.setdefault(run.name, set()).add(run.label)
    for labels in by_name.values():
        if any("wd=" in label for label in labels) and any("wd=" not in label for label in labels):
            return sorted(labels)
    return None


# ------------------------------------------------------------------------------------------------ claims
def run_shape(run: Run, spans, resolution: int, samples: int, seed: int = 0, quiet: bool = False) -> dict:
    """The landscape's shape as numbers (README: "Landscape shape"): the plane's convex share in the wide and zoomed
    views, the Hessian's extreme eigenvalues at the trained weights, and the loss increase at the zoomed radius."""
    views = {}
    for name, span in (("wide", max(spans)), ("zoomed", min(spans))):
        grid = run_landscape(run, span, resolution, samples, seed, quiet)
        views[name] = plane_convexity(grid["losses"], grid["alphas"])
    cache = run.path / f"shape_n{samples}_r{min(spans):g}_seed{seed}.json"
    measured = read_json(cache)
    if measured is None:
        cfg, weights, biases, inputs, target = _loss_setting(run, samples, seed)
        args = (weights, biases, inputs, target, cfg.activation, cfg.output_loss)
        measured = {
            "hessian": hessian_extremes(*args, seed=seed),
            "sharpness": sharpness(*args, radius=min(spans), seed=seed),
        }
        write_atomic(cache, json.dumps(measured))
    return {**views, **measured}


def run_facts(sweep: Sweep, shapes: dict[Path, dict]) -> list[dict]:
    """What the claims read of each run (pcsweep.claims), every run included: failed ones make claims inconclusive."""
    facts = []
    bp_weights = {}
    for run in sweep.finished:
        if run.twin == "bp":
            bp_weights[(run.summary["dataset"], run.config.get("width"), run.config.get("seed"))] = _weights(run)
    for run in sweep.runs:
        s, checks = run.summary, run.summary.get("checks") or {}
        layers = (s.get("layers") or [{}])[-1]
        variance = (checks.get("variance") or {}).get("layers")
        fact = {
            "label": run.label,
            "twin": run.twin,
            "dataset": s["dataset"],
            "width": run.config.get("width"),
            "seed": run.config.get("seed"),
            "lr": (run.config.get("optimizer") or {}).get("lr"),
            "family": run.family,
            "weight_decay": run.config.get("weight_decay") or 0.0,
            "status": s["status"],
            "final_acc": s.get("final_test_acc"),
            "test_loss": s.get("final_test_loss"),
            "t90": s.get("time_to_90"),
            "condition2": (checks.get("condition2") or {}).get("verdict"),
            "inference": (checks.get("inference") or {}).get("verdict"),
            "change": layers.get("change"),
            "gaussian": layers.get("gaussian_distance"),
            "log_variance_mean": [v["mean"] for v in variance] if variance else None,
            "shape": shapes.get(run.path),
        }
        bp = bp_weights.get((s["dataset"], fact["width"], fact["seed"]))
        if bp is not None and run.twin != "bp" and s["status"] == "complete":
            fact["weight_distance"] = [wasserstein1(w, b) for w, b in zip(_weights(run), bp)]
        facts.append(fact)
    return facts


def _fmt_value(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def claims_frame(results: list[dict]) -> pd.DataFrame:
    rows = []
    for claim in results:
        for group in claim["groups"]:
            ci = group.get("ci")
            rows.append(
                {
                    "claim": claim["id"],
                    "setting": f"{group['dataset']}" + (f", width {group['width']}" if group.get("width") else ""),
                    "value": _fmt_value(group.get("value")),
                    "95% CI": f"[{ci[0]:.3g}, {ci[1]:.3g}]"
                    if ci
                    else (f"{group['n']} seed: no interval" if group.get("n") == 1 else "-"),
                    "seeds": group.get("n", 0),
                    "verdict": group["verdict"],
                    "reason": group.get("reason") or "",
                }
            )
    return pd.DataFrame(rows)


def write_claims(sweep: Sweep, out: Path, rules: ClaimRules, shapes: dict[Path, dict]) -> tuple[list[dict], Path]:
    results = evaluate(run_facts(sweep, shapes), rules)
    path = out / "claims.json"
    path.write_text(json.dumps(claims_document(results, rules), indent=1, sort_keys=True))
    return results, path


def figure_layers(sweep: Sweep, out: Path) -> list[Path]:
    """Where learning and error sit, per layer: relative change from the initial weights, distance from a Gaussian
    and (PC) the error energy per layer at the end of inference; seeds averaged."""
    rows = []
    for run in sweep.finished:
        layers = (run.summary.get("layers") or [{}])[-1]
        probes = run.summary.get("conditions") or []
        energy = probes[-1]["condition2"].get("layer_energy_at_T") if probes else None
        for l, change in enumerate(layers.get("change") or []):
            rows.append(
                {
                    "model": run.label,
                    "dataset": run.summary["dataset"],
                    "width": run.config.get("width"),
                    "layer": l + 1,
                    "relative change": change,
                    "distance from Gaussian": layers["gaussian_distance"][l],
                    "error energy at T": energy[l] if energy else None,
                }
            )
    frame = pd.DataFrame(rows)
    paths: list[Path] = []
    if frame.empty:
        return paths
    for (dataset, width), part in frame.groupby(["dataset", "width"]):
        order = _order(part["model"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, column in zip(axes, ("relative change", "distance from Gaussian", "error energy at T")):
            data = part.dropna(subset=[column])
            if data.empty:
                ax.set_visible(False)
                continue
            sns.lineplot(
                data=data,
                x="layer",
                y=column,
                hue="model",
                hue_order=_order(data["model"]),
                palette=_palette(order),
                errorbar=("ci", 95),
                seed=0,
                marker="o",
                ax=ax,
            )
            ax.set_title(column.capitalize() + (" (PC)" if column == "error energy at T" else ""))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if column != "distance from Gaussian" and (data[column] > 0).all():
                ax.set_yscale("log")
            ax.legend(title=None, fontsize=8)
        fig.suptitle(f"Per layer (1 = input side), {dataset}, width {width}")
        fig.tight_layout()
        paths.append(_save(fig, out / f"layers_{dataset}_{width}.png"))
    return paths


def variance_frame(sweep: Sweep, labels) -> pd.DataFrame:
    """Mean log S per layer and label (seeds averaged), from each run's last variance statistics."""
    columns: dict[str, list[list[float]]] = {}  # label -> per run, each layer's mean log S
    for run in sweep.finished:
        layers = ((run.summary.get("checks") or {}).get("variance") or {}).get("layers")
        if run.label in labels and layers:
            columns.setdefault(run.label, []).append([layer["mean"] for layer in layers])
    frame = pd.DataFrame({label: [sum(col) / len(col) for col in zip(*rows)] for label, rows in columns.items()})
    frame.insert(0, "layer", [f"S{l + 1}" for l in range(len(frame))])
    return frame


def shape_frame(sweep: Sweep, shapes: dict[Path, dict]) -> pd.DataFrame:
    rows = []
    for run in sweep.finished:
        shape = shapes.get(run.path)
        if shape:
            rows.append(
                {
                    "model": run.label,
                    "dataset": run.summary["dataset"],
                    "seed": run.config.get("seed"),
                    "lambda_max": shape["hessian"]["lambda_max"],
                    "lambda_min": shape["hessian"]["lambda_min"],
                    "|min/max|": shape["hessian"]["ratio"],
                    "convex share (wide)": shape["wide"]["convex_fraction"],
                    "convex share (zoomed)": shape["zoomed"]["convex_fraction"],
                    "convex radius": shape["wide"]["convex_radius"],
                    f"loss rise at r={shape['sharpness']['radius']:g}": shape["sharpness"]["increase"],
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = {model: i for i, model in enumerate(_order(frame["model"]))}
    return frame.sort_values(["dataset", "model", "seed"], key=lambda c: c.map(order) if c.name == "model" else c)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ documents
def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0)


def _table_md(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else frame.to_string(index=False)


def claims_parts(results: list[dict]) -> tuple[list[str], list[str]]:
    """The claims section: per claim its verdict, what was measured, and one row per setting (html, markdown)."""
    intro = (
        "Each claim of the paper as measured here; the verdict rules and thresholds are in the README and in "
        "claims.json. Intervals are 95% Student-t intervals over seeds (paired by seed)."
    )
    html_parts, md = (
        ["<h2>The paper's claims</h2>", f"<p>{html.escape(intro)}</p>"],
        ["## The paper's claims", "", intro, ""],
    )
    frame = claims_frame(results)
    for claim in results:
        head = f"Claim {claim['id']}: {claim['claim']} — {claim['verdict']}" + (
            f" ({claim['reason']})" if claim["reason"] else ""
        )
        rows = frame[frame["claim"] == claim["id"]].drop(columns=["claim"])
        html_parts += [
            f"<h3>{html.escape(head)}</h3>",
            f"<p><i>{html.escape(claim['statistic'])}</i></p>",
            _table_html(rows),
        ]
        md += [f"### {head}", "", f"*{claim['statistic']}*", "", _table_md(rows), ""]
    return html_parts, md


def write_documents(
    sweep: Sweep,
    out: Path,
    sections: list[tuple[str, str, list[Path]]],
    claims: Optional[list[dict]] = None,
    tables: Sequence[tuple[str, str, pd.DataFrame]] = (),
) -> tuple[Path, Path]:
    frame = summary_frame(sweep).drop(columns=["twin"])
    notes = [f"{s['model']}: {s['reason']}" for s in sweep.skipped]
    notes += [
        f"{r.label} ({r.summary['dataset']}): diverged ({r.summary.get('diverged_reason') or 'non-finite'}), "
        "left out of the figures"
        for r in sweep.runs
        if r.summary["status"] == "diverged"
    ]
    notes += [
        f"{r.label} ({r.summary['dataset']}): failed to learn (final accuracy "
        f"{r.summary.get('final_test_acc') or 0:.3f}), left out of the figures and rankings"
        for r in sweep.runs
        if r.summary["status"] == "failed_to_learn"
    ]
    parts = [f"<h1>pcsweep report: {html.escape(sweep.path.name)}</h1>", "<h2>Runs</h2>", _table_html(frame)]
    if notes:
        parts += ["<h2>Not shown</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
    md = [f"# pcsweep report: {sweep.path.name}", "", "## Runs", "", _table_md(frame), ""]
    if notes:
        md += ["## Not shown", ""] + [f"- {n}" for n in notes] + [""]
    if claims is not None:
        claim_html, claim_md = claims_parts(claims)
        parts += claim_html
        md += claim_md
    for title, text, table in tables:
        if not table.empty:
            parts += [f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>", _table_html(table)]
            md += [f"## {title}", "", text, "", _table_md(table), ""]
    for title, text, images in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>")
        parts += [f'<img src="{_embed(p)}" alt="{html.escape(p.name)}">' for p in images]
        md += [f"## {title}", "", text, ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}img{max-width:100%;"
        "margin:0.5em 0}table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}th{background:#f3f3f3}"
    )
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>pcsweep report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    md_path.write_text("\n".join(md))
    return html_path, md_path


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def build_report(
    sweep_dir: Path,
    spans=(1.0, 0.1),
    resolution: int = 41,
    samples: int = 1000,
    landscapes: bool = True,
    quiet: bool = False,
    rules: Optional[ClaimRules] = None,
) -> Path:
    sweep = load_sweep(Path(sweep_dir))
    rules = rules or ClaimRules()
    out = sweep.path / "report"
    out.mkdir(exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    sections = [
        (
            "Benchmark (Fig 2)",
            "Final test accuracy and training wall time to reach 90% of it.",
            figure_benchmark(sweep, out),
        ),
        ("Curves (Fig 3)", "Test accuracy, train and test loss per epoch.", figure_curves(sweep, out)),
        ("Weight distributions (Fig 5)", "First two and last two weight layers.", figure_weights(sweep, out)),
        (
            "Per layer",
            "Relative change of each weight layer from its initial values, distance of its distribution "
            "from a Gaussian (1-D Wasserstein of the standardized weights), and for PC the error energy per layer at "
            "the update point on the probe batch.",
            figure_layers(sweep, out),
        ),
    ]
    if landscapes:
        sections.append(
            (
                "Loss landscapes (Figs 4, 7)",
                f"Feedforward output loss on {samples} training samples along two filter-normalized Gaussian "
                f"directions, {resolution}x{resolution} grid; wide, zoomed and as a surface. The star is the trained "
                "model.",
                figure_landscapes(sweep, out, spans, resolution, samples, quiet=quiet),
            )
        )
    pair = weight_decay_models(sweep)
    tables: list = []
    if pair:
        images = figure_curves(sweep, out, select=pair, suffix="_weight_decay")
        if landscapes:
            images += figure_landscapes(
                sweep, out, spans, resolution, samples, select=pair, suffix="_weight_decay", quiet=quiet
            )
        sections.append(("Weight decay (Fig 6)", "The same twin with and without weight decay.", images))
        tables.append(
            (
                "Weight decay: what it did to the variances",
                "Mean log S per weight layer (over neurons, then "
                "seeds) at the end of training, with and without decay; 0 is S = 1, where the decay pulls.",
                variance_frame(sweep, pair),
            )
        )
    shapes = (
        {run.path: run_shape(run, spans, resolution, samples, quiet=quiet) for run in sweep.finished}
        if landscapes
        else {}
    )
    claims, _ = write_claims(sweep, out, rules, shapes)
    tables += [
        (
            "Landscape shape",
            "Extreme eigenvalues of the loss Hessian over all weights at the trained point "
            "(Lanczos on Hessian-vector products), the share of the plotted plane where the 2x2 Hessian is convex "
            "(|min(λ,0)/λmax| <= 0.1), the radius of the convex disc, and the mean loss increase along 16 "
            "random filter-normalized directions at the zoomed radius.",
            shape_frame(sweep, shapes),
        )
    ]
    html_path, _ = write_documents(sweep, out, sections, claims, tables)
    return html_path


def log_to_wandb(html_path: Path, sweep_dir: Path, options: Optional[dict] = None) -> None:
    """The report's figures as one W&B run (job type ``report``, grouped and tagged by the sweep, whose training runs
    carry the same ``sweep=`` tag), offline without a key, as training runs are; the report folder as a ``report``
    artifact."""
    import wandb

    from pcsweep.tracking import start_wandb

    manifest = read_manifest(Path(sweep_dir))
    sweep = (manifest.get("sweep_id") if manifest is not None else None) or Path(sweep_dir).name
    run = start_wandb(
        html_path.parent,
        **(options or {}),
        name=f"report {Path(sweep_dir).name}",
        group=sweep,
        job_type="report",
        tags=[f"sweep={sweep}"[:64]],
        config={"sweep": sweep},
    )
    try:
        run.log({p.stem: wandb.Image(str(p)) for p in html_path.parent.glob("*.png")})
        run.log({"report": wandb.Html(html_path.read_text())})
        claims_path = html_path.parent / "claims.json"
        if claims_path.is_file():
            claims = json.loads(claims_path.read_text())["claims"]
            run.log({"claims": wandb.Table(dataframe=claims_frame(claims).astype(str))})
            run.summary.update({f"claim{c['id']}": c["verdict"] for c in claims})
            artifact = wandb.Artifact(f"claims-{Path(sweep_dir).name}", type="claims")
            artifact.add_file(str(claims_path))
            run.log_artifact(artifact)
        # the report folder's own files (html, md, figures, claims.json), not its wandb/ folder
        files = sorted(
            p for p in html_path.parent.iterdir() if p.is_file() and p.suffix in (".html", ".md", ".png", ".json")
        )
        if not run.disabled and files:
            artifact = wandb.Artifact(f"report-{Path(sweep_dir).name}", type="report", metadata={"sweep": sweep})
            for path in files:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
    finally:
        run.finish()


def parse_rules(items: Sequence[str]) -> dict:
    rules = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--rule {item!r}: expected NAME=VALUE")
        rules[name] = int(value) if name in ("min_seeds", "deep_layers") else float(value)
    return rules


def claims_overview(path: Path) -> str:
    """One line per claim, for the terminal."""
    claims = json.loads(path.read_text())["claims"]
    return "\n".join(
        f"  claim {c['id']}: {c['verdict']}" + (f" ({c['reason']})" if c["reason"] else "") for c in claims
    )


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="pcsweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder, e.g. multirun/default")
    parser.add_argument("--resolution", type=int, default=41, help="landscape grid points per axis")
    parser.add_argument("--samples", type=int, default=1000, help="training samples the landscape loss uses")
    parser.add_argument("--spans", type=float, nargs="+", default=[1.0, 0.1], help="wide and zoomed half-widths")
    parser.add_argument("--no-landscapes", action="store_true", help="skip the (expensive) landscapes")
    parser.add_argument("--wandb", action="store_true", help="also log the figures to W&B")
    parser.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a claim-verdict threshold (pcsweep.claims.ClaimRules), e.g. --rule accuracy_margin=0.01",
    )
    args = parser.parse_args(argv)
    try:
        rules = ClaimRules.from_mapping(parse_rules(args.rule))
        html_path = build_report(
            args.sweep, tuple(args.spans), args.resolution, args.samples, landscapes=not args.no_landscapes, rules=rules
        )
    except (FileNotFoundError, ValueError) as exc:
        exit_with(str(exc), prog="pcsweep-report")
    print(f"[pcsweep.report] {html_path}")
    print(claims_overview(html_path.parent / "claims.json"))
    if args.wandb:
        log_to_wandb(html_path, args.sweep)
    return html_path


def cli() -> None:
    """The ``pcsweep-report`` command (``python -m pcsweep.report``)."""
    main()


if __name__ == "__main__":
    cli()
