"""``pcsweep [-m] key=value ...`` (or ``python -m pcsweep``): the Hydra entry point.

The configs ship inside the package (``pcsweep/conf``). Your own experiments and site settings go in a folder of
your own, searched after pcsweep's (new names add options): ``./conf`` where you type the command, any other with
``--config-dir DIR`` (or ``hydra.searchpath=[file://DIR]``); ``conf/experiment/mine.yaml`` there is
``experiment=mine``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pcsweep.config.compose import register_resolvers  # also registers the typed schema and the twins' defaults
from pcsweep.config.errors import UserError, exit_with, release_stderr, run_with_one_line_errors

register_resolvers()
# ./conf is searched when it exists (conf/config.yaml's hydra.searchpath); Hydra warns when it does not
warnings.filterwarnings("ignore", "provider=hydra.searchpath in main, path=conf is not available")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    release_stderr()  # Hydra has composed the config: its own errors are behind us
    # heavy imports (torch, Lightning) only once Hydra has parsed the command line
    from hydra.core.hydra_config import HydraConfig

    from pcsweep.run.interruption import Interrupted
    from pcsweep.run.pack import train_pack
    from pcsweep.run.task import task_settings, train_settings

    try:
        settings = task_settings(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        return (train_settings if settings.pack.members is None else train_pack)(settings, run_dir)
    except UserError as exc:  # bad input: one line, no traceback, exit status 2
        exit_with(str(exc))
    except Interrupted as exc:  # a signal: checkpointed; 128 + the signal's number, as a shell reports it
        print(f"pcsweep: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(128 + exc.signum) from None


def cli() -> None:
    """The ``pcsweep`` command (``python -m pcsweep``): Hydra's, with a bad command line reported in one line."""
    run_with_one_line_errors(main)


if __name__ == "__main__":
    cli()
