"""The algorithms' math as pure functions of tensors and named scalars (no config, no model).

Shapes: B sequences, T-1 next-token targets per sequence (written T below), G group size.
Masks are float tensors [B, T] with 1 on completion tokens. Equation references are to
DeepSeekMath (Shao et al., 2024), section 4.1; ../docs/method.md restates them.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Outcome supervision: rtilde_i = (r_i - mean(r)) / std(r) within each group (4.1.2).

    rewards [B], group [B] (ids; members of a group need not be contiguous) -> advantages [B].
    std is the sample standard deviation (as TRL and verl compute it). A group whose rewards are
    all equal carries no signal: its advantages are 0, never NaN. ``scale=False`` skips the std
    division (Dr. GRPO).
    """
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    n = counts.to(rewards.dtype)  # [groups]
    sums = torch.zeros_like(n).index_add_(0, inverse, rewards)
    mean = sums / n
    centred = rewards - mean[inverse]
    sq = torch.zeros_like(n).index_add_(0, inverse, centred**2)
    std = (sq / (n - 1).clamp(min=1)).sqrt()  # [groups]
    flat = std[inverse] < eps
    adv = centred / std[inverse].clamp(min=eps) if scale else centred
    return torch.where(flat, torch.zeros_like(adv), adv)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Unbiased, always >= 0 estimator of KL[pi_theta || pi_ref] per token (eq. 4):

        pi_ref/pi_theta - log(pi_ref/pi_theta) - 1,  computed from log-probs [B, T].
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, eps_low: float, eps_high: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) per token (eq. 3), to maximise.

    logp, old_logp, advantages: [B, T]. Returns (objective [B, T], clipped [B, T] bool: the
    clipped branch is the smaller one, so the token passes no gradient).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return torch.minimum(unclipped, clipped), clipped < unclipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, *, mode: str, total_sequences: float,
              total_tokens: float, max_tokens: float) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar, normalised by whole-batch totals.

    ``sequence`` (the paper): 1/G sum_i 1/|o_i| sum_t  ->  sum_i mean_t(x_i) / total_sequences.
    ``token`` (DAPO): sum_{i,t} x / total_tokens.
    ``constant`` (Dr. GRPO): sum_{i,t} x / (total_sequences * max_tokens), no length bias.
    """
    masked = per_token * mask
    if mode == "sequence":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / total_sequences
    if mode == "token":
        return masked.sum() / total_tokens
    if mode == "constant":
        return masked.sum() / (total_sequences * max_tokens)
    raise ValueError(f"unknown aggregation '{mode}'")


def grpo_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
    *, beta: float, eps_low: float, eps_high: float,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token GRPO loss [B, T]: -(min(ratio*A, clip(ratio)*A) - beta * KL_k3) (eq. 3).

    Also returns per-token ``kl``, ``clipped`` and the unified paradigm's gradient coefficient
    GC = A + beta * (pi_ref / pi_theta - 1) (section 5.2.1), all detached.
    """
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high)
    kl = k3_kl(logp, ref_logp) if beta else torch.zeros_like(logp)
    loss = -(surrogate - beta * kl)
    gc = advantages + beta * (torch.exp(ref_logp - logp) - 1.0) if beta else advantages
    return loss, {"kl": kl.detach(), "clipped": clipped.detach(), "gc": gc.detach()}


def masked_mean_std(x: torch.Tensor, mask: torch.Tensor) -> Tuple[float, float]:
    """Mean and (population) std of x over the positions where mask is 1."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n
    return float(mean), float(var.sqrt())


def sequence_log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, length_normalise: bool) -> torch.Tensor:
    """log(pi_theta(o) / pi_ref(o)) per sequence [B] from per-token log-probs [B, T]: the sum over
    the completion's tokens, or its mean with ``length_normalise`` (DeepSeekMath's 1/|o|)."""
    total = ((logp - ref_logp) * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalise else total


def dpo_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Pairwise DPO loss [P] from the sequence log-ratios of o+ (``chosen``) and o- (``rejected``) [P]:

        margin = beta * (log pi_theta(o+)/pi_ref(o+) - log pi_theta(o-)/pi_ref(o-))
        loss   = -log sigmoid(margin)

    Also returns the ``margin`` (the implicit reward difference) and the paradigm's gradient
    coefficient of o+, GC = sigmoid(-margin) (section 5.2.1; o- gets -GC), both detached. The
    loss's gradient with respect to the log-ratio of o+ is -beta * GC.
    """
    margin = beta * (chosen - rejected)
    loss = -torch.nn.functional.logsigmoid(margin)
    return loss, {"margin": margin.detach(), "gc": torch.sigmoid(-margin).detach()}
