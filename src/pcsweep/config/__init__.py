"""What a run is told: the typed settings (``settings``), composing and checking them once, paper names and a run's
identity (``compose``), the five twins' own defaults (``twins``), and bad input in one line (``errors``)."""
