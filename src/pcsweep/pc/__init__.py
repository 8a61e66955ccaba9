"""Predictive coding in pure torch (no Lightning, no Hydra).

- ``energy``: the math, as plain functions a reader checks against ``shared/paper.md``;
- ``schedule``: when inference steps and weight updates happen (one loop for every implementation);
- ``engine``: the same math for R >= 1 runs at once, on ``storage``'s preallocated layer-stacked buffers (a solo run,
  or a pack);
- ``solvers``: how inference moves, behind one interface and a registry (``inference.solver``): ``state_solver``
  (descent on the activities, the paper's dynamics) and ``error_solver`` (error optimization, over the errors);
- ``kernels``: which kernel computes each of the engine's products (speed only, measured by ``pcsweep.bench.tables``);
- ``members``: which runs may share an engine, and what a pack costs; ``gang``: a pack's members meeting per batch;
- ``reference``: the plain and the autograd implementations the engine is tested against.
"""

from pcsweep.pc.energy import ACTIVATIONS, OUTPUT_LOSSES, Activation, Network, get_activation, output_loss
from pcsweep.pc.engine import PCEngine
from pcsweep.pc.schedule import BatchResult, Inference, train_batch, train_batches
from pcsweep.pc.stability import activity_curvature

__all__ = [
    "ACTIVATIONS",
    "OUTPUT_LOSSES",
    "Activation",
    "BatchResult",
    "Inference",
    "Network",
    "PCEngine",
    "activity_curvature",
    "get_activation",
    "output_loss",
    "train_batch",
    "train_batches",
]
