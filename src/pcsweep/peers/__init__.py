"""Peer benchmarks: other predictive-coding libraries timed on the same workload as pcsweep's engine."""
