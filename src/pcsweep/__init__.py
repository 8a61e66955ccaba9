"""pcsweep: backpropagation vs predictive coding, at sweep scale, from one command."""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# modules that moved into rooms (subpackages), by their old names: a stored run's config.yaml names
# ``pcsweep.wandb_run.wandb_logger`` as its logger's _target_, and user code may import the old names
MOVED = {
    "pcsweep.settings": "pcsweep.config.settings",
    "pcsweep.errors": "pcsweep.config.errors",
    "pcsweep.twins": "pcsweep.config.twins",
    "pcsweep.mlp": "pcsweep.model.mlp",
    "pcsweep.models": "pcsweep.model.twins",
    "pcsweep.datamodule": "pcsweep.data.datamodule",
    "pcsweep.run_folder": "pcsweep.run.folder",
    "pcsweep.pack": "pcsweep.run.pack",
    "pcsweep.interruption": "pcsweep.run.interruption",
    "pcsweep.devices": "pcsweep.run.devices",
    "pcsweep.files": "pcsweep.run.files",
    "pcsweep.summary": "pcsweep.sweep.table",
    "pcsweep.sweep_end": "pcsweep.sweep.end",
    "pcsweep.tuning": "pcsweep.sweep.tuning",
    "pcsweep.wandb_run": "pcsweep.track.wandb_run",
    "pcsweep.diagnostics": "pcsweep.track.diagnostics",
    "pcsweep.history": "pcsweep.track.history",
    "pcsweep.verdicts": "pcsweep.track.verdicts",
    "pcsweep.metrics_log": "pcsweep.track.metrics_log",
    "pcsweep.conditions": "pcsweep.track.conditions",
    "pcsweep.layers": "pcsweep.track.layers",
    "pcsweep.landscape": "pcsweep.report.landscape_math",
    "pcsweep.claims": "pcsweep.report.claims",
    "pcsweep.bench_setup": "pcsweep.bench.setup",
    "pcsweep.bench_packs": "pcsweep.bench.packs",
    "pcsweep.bench_solvers": "pcsweep.bench.solvers",
    "pcsweep.peers": "pcsweep.bench",
    "pcsweep.peers.pcx_mlp": "pcsweep.bench.pcx_mlp",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module it moved to: the same module object, not a second copy."""

    def __init__(self) -> None:
        self.own_specs: dict = {}  # importlib sets the old name's spec on the module: exec_module puts its own back

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self.own_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.own_specs.pop(module.__name__)


sys.meta_path.insert(0, _MovedModules())  # before the path finder, which would load a second copy under the old name
