"""SFT: the unified paradigm's simplest member.

    data source D: human-chosen (q, o) pairs         reward: none         GC = 1

Loss: negative log-likelihood of the completion tokens (prompt masked), averaged over the completion
tokens of the whole batch.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.batch import Batch
from grpo_cli.models.policy import Policy


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, total_tokens: float) -> torch.Tensor:
    """-sum(logp * mask) / total_tokens.  logp, mask: [B, T-1]; total_tokens: tokens of the full batch."""
    return -(logp * mask).sum() / total_tokens


@register_algorithm("sft")
class SFT(Algorithm):
    main_metric = "target_prob"

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        logp, _ = policy.logprobs(batch)
        mask = batch.target_mask
        loss = sft_loss(logp, mask, batch.totals["tokens"])
        # Mean probability given to the reference token: free from the same log-probs, and easier
        # to read than the loss (0 for a random model of V tokens is 1/V, 1 when memorised).
        n = mask.sum().clamp(min=1)
        metrics = {
            "gc_mean": 1.0,
            "gc_std": 0.0,
            "gc_positive": 1.0,
            "gc_negative": 0.0,
            "target_prob": float(((logp.exp() * mask).sum() / n).detach()),
        }
        return loss, metrics
