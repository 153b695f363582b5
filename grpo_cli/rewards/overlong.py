"""DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476, eq. 13), added to any reward.

    R_length(|o|) = 0                                  |o| <= L_max - L_cache
                    ((L_max - L_cache) - |o|) / L_cache  L_max - L_cache < |o| <= L_max
                    -1                                 L_max < |o|

times a penalty factor (verl's ``overlong_penalty_factor``), with L_max the rollout's
``max_new_tokens`` and L_cache the buffer. :func:`grpo_cli.rewards.registry.build_reward` wraps the
run's reward in :class:`OverlongReward` when ``reward.overlong_buffer`` > 0.
"""

from __future__ import annotations

import torch

from grpo_cli.batch import Batch
from grpo_cli.rewards.base import Reward


def overlong_penalty(lengths: torch.Tensor, *, max_tokens: float, buffer: float, penalty: float) -> torch.Tensor:
    """R_length * penalty [B] (<= 0) for completion lengths [B] in tokens (DAPO eq. 13)."""
    expected = max_tokens - buffer
    return ((expected - lengths) / buffer * penalty).clamp(min=-penalty, max=0.0)


class OverlongReward(Reward):
    """The wrapped reward plus :func:`overlong_penalty` of each completion, recorded per row as
    ``batch.tensors["reward/overlong"]`` [B] (its batch mean: the ``overlong_penalty`` metric). L_max is
    ``batch.totals["max_tokens"]``, which online sources set; a batch without it (stored samples) is
    scored as the wrapped reward alone."""

    def __init__(self, inner: Reward, *, buffer: int, penalty: float):
        self.inner, self.buffer, self.penalty = inner, buffer, penalty
        self.name, self.per_step, self.modules = inner.name, inner.per_step, inner.modules

    def bind(self, tokenizer) -> None:
        self.inner.bind(tokenizer)

    def __call__(self, batch: Batch) -> torch.Tensor:
        rewards = torch.as_tensor(self.inner(batch), dtype=torch.float32)
        if "max_tokens" not in batch.totals:
            return rewards
        lengths = batch.completion_span.sum(-1).to(device=rewards.device, dtype=torch.float32)  # [B] |o|
        shaped = overlong_penalty(
            lengths, max_tokens=batch.totals["max_tokens"], buffer=self.buffer, penalty=self.penalty
        )
        batch.tensors["reward/overlong"] = shaped.to(batch.completion_mask.device)
        batch.stats["overlong_penalty"] = float(shaped.mean())
        return rewards + shaped
