"""``python -m pcsweep [-m] key=value ...``: the Hydra entry point (configs in the repository's ``conf/``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pcsweep.config import quote_numeric_choices, register_resolvers
from pcsweep.errors import UserError, exit_with

CONFIG_DIR = os.environ.get("PCSWEEP_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    from pcsweep.run import train  # heavy imports (torch, Lightning) only once Hydra has parsed the command line

    from pcsweep.interruption import Interrupted

    try:
        return train(cfg)
    except UserError as exc:  # bad input: one line, no traceback, exit status 2
        exit_with(str(exc))
    except Interrupted as exc:  # a signal: checkpointed; 128 + the signal's number, as a shell reports it
        print(f"pcsweep: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(128 + exc.signum) from None


if __name__ == "__main__":
    sys.argv = [sys.argv[0]] + [quote_numeric_choices(arg) for arg in sys.argv[1:]]
    main()
