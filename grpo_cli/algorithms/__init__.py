"""Algorithms: each turns a batch and its rewards into a loss. Importing this package registers them."""

from grpo_cli.algorithms import dpo, grpo, ppo, reward_model, rft, sft  # noqa: F401  (registers them)
from grpo_cli.algorithms.base import ALGORITHMS, Algorithm, build_algorithm, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm", "register_algorithm"]
