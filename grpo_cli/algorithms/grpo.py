"""GRPO: Group Relative Policy Optimisation (DeepSeekMath, section 4.1).

    data source D: groups of G outputs per question sampled from the live policy (source=online)
    reward:        a rule or a reward model; outcome or process supervision (algorithm.supervision)
    GC:            Ahat_{i,t} + beta * (pi_ref(o_{i,t}) / pi_theta(o_{i,t}) - 1)

No value model: the baseline is the group's mean reward. The KL to pi_ref is in the loss (k3
estimator), not in the reward. With mu = 1 the ratio to pi_old is exactly 1 and its gradient is the
policy gradient, so pi_old's log-probs need no extra forward pass.

Later work's variants are switches of this one algorithm (docs: method.md, "the GRPO family"), each a
table of pure functions in functional.py: the advantage estimator (``ADVANTAGES``: grpo, RLOO,
REINFORCE++), the ratio's level (``RATIO_LEVELS``: token, GSPO's sequence), the policy objective
(``POLICY_LOSSES``: PPO's clip, CISPO), then dual-clip, DAPO's overlong filtering (``mask_truncated``)
and truncated importance sampling against the rollout engine's drift (``tis_cap``). The defaults are
the paper's GRPO, op for op.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.models.policy import Policy

AGGREGATIONS = ("sequence", "token", "constant")
SUPERVISIONS = ("outcome", "process")
REINFORCE_BASELINES = ("none", "group")

# Advantage estimators (algorithm.advantage) of outcome rewards: (rewards [B], or per-token rewards
# [B, T] for those in KL_IN_REWARD; group [B], mask [B, T], scale, group_baseline) -> advantages [B, T].
ADVANTAGES: Dict[str, Callable[..., torch.Tensor]] = {
    "grpo": lambda r, g, mask, scale, baseline: (
        F.group_advantages(r, g, scale=scale)[:, None].expand_as(mask).contiguous()
    ),
    "rloo": lambda r, g, mask, scale, baseline: F.rloo_advantages(r, g)[:, None].expand_as(mask).contiguous(),
    "reinforce_pp": lambda r, g, mask, scale, baseline: F.reinforce_pp_advantages(r, g, mask, group_baseline=baseline),
}
KL_IN_REWARD = ("reinforce_pp",)
"""Estimators whose KL to pi_ref is in the reward (k1 per token, as PPO's eq. 2), not in the loss."""
# Ratio levels (algorithm.ratio_level): (logp, old_logp, mask) [B, T] -> log(pi_theta / pi_old) [B, T].
RATIO_LEVELS: Dict[str, Callable[..., torch.Tensor]] = {
    "token": lambda logp, old, mask: logp - old,
    "sequence": F.gspo_log_ratio,
}
# Policy objectives (algorithm.policy_loss), to maximise:
# (logp, log_ratio, advantages, eps_low=, eps_high=) [B, T] -> (objective [B, T], clipped [B, T] bool).
POLICY_LOSSES: Dict[str, Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = {
    "clip": lambda logp, log_ratio, adv, **eps: F.clip_objective(log_ratio, adv, **eps),
    "cispo": F.cispo_objective,
}


def check_choice(key: str, value: str, options) -> None:
    if value not in options:
        raise UserError(f"algorithm.{key}: expected one of {tuple(options)}, got '{value}'")


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
        advantage: str = "grpo",
        reinforce_baseline: str = "none",
        ratio_level: str = "token",
        policy_loss: str = "clip",
        dual_clip: Optional[float] = None,
        mask_truncated: bool = False,
        tis_cap: Optional[float] = None,
    ):
        for key, value, options in (
            ("aggregation", aggregation, AGGREGATIONS),
            ("supervision", supervision, SUPERVISIONS),
            ("advantage", advantage, ADVANTAGES),
            ("reinforce_baseline", reinforce_baseline, REINFORCE_BASELINES),
            ("ratio_level", ratio_level, RATIO_LEVELS),
            ("policy_loss", policy_loss, POLICY_LOSSES),
        ):
            check_choice(key, value, options)
        if mu < 1:
            raise UserError(f"algorithm.mu: expected an integer >= 1, got {mu}")
        if supervision == "process" and advantage != "grpo":
            raise UserError(f"algorithm.advantage: {advantage} takes outcome rewards; supervision=process needs grpo")
        if dual_clip is not None and dual_clip <= 1:
            raise UserError(f"algorithm.dual_clip: expected None or a number > 1, got {dual_clip}")
        self.beta, self.eps_low = beta, eps
        self.eps_high = eps if eps_high is None else eps_high
        self.aggregation, self.scale_rewards, self.supervision = aggregation, scale_rewards, supervision
        self.advantage, self.group_baseline = advantage, reinforce_baseline == "group"
        self.ratio_level, self.policy_loss, self.dual_clip = ratio_level, policy_loss, dual_clip
        self.mask_truncated, self.tis_cap = mask_truncated, tis_cap
        self.kl_in_reward = advantage in KL_IN_REWARD
        self.loss_beta = 0.0 if self.kl_in_reward else beta
        self.updates_per_batch = mu
        self.needs_reference = beta > 0

    def prepare(self, batch: Batch, policy: Policy) -> Batch:
        """Group-normalised advantages, and (no grad) pi_old and pi_ref log-probs when needed."""
        if bool((torch.unique(batch.group, return_counts=True)[1] < 2).any()):
            raise UserError("source.group_size: GRPO compares the outputs of a group; it needs at least 2")
        temperature = batch.totals.get("temperature", 1.0)
        with torch.no_grad():
            if self.updates_per_batch > 1:
                batch.tensors["old_logp"] = policy.logprobs(batch, temperature=temperature)[0]
            if self.beta:
                batch.tensors["ref_logp"] = policy.reference_logprobs(batch, temperature=temperature)
            if self.kl_in_reward:
                batch.tensors["token_rewards"] = self.token_rewards(batch, policy, temperature)
        batch.tensors["advantages"] = self.advantages(batch)
        # a source's own measure wins: dynamic sampling's zero_std_groups counts the groups it filtered out
        batch.stats = {**F.reward_stats(batch.rewards, batch.group), **batch.stats}
        return batch

    def advantages(self, batch: Batch) -> torch.Tensor:
        """Ahat [B, T-1]: outcome, ``algorithm.advantage``'s estimator (grpo: the output's normalised
        reward on every token, 4.1.2); process, the sum of the normalised rewards of the steps ending at
        or after the token (4.1.3)."""
        if self.supervision == "outcome":
            rewards = batch.tensors["token_rewards"] if self.kl_in_reward else batch.rewards
            estimator = ADVANTAGES[self.advantage]
            return estimator(rewards, batch.group, batch.target_mask, self.scale_rewards, self.group_baseline)
        if "step_rewards" not in batch.tensors:
            raise UserError("algorithm.supervision=process needs a process reward (reward=steps or reward=process_rm)")
        adv = F.process_advantages(
            batch.tensors["step_rewards"], batch.tensors["step_mask"], batch.group, scale=self.scale_rewards
        )
        return adv * batch.target_mask  # the reverse sum reaches prompt positions too: not trained

    def token_rewards(self, batch: Batch, policy: Policy, temperature: float) -> torch.Tensor:
        """REINFORCE++'s per-token rewards [B, T] (its eq. 1): the outcome reward at the last token minus
        beta * log(pi_old / pi_ref) on every token, pi_old's log-probs recomputed when mu = 1. Their
        per-token KL is logged as ``reward_kl``; the loss then has no KL term."""
        mask = batch.target_mask
        if not self.beta:
            zeros = torch.zeros_like(mask)
            return F.kl_shaped_rewards(batch.rewards, zeros, zeros, mask, beta=0.0)
        old = batch.tensors.get("old_logp")
        old = policy.logprobs(batch, temperature=temperature)[0] if old is None else old
        ref = batch.tensors["ref_logp"]
        batch.stats["reward_kl"] = float(((old - ref) * mask).sum() / mask.sum().clamp(min=1))
        return F.kl_shaped_rewards(batch.rewards.to(old.dtype), old, ref, mask, beta=self.beta)

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        logp, entropy = policy.logprobs(batch, temperature=batch.totals.get("temperature", 1.0), with_entropy=True)
        old = batch.tensors.get("old_logp", logp.detach())  # mu = 1: pi_old = pi_theta
        ref = batch.tensors.get("ref_logp", logp.detach())
        adv, mask = batch.tensors["advantages"], batch.target_mask
        objective, clipped, extra = self.objective(logp, old, adv, batch)
        per_token, parts = F.grpo_token_loss(
            logp,
            old,
            ref,
            adv,
            beta=self.loss_beta,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            surrogate=(objective, clipped),
        )
        loss = F.aggregate(
            per_token,
            self.loss_mask(batch),
            mode=self.aggregation,
            total_sequences=batch.totals["sequences"],
            total_tokens=batch.totals["tokens"],
            max_tokens=batch.totals.get("max_tokens", mask.shape[1]),
        )
        return loss, {**token_metrics(parts, entropy, mask), **extra}

    def objective(
        self, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, batch: Batch
    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
        """The policy-gradient term per token [B, T] to maximise, its clipped mask, and its metrics: the
        ratio at ``ratio_level``, the ``policy_loss``, then ``dual_clip`` and the rollout-drift correction."""
        mask = batch.target_mask
        log_ratio = RATIO_LEVELS[self.ratio_level](logp, old, mask)
        objective, clipped = POLICY_LOSSES[self.policy_loss](
            logp, log_ratio, adv, eps_low=self.eps_low, eps_high=self.eps_high
        )
        metrics: Dict[str, float] = {}
        if self.dual_clip is not None:
            objective, floored = F.dual_clip(objective, adv, c=self.dual_clip)
            metrics["dual_clip_fraction"] = float((floored.float() * mask).sum() / mask.sum().clamp(min=1))
        rollout = batch.tensors.get("rollout_logp")
        if rollout is not None:
            metrics.update(F.engine_drift(old, rollout, mask))
            if self.tis_cap is not None:  # as verl: the weight multiplies the clipped policy-gradient term
                objective = objective * F.tis_weights(old, rollout, cap=self.tis_cap)
        elif self.tis_cap is not None:
            raise UserError("algorithm.tis_cap: the batch has no rollout_logp (the sampling engine's log-probs)")
        return objective, clipped, metrics

    def loss_mask(self, batch: Batch) -> torch.Tensor:
        """The target mask, without the truncated rows under ``mask_truncated`` (DAPO's overlong
        filtering): they pass no gradient but stay in ``batch.totals``, so they still count in the
        normalisation (as a zero loss) and the batch's step size does not depend on how many were cut."""
        mask = batch.target_mask
        truncated = batch.tensors.get("truncated")
        if not self.mask_truncated or truncated is None:
            return mask
        return mask * (~truncated.bool()).to(mask.dtype)[:, None]


def token_metrics(parts: Dict[str, torch.Tensor], entropy: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """KL, clip fraction, entropy and the gradient coefficient's statistics over the masked tokens."""
    gc_mean, gc_std = F.masked_mean_std(parts["gc"], mask)
    n = mask.sum().clamp(min=1)
    return {
        "kl": float((parts["kl"] * mask).sum() / n),
        "clip_fraction": float((parts["clipped"].float() * mask).sum() / n),
        "entropy": float((entropy.detach() * mask).sum() / n),
        "gc_mean": gc_mean,
        "gc_std": gc_std,
        "gc_positive": float(((parts["gc"] > 0).float() * mask).sum() / n),
        "gc_negative": float(((parts["gc"] < 0).float() * mask).sum() / n),
    }
