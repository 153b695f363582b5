"""PPO: the actor-critic baseline of DeepSeekMath (section 4.1, eq. 1-2).

    data source D: SFT questions, outputs sampled from the live policy (source=online, any G)
    reward:        a reward model or a rule, outcome, plus the per-token KL penalty
                   r_t = r_phi(q, o_<=t) - beta * log(pi_theta(o_t) / pi_ref(o_t))
    GC:            A_t, by GAE (gamma, lambda) from the token rewards and a learned value V_psi

The value model (grpo_cli/models/value.py) is a full copy of the policy (``separate``, the paper's
setting) or a second LoRA adapter on the policy's base (``lora``). It is trained with the policy in
one loss, loss = policy loss + vf_coef * value loss, at its own learning rate.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.models.policy import Policy
from grpo_cli.models.value import build_value_model


@register_algorithm("ppo")
class PPO(Algorithm):
    needs_rewards = True
    main_metric = "reward_mean"

    def __init__(
        self,
        *,
        beta: float,
        eps: float,
        mu: int,
        gamma: float,
        lam: float,
        whiten_advantages: bool,
        value_model: str,
        value_clip: float,
        vf_coef: float,
        value_lr_scale: float,
    ):
        if mu < 1:
            raise UserError(f"algorithm.mu: expected an integer >= 1, got {mu}")
        self.beta, self.eps, self.gamma, self.lam = beta, eps, gamma, lam
        self.whiten, self.value_kind, self.value_clip = whiten_advantages, value_model, value_clip
        self.vf_coef, self.value_lr_scale = vf_coef, value_lr_scale
        self.updates_per_batch = mu
        self.needs_reference = beta > 0
        self.value: torch.nn.Module = None

    def setup(self, policy: Policy) -> Policy:
        self.value = build_value_model(self.value_kind, policy.model, self.value_lr_scale).to(policy.device)
        policy.extra.append(self.value)
        return policy

    def values(self, batch: Batch) -> torch.Tensor:
        """V [B, T-1] aligned with the next-token targets."""
        return self.value(batch.input_ids, batch.attention_mask)[:, :-1]

    @torch.no_grad()
    def prepare(self, batch: Batch, policy: Policy) -> Batch:
        """pi_old and pi_ref log-probs, V_old, the KL-shaped token rewards, GAE advantages and returns."""
        temperature = batch.totals.get("temperature", 1.0)
        mask = batch.target_mask
        old = policy.logprobs(batch, temperature=temperature)[0]
        ref = policy.reference_logprobs(batch, temperature=temperature) if self.beta else old
        old_values = self.values(batch) * mask
        token_rewards = F.kl_shaped_rewards(batch.rewards, old, ref, mask, beta=self.beta)
        adv, returns = F.gae(token_rewards, old_values, mask, gamma=self.gamma, lam=self.lam)
        if self.whiten:
            adv = F.whiten(adv, mask)
        batch.tensors.update(old_logp=old, old_values=old_values, advantages=adv, returns=returns)
        n = mask.sum().clamp(min=1)
        batch.stats.update(F.reward_stats(batch.rewards, batch.group))
        batch.stats.update(
            kl=float(((old - ref) * mask).sum() / n), explained_variance=F.explained_variance(old_values, returns, mask)
        )
        return batch

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        t, mask = batch.tensors, batch.target_mask
        logp, entropy = policy.logprobs(batch, temperature=batch.totals.get("temperature", 1.0), with_entropy=True)
        surrogate, clipped = F.clipped_surrogate(
            logp, t["old_logp"], t["advantages"], eps_low=self.eps, eps_high=self.eps
        )
        # J_PPO's 1/|o| sum_t (eq. 1): each output's token mean, averaged over outputs.
        totals = dict(
            total_sequences=batch.totals["sequences"], total_tokens=batch.totals["tokens"], max_tokens=mask.shape[1]
        )
        policy_loss = F.aggregate(-surrogate, mask, mode="sequence", **totals)
        values = self.values(batch)
        v_loss = F.aggregate(
            F.value_loss(values, t["old_values"], t["returns"], clip=self.value_clip), mask, mode="token", **totals
        )
        n = mask.sum().clamp(min=1)
        gc_mean, gc_std = F.masked_mean_std(t["advantages"], mask)
        metrics = {
            "policy_loss": float(policy_loss.detach()),
            "value_loss": float(v_loss.detach()),
            "clip_fraction": float((clipped.float() * mask).sum() / n),
            "entropy": float((entropy.detach() * mask).sum() / n),
            "gc_mean": gc_mean,
            "gc_std": gc_std,
            "gc_positive": float(((t["advantages"] > 0).float() * mask).sum() / n),
            "gc_negative": float(((t["advantages"] < 0).float() * mask).sum() / n),
        }
        return policy_loss + self.vf_coef * v_loss, metrics
