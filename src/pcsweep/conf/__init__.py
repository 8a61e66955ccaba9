"""pcsweep's Hydra configs (found as pkg://pcsweep.conf): one folder per config group."""
