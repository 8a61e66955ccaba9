"""Loss landscapes (Figs 4 and 7) and the landscape's shape as numbers, measured on each run's trained weights and a
fixed training subset. They are the report's expensive part: every measurement is cached in the run's folder under a
name that says how it was made, and each dataset is loaded once per process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from omegaconf import OmegaConf

from pcsweep.config.settings import dataset_settings
from pcsweep.data.datasets import load_dataset
from pcsweep.report.landscape_math import Objective, hessian_extremes, landscape, plane_convexity, sharpness
from pcsweep.report.style import save
from pcsweep.report.sweep import Run, Sweep, by_model, model_order
from pcsweep.run.files import read_json, write_atomic

_DATASETS: dict = {}  # dataset config (yaml) -> the loaded dataset: one load per dataset for the whole report


def _objective(run: Run, samples: int, seed: int) -> Objective:
    """What a run's landscape is measured on: its trained weights and biases (float64), a fixed training subset, and
    the run's activation and output loss."""
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
    return Objective(weights, biases, inputs, target, cfg.activation, cfg.output_loss)


def run_landscape(run: Run, span: float, resolution: int, samples: int, seed: int, quiet: bool = False) -> dict:
    """The landscape of one run, cached in its folder under a name that says how it was computed."""
    cache = run.path / f"landscape_span{span:g}_res{resolution}_n{samples}_seed{seed}.pt"
    if cache.is_file():
        return torch.load(cache)
    objective = _objective(run, samples, seed)

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

    result = landscape(objective, span=span, resolution=resolution, seed=seed, progress=progress).to_dict()
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
    for (dataset, width), runs in sorted(by_model(sweep, select).items()):
        order = model_order(runs)
        fig = plt.figure(figsize=(4.2 * len(order), 3 * 4.0))
        for col, model in enumerate(order):
            views = [_mean_view(runs[model], span, resolution, samples, seed, quiet) for span in spans]
            seeds = f", mean of {len(runs[model])} seeds" if len(runs[model]) > 1 else ""
            _draw_model(fig, (col, len(order)), model, seeds, spans, views)
        fig.suptitle(f"Loss landscapes (Li et al. 2018, filter-normalized), {dataset}, width {width}")
        fig.tight_layout()
        paths.append(save(fig, out / f"landscapes_{dataset}_{width}{suffix}.png"))
    return paths


def _mean_view(runs: list[Run], span: float, resolution: int, samples: int, seed: int, quiet: bool) -> dict:
    """One view of one model: its seeds' log10 losses averaged on the first seed's grid."""
    per_seed = [run_landscape(run, span, resolution, samples, seed, quiet) for run in runs]
    mean = torch.stack([torch.log10(v["losses"].clamp_min(1e-12)) for v in per_seed]).mean(0)
    return {"alphas": per_seed[0]["alphas"], "betas": per_seed[0]["betas"], "log_losses": mean}


def _draw_model(fig, column: tuple[int, int], model: str, seeds: str, spans, views: list[dict]) -> None:
    """One model's column (``column``: its index, and how many there are): a contour per view, then the wide view's
    surface."""
    col, columns = column
    for row, (span, view) in enumerate(zip(spans, views)):
        ax = fig.add_subplot(3, columns, row * columns + col + 1)
        a, b = torch.meshgrid(view["alphas"], view["betas"], indexing="ij")
        z = view["log_losses"]
        contour = ax.contourf(a.numpy(), b.numpy(), z.numpy(), levels=30, cmap="viridis")
        ax.contour(a.numpy(), b.numpy(), z.numpy(), levels=10, colors="white", linewidths=0.4)
        ax.plot(0, 0, "r*", markersize=8)
        fig.colorbar(contour, ax=ax, label="log10 loss")
        ax.set_title(f"{model}{seeds}\n{'zoomed ' if row else ''}[-{span:g}, {span:g}]²", fontsize=9)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    ax3 = fig.add_subplot(3, columns, 2 * columns + col + 1, projection="3d")
    a, b = torch.meshgrid(views[0]["alphas"], views[0]["betas"], indexing="ij")
    z = views[0]["log_losses"]
    ax3.plot_surface(a.numpy(), b.numpy(), z.numpy(), cmap="viridis", linewidth=0, antialiased=True)
    ax3.set_title(f"{model}: surface", fontsize=9)
    ax3.set_zlabel("log10 loss")


# ------------------------------------------------------------------------------------------------ shape
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
        objective = _objective(run, samples, seed)
        measured = {
            "hessian": hessian_extremes(objective, seed=seed),
            "sharpness": sharpness(objective, radius=min(spans), seed=seed),
        }
        write_atomic(cache, json.dumps(measured))
    return {**views, **measured}


def run_shapes(sweep: Sweep, spans, resolution: int, samples: int, quiet: bool = False) -> dict[Path, dict]:
    """``run_shape`` of every finished run, by run folder: what claims 5 and 6 and the shape table read."""
    return {run.path: run_shape(run, spans, resolution, samples, quiet=quiet) for run in sweep.finished}


def shape_frame(sweep: Sweep, shapes: dict[Path, dict]) -> pd.DataFrame:
    """One row per measured run, in the report's model order: the numbers ``run_shape`` gives."""
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
    order = {model: i for i, model in enumerate(model_order(frame["model"]))}
    return frame.sort_values(["dataset", "model", "seed"], key=lambda c: c.map(order) if c.name == "model" else c)
