"""The shared trainer: batches, data sources, the loop, the run directory."""
