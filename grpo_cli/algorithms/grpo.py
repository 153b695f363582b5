"""GRPO: Group Relative Policy Optimisation (DeepSeekMath, section 4.1).

    data source D: groups of G outputs per question sampled from the live policy (source=online)
    reward:        a rule or a reward model; outcome or process supervision (algorithm.supervision)
    GC:            Ahat_{i,t} + beta * (pi_ref(o_{i,t}) / pi_theta(o_{i,t}) - 1)

No value model: the baseline is the group's mean reward. The KL to pi_ref is in the loss (k3
estimator), not in the reward. With mu = 1 the ratio to pi_old is exactly 1 and its gradient is the
policy gradient, so pi_old's log-probs need no extra forward pass.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.models.policy import Policy

AGGREGATIONS = ("sequence", "token", "constant")
SUPERVISIONS = ("outcome", "process")


@register_algorithm("grpo")
class GRPO(Algorithm):
    needs_rewards = True
    main_metric = "reward_mean"

    def __init__(
        self,
        *,
        beta: float,
        eps: float,
        eps_high: Optional[float],
        mu: int,
        aggregation: str,
        scale_rewards: bool,
        supervision: str = "outcome",
    ):
        if aggregation not in AGGREGATIONS:
            raise UserError(f"algorithm.aggregation: expected one of {AGGREGATIONS}, got '{aggregation}'")
        if mu < 1:
            raise UserError(f"algorithm.mu: expected an integer >= 1, got {mu}")
        if supervision not in SUPERVISIONS:
            raise UserError(f"algorithm.supervision: expected one of {SUPERVISIONS}, got '{supervision}'")
        self.beta, self.eps_low = beta, eps
        self.eps_high = eps if eps_high is None else eps_high
        self.aggregation, self.scale_rewards, self.supervision = aggregation, scale_rewards, supervision
        self.updates_per_batch = mu
        self.needs_reference = beta > 0

    def prepare(self, batch: Batch, policy: Policy) -> Batch:
        """Group-normalised advantages, and (no grad) pi_old and pi_ref log-probs when needed."""
        if bool((torch.unique(batch.group, return_counts=True)[1] < 2).any()):
            raise UserError("source.group_size: GRPO compares the outputs of a group; it needs at least 2")
        batch.tensors["advantages"] = self.advantages(batch)
        temperature = batch.totals.get("temperature", 1.0)
        with torch.no_grad():
            if self.updates_per_batch > 1:
                batch.tensors["old_logp"] = policy.logprobs(batch, temperature=temperature)[0]
            if self.beta:
                batch.tensors["ref_logp"] = policy.reference_logprobs(batch, temperature=temperature)
        # a source's own measure wins: dynamic sampling's zero_std_groups counts the groups it filtered out
        batch.stats = {**F.reward_stats(batch.rewards, batch.group), **batch.stats}
        return batch

    def advantages(self, batch: Batch) -> torch.Tensor:
        """Ahat [B, T-1]: outcome, the output's normalised reward on every token (4.1.2); process, the
        sum of the normalised rewards of the steps ending at or after the token (4.1.3)."""
        if self.supervision == "outcome":
            adv = F.group_advantages(batch.rewards, batch.group, scale=self.scale_rewards)  # [B]
            return adv[:, None].expand(-1, batch.input_ids.shape[1] - 1).contiguous()
        if "step_rewards" not in batch.tensors:
            raise UserError("algorithm.supervision=process needs a process reward (reward=steps or reward=process_rm)")
        adv = F.process_advantages(
            batch.tensors["step_rewards"], batch.tensors["step_mask"], batch.group, scale=self.scale_rewards
        )
        return adv * batch.target_mask  # the reverse sum reaches prompt positions too: not trained

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        logp, entropy = policy.logprobs(batch, temperature=batch.totals.get("temperature", 1.0), with_entropy=True)
        old = batch.tensors.get("old_logp", logp.detach())  # mu = 1: pi_old = pi_theta
        ref = batch.tensors.get("ref_logp", logp.detach())
        per_token, parts = F.grpo_token_loss(
            logp, old, ref, batch.tensors["advantages"], beta=self.beta, eps_low=self.eps_low, eps_high=self.eps_high
        )
        mask = batch.target_mask
        loss = F.aggregate(
            per_token,
            mask,
            mode=self.aggregation,
            total_sequences=batch.totals["sequences"],
            total_tokens=batch.totals["tokens"],
            max_tokens=batch.totals.get("max_tokens", mask.shape[1]),
        )
        gc_mean, gc_std = F.masked_mean_std(parts["gc"], mask)
        n = mask.sum().clamp(min=1)
        metrics = {
            "kl": float((parts["kl"] * mask).sum() / n),
            "clip_fraction": float((parts["clipped"].float() * mask).sum() / n),
            "entropy": float((entropy.detach() * mask).sum() / n),
            "gc_mean": gc_mean,
            "gc_std": gc_std,
            "gc_positive": float(((parts["gc"] > 0).float() * mask).sum() / n),
            "gc_negative": float(((parts["gc"] < 0).float() * mask).sum() / n),
        }
        return loss, metrics
