"""``python -m pcsweep.report``: the ``pcsweep-report`` command."""

from pcsweep.report import cli

if __name__ == "__main__":
    cli()
