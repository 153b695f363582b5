"""Online RFT: rejection-sampling fine-tuning on outputs sampled from the live policy.

    data source D: SFT questions, outputs sampled from the live policy (source=online)
    reward:        rule (correct or not)
    GC:            1 if o is correct, else 0   (DeepSeekMath, section 5.2.1)

The loss is SFT's on the kept completions, each averaged over its tokens (the paradigm's 1/|o|)
and the sum divided by all sampled completions, so a step with few correct samples moves less.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.models.policy import Policy
from grpo_cli.trainer.batch import Batch


def rft_coefficients(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """GC per completion [B]: 1.0 where reward > threshold (kept), else 0.0 (filtered out)."""
    return (rewards > threshold).to(torch.float32)


@register_algorithm("online_rft")
class OnlineRFT(Algorithm):
    needs_rewards = True
    main_metric = "reward_mean"

    def __init__(self, *, threshold: float):
        self.threshold = threshold

    def prepare(self, batch: Batch, policy: Policy) -> Batch:
        batch.tensors["gc"] = rft_coefficients(batch.rewards, self.threshold)
        batch.stats.update(reward_mean=float(batch.rewards.mean()), kept=float(batch.tensors["gc"].mean()))
        return batch

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        logp, _ = policy.logprobs(batch, temperature=batch.totals.get("temperature", 1.0))
        gc = batch.tensors["gc"][:, None].expand_as(logp)  # [B, T-1]: every token of o gets GC(o)
        loss = F.aggregate(-gc * logp, batch.target_mask, mode="sequence", total_sequences=batch.totals["sequences"],
                           total_tokens=batch.totals["tokens"], max_tokens=logp.shape[1])
        gc_mean, gc_std = F.masked_mean_std(gc, batch.target_mask)
        return loss, {"gc_mean": gc_mean, "gc_std": gc_std, "gc_positive": gc_mean, "gc_negative": 0.0}
