"""pcsweep as a user installs it: a wheel in a fresh virtual environment, run from an empty folder."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["width=16", "depth=2", "epochs=1", "inference.steps=8", "tracking.chance_margin=-1", "report.landscapes=false"]


def run(command: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **env},
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this checkout (its dependencies come from the test environment's
    site-packages through a .pth file: the point is what the wheel itself ships, not re-downloading torch)."""
    base = tmp_path_factory.mktemp("install")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", base / "dist", ROOT],
        cwd=base,
    )
    (wheel,) = (base / "dist").glob("pcsweep-*.whl")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base)
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout.strip()
    (Path(site) / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=base)
    return venv / "bin"


@pytest.mark.slow
def test_the_wheel_runs_a_sweep_and_its_report_from_an_empty_folder(installed, tmp_path):
    where = run(
        [
            installed / "python",
            "-c",
            "import pcsweep, hydra_plugins.pcsweep_sweeper as s; print(pcsweep.__file__); print(s.__file__)",
        ],
        cwd=tmp_path,
    ).stdout.split()
    assert all(str(installed.parent) in path for path in where), where  # the wheel's code, not this checkout's
    # the configs ship inside the package; relax=2 needs no quoting from the console script
    result = run([installed / "pcsweep", "-m", "algo=bp,pc", "relax=none,2", *TINY], cwd=tmp_path)
    sweep = tmp_path / "multirun" / "default"
    assert (sweep / "summary.csv").is_file() and "[pcsweep] skipped bp_16_2 relax=2" in result.stdout
    names = sorted(p.parent.name.split("_digits-")[0] for p in sweep.glob("*/summary.json"))
    assert names == ["bp_16_2", "pc_16_2", "pc_16_2_rc2"]
    assert all((p.parent / "pcsweep.log").read_text().count("training ") == 1 for p in sweep.glob("*/summary.json"))
    run([installed / "pcsweep-report", sweep, "--no-landscapes"], cwd=tmp_path)
    assert (sweep / "report" / "report.html").is_file()
    # python -m pcsweep is the same command (numeric relax included)
    composed = run([installed / "python", "-m", "pcsweep", "relax=3", "--cfg", "job", "--resolve"], cwd=tmp_path).stdout
    assert "relax: '3'" in composed and "variance: neuron" in composed  # the twin's own default, resolved


@pytest.mark.slow
def test_a_users_own_config_folder_adds_experiments(installed, tmp_path):
    """./conf where the command is typed is searched, and --config-dir adds any other folder."""
    experiment = "# @package _global_\nsweep_name: mine\nwidth: 12\ndepth: 2\nepochs: 1\ninference:\n  steps: 8\n"
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(experiment)
    (tmp_path / "elsewhere" / "experiment").mkdir(parents=True)
    (tmp_path / "elsewhere" / "experiment" / "theirs.yaml").write_text(experiment.replace("mine", "theirs"))
    mine = run([installed / "pcsweep", "experiment=mine", "relax=23", "--cfg", "job"], cwd=tmp_path).stdout
    theirs = run(
        [installed / "pcsweep", "--config-dir", "elsewhere", "experiment=theirs", "--cfg", "job"], cwd=tmp_path
    )
    for composed, name in ((mine, "mine"), (theirs.stdout, "theirs")):
        assert f"sweep_name: {name}" in composed and "width: 12" in composed and "epochs: 1" in composed
