"""The shared trainer: the loop, data sources, checkpoints, the run directory, data parallelism."""
