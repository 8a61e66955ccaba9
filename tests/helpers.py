"""Running the real command line in a scratch folder, with the config shrunk to seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# the same model family, small: every twin still runs its full code path. Seconds of training do not reach a
# trained accuracy, so the "failed to learn" check is off here (tests/test_cli.py and test_conditions.py cover it).
SMALL = ["width=24", "depth=3", "epochs=2", "inference.steps=16", "batch_size=128", "tracking.chance_margin=-1"]


def pcsweep(cwd: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v != ""}  # "" in ``env`` unsets a variable
    return subprocess.run(
        [sys.executable, "-m", "pcsweep", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(cwd: Path, *args: str) -> subprocess.Popen:
    """The command started in the background (to signal or kill it mid-run), its stderr kept."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "pcsweep", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


CONF_DIR = str(Path(__file__).resolve().parents[1] / "src" / "pcsweep" / "conf")


def compose(*overrides: str, hydra_node: bool = False):
    """The real config, composed as the command line composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pcsweep.config.compose import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_node)


def compose_settings(*overrides: str):
    """``compose`` as typed, validated settings (pcsweep.config.settings.Settings)."""
    from pcsweep.config.compose import settings_from

    return settings_from(compose(*overrides))
