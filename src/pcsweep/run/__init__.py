"""One run's life: its task body (``task``), Lightning's Trainer (``trainer``), its folder (``folder``) and files
(``files``), packs of runs trained as one computation (``pack``), signals and mid-epoch checkpoints
(``interruption``), GPU slots and SLURM's environment (``devices``)."""
