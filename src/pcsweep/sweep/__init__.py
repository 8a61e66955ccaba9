"""A sweep: planning which jobs train (``planning``), the tuning stage's rules and its launch (``tuning``,
``tuning_stage``), the stability pre-flight (``preflight``), the grid sweeper and Optuna's (``grid``, ``optuna``:
registered with Hydra by ``hydra_plugins.pcsweep_sweeper``), the sweep table (``table``) and the end of a command
(``end``)."""
