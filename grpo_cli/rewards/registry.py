"""Reward functions (the paper's pi_rf) chosen by ``reward.name``; each maps a batch to rewards [B]."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from grpo_cli.errors import UserError, nearest
from grpo_cli.rewards.answer import outcome_rewards
from grpo_cli.trainer.batch import Batch

RewardFn = Callable[[Batch], torch.Tensor]
REWARDS: Dict[str, Callable[[Any], Optional[RewardFn]]] = {}


def register_reward(name: str):
    def deco(factory):
        REWARDS[name] = factory
        return factory

    return deco


@register_reward("none")
def _none(cfg) -> Optional[RewardFn]:
    return None


@register_reward("outcome")
def _outcome(cfg) -> RewardFn:
    """Rule: ``reward.correct`` when the final answer equals the reference, else ``reward.incorrect``."""

    def score(batch: Batch) -> torch.Tensor:
        r = outcome_rewards(batch.completions, batch.answers, correct=cfg.correct, incorrect=cfg.incorrect)
        return torch.tensor(r, dtype=torch.float32)

    return score


def build_reward(cfg) -> Optional[RewardFn]:
    if cfg.name not in REWARDS:
        raise UserError(f"reward.name: unknown reward '{cfg.name}': {nearest(cfg.name, REWARDS)}")
    return REWARDS[cfg.name](cfg)
