"""The shared trainer: batches, data sources, the loop, the run directory."""

from pathlib import Path


def run_training(cfg) -> Path:
    """Train what ``cfg`` describes: the one loop, or the iterative-RL driver around it
    (``iterative.iterations > 0``). The CLI and the Hydra entry point both start runs here."""
    if cfg.iterative.iterations:
        from grpo_cli.trainer.iterative import run_iterative

        return run_iterative(cfg)
    from grpo_cli.trainer.loop import train

    return train(cfg)
