"""``python -m pcsweep.bench``: the FLOP floor (``floor``), the engine (``engine``), the Lightning pipeline
(``pipeline``), PCX on the same workload (``peers``, ``pcx_mlp``), the paper grid projected (``projections``), packs
(``packs``) and inference solvers (``solvers``); ``tables`` runs them and prints the tables, over the workload of
``setup``."""
