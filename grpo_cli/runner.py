"""Start a training run: the one loop, or the iterative-RL driver around it (``iterative.iterations > 0``).
``grpo train``, ``grpo sweep``'s runs and the Hydra entry point all start here."""

from pathlib import Path

from omegaconf import DictConfig

from grpo_cli.iterative import run_iterative
from grpo_cli.trainer.loop import train


def run_training(cfg: DictConfig) -> Path:
    """Train what ``cfg`` describes; returns the run directory."""
    return run_iterative(cfg) if cfg.iterative.iterations else train(cfg)
