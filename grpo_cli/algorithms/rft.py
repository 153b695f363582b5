"""RFT and online RFT: rejection-sampling fine-tuning, the paradigm's 0/1 gradient coefficient.

RFT
    data source D: SFT questions, outputs sampled once from the SFT model, kept when correct
                   (source=rft, grpo_cli/trainer/offline.py)
    reward:        rule (correct or not), stored with each sample
    GC:            1 if o is correct, else 0   (every served sample is correct: GC = 1)

Online RFT
    data source D: SFT questions, outputs sampled from the live policy (source=online)
    reward:        rule (correct or not)
    GC:            1 if o is correct, else 0   (DeepSeekMath, section 5.2.1)

The loss is SFT's on the kept completions: by default the token mean over all completion tokens of
the batch (filtered ones count in the denominator, so an online step with few correct samples moves
less); ``aggregation=sequence`` averages each output over its own tokens (the paradigm's 1/|o|).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.models.policy import Policy


def rft_coefficients(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """GC per completion [B]: 1.0 where reward > threshold (kept), else 0.0 (filtered out)."""
    return (rewards > threshold).to(torch.float32)


@register_algorithm("online_rft")
class OnlineRFT(Algorithm):
    needs_rewards = True
    main_metric = "reward_mean"

    def __init__(self, *, threshold: float, aggregation: str):
        if aggregation not in ("token", "sequence"):
            raise UserError(f"algorithm.aggregation: expected 'token' or 'sequence', got '{aggregation}'")
        self.threshold, self.aggregation = threshold, aggregation

    def prepare(self, batch: Batch, policy: Policy) -> Batch:
        batch.tensors["gc"] = rft_coefficients(batch.rewards, self.threshold)
        batch.stats.update(reward_mean=float(batch.rewards.mean()), kept=float(batch.tensors["gc"].mean()))
        return batch

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        logp, _ = policy.logprobs(batch, temperature=batch.totals.get("temperature", 1.0))
        gc = batch.tensors["gc"][:, None].expand_as(logp)  # [B, T-1]: every token of o gets GC(o)
        loss = F.aggregate(
            -gc * logp,
            batch.target_mask,
            mode=self.aggregation,
            total_sequences=batch.totals["sequences"],
            total_tokens=batch.totals["tokens"],
            max_tokens=logp.shape[1],
        )
        gc_mean, gc_std = F.masked_mean_std(gc, batch.target_mask)
        return loss, {"gc_mean": gc_mean, "gc_std": gc_std, "gc_positive": gc_mean, "gc_negative": 0.0}


@register_algorithm("rft")
class RFT(OnlineRFT):
    """Offline RFT: the same filter and loss; the data source (source=rft) is what differs."""
