"""What a run records of itself: metrics.csv (``metrics_log``), W&B (``wandb_run``), the per-epoch history and time
to 90% (``history``), its conditions (``conditions``) and per-layer learning (``layers``), the measuring callbacks
(``diagnostics``), and the verdicts it gets (``verdicts``)."""
