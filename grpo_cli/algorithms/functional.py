"""The algorithms' math as pure functions of tensors and named scalars (no config, no model).

Shapes: B sequences, T-1 next-token targets per sequence (written T below), G group size.
Masks are float tensors [B, T] with 1 on completion tokens. Equation references are to
DeepSeekMath (Shao et al., 2024, arXiv:2402.03300), section 4.1; docs/paradigm.md maps them
to the methods.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


def group_advantages(
    rewards: torch.Tensor, group: torch.Tensor, *, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Outcome supervision: rtilde_i = (r_i - mean(r)) / std(r) within each group (4.1.2).

    rewards [B], group [B] (ids; members of a group need not be contiguous) -> advantages [B].
    std is the sample standard deviation (as TRL and verl compute it). A group whose rewards are
    all equal carries no signal: its advantages are 0, never NaN. ``scale=False`` skips the std
    division (Dr. GRPO).
    """
    return _group_normalise(rewards[:, None], torch.ones_like(rewards[:, None]), group, scale, eps)[:, 0]


def _group_normalise(
    values: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, scale: bool, eps: float
) -> torch.Tensor:
    """(v - mean) / std over all masked entries of each group, 0 elsewhere and in flat groups.
    values, mask [B, T]; group [B] ids -> [B, T]. Sample std; ``scale=False`` only centres."""
    _, inverse = torch.unique(group, return_inverse=True)
    mask = mask.to(values.dtype)
    n = torch.zeros(int(inverse.max()) + 1, dtype=values.dtype, device=values.device)
    n.index_add_(0, inverse, mask.sum(-1))  # [groups] entries per group
    sums = torch.zeros_like(n).index_add_(0, inverse, (values * mask).sum(-1))
    mean = (sums / n.clamp(min=1))[inverse, None]  # [B, 1]
    centred = (values - mean) * mask
    sq = torch.zeros_like(n).index_add_(0, inverse, (centred**2).sum(-1))
    std = (sq / (n - 1).clamp(min=1)).sqrt()[inverse, None]  # [B, 1]
    normalised = centred / std.clamp(min=eps) if scale else centred
    return torch.where(std < eps, torch.zeros_like(normalised), normalised)


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
    return clip_objective(logp - old_logp, advantages, eps_low=eps_low, eps_high=eps_high)


def clip_objective(
    log_ratio: torch.Tensor, advantages: torch.Tensor, *, eps_low: float, eps_high: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`clipped_surrogate` from the log-ratio log(pi_theta / pi_old) [B, T] (token or GSPO's)."""
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return torch.minimum(unclipped, clipped), clipped < unclipped


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    total_sequences: float,
    total_tokens: float,
    max_tokens: float,
) -> torch.Tensor:
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
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beta: float,
    eps_low: float,
    eps_high: float,
    surrogate: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token GRPO loss [B, T]: -(min(ratio*A, clip(ratio)*A) - beta * KL_k3) (eq. 3).

    ``surrogate``: a variant's (policy objective [B, T], clipped [B, T] bool) in place of eq. 3's
    clipped surrogate (GSPO, CISPO, dual-clip, TIS: see grpo.py). Also returns per-token ``kl``,
    ``clipped`` and the unified paradigm's gradient coefficient GC = A + beta * (pi_ref / pi_theta - 1)
    (section 5.2.1), all detached.
    """
    if surrogate is None:
        surrogate = clipped_surrogate(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high)
    surrogate, clipped = surrogate
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


def sequence_log_ratio(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, length_normalise: bool
) -> torch.Tensor:
    """log(pi_theta(o) / pi_ref(o)) per sequence [B] from per-token log-probs [B, T]: the sum over
    the completion's tokens, or its mean with ``length_normalise`` (DeepSeekMath's 1/|o|)."""
    total = ((logp - ref_logp) * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalise else total


def dpo_pair_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
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


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Pairwise reward-model loss [P]: -log sigmoid(r(o+) - r(o-)) from scalar scores [P] each."""
    return -torch.nn.functional.logsigmoid(chosen - rejected)


# --- PPO (section 4.1, eq. 1-2): KL-shaped token rewards, GAE, value loss -------------------------


def kl_shaped_rewards(
    outcome: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Per-token rewards [B, T] (eq. 2): r_t = r_phi(q, o_<=t) - beta * log(pi_theta(o_t) / pi_ref(o_t)).

    outcome [B] is the outcome reward, given at each output's last token; logp, ref_logp: the sampling
    policy's and the reference's log-probs [B, T]; mask [B, T] 1 on output tokens. Rows are
    left-padded, so an output's last token is at T - 1, or before it where a multi-turn row was cut
    inside an observation (unmasked tokens at the end): the outcome goes to each row's last masked-in
    token, where GAE (which skips holes) reads it.
    """
    rewards = -beta * (logp - ref_logp) * mask
    T = mask.shape[1]
    last = (T - 1) - (mask.flip(1) != 0).to(torch.uint8).argmax(1)  # [B]; T - 1 on a row of no tokens
    rewards[torch.arange(len(rewards), device=rewards.device), last] += outcome
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over output tokens, vectorised (no loop over T).

        delta_t = r_t + gamma * V_next(t) - V_t      (V after the last token is 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_next(t)  returns R_t = A_t + V_t

    rewards, values, mask: [B, T]. ``next(t)`` is the next *unmasked* position of the row: a masked
    position (padding, or a tool's output between the model's turns) is skipped, neither
    contributing nor receiving, and the value of the next unmasked token bootstraps across it, one
    discount per unmasked step (as :func:`gae_reference`, and verl's ``compute_gae_advantage_return``
    on a response mask). Returns (advantages [B, T], returns [B, T]), 0 off the mask.
    """
    # Pack each row's unmasked tokens to the left, in order: the holes close and next(t) = t + 1.
    order = torch.sort((mask == 0).to(torch.uint8), dim=1, stable=True).indices  # [B, T]
    packed = [x.gather(1, order) for x in (rewards, values, mask)]
    adv_packed = _gae_contiguous(*packed, gamma=gamma, lam=lam)
    advantages = torch.zeros_like(adv_packed).scatter_(1, order, adv_packed)
    return advantages, (advantages + values) * mask


def _gae_contiguous(rewards, values, mask, *, gamma: float, lam: float) -> torch.Tensor:
    """:func:`gae`'s advantages [B, T] for masks whose unmasked positions are one run per row."""
    T = rewards.shape[1]
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    delta = (rewards + gamma * next_values - values) * mask
    t = torch.arange(T, device=rewards.device, dtype=rewards.dtype)
    power = t[None, :] - t[:, None]  # [T, T]: j - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    return (delta @ discount.T) * mask  # A[b, t] = sum_j delta[b, j] * discount[t, j]


def gae_reference(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float):
    """The textbook backward loop over t for one row at a time: the test oracle of :func:`gae`."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    for b in range(B):
        running, next_value = 0.0, 0.0
        for t in reversed(range(T)):
            if not mask[b, t]:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t], next_value = running, values[b, t]
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions of the whole batch; 0 off the mask."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, clip: float) -> torch.Tensor:
    """Per-token value loss [B, T]: 0.5 * (V - R)^2, or with ``clip`` > 0 PPO's pessimistic
    0.5 * max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2)."""
    loss = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked positions: 1 is a perfect value model, 0 a constant."""
    n = mask.sum().clamp(min=1)

    def var(x):
        mean = (x * mask).sum() / n
        return (((x - mean) ** 2) * mask).sum() / n

    v = var(returns)
    return float(1 - var(returns - values) / v) if v > 0 else 0.0


# ----------------------------------------------------------------------------- process supervision


def process_advantages(
    step_rewards: torch.Tensor, step_mask: torch.Tensor, group: torch.Tensor, *, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Process supervision (4.1.3): Ahat_{i,t} = sum over steps j of output i with index(j) >= t of
    rtilde_i^index(j) = (r_i^index(j) - mean(R)) / std(R), R = all step rewards of i's group.

    step_rewards, step_mask [B, T]: a step's reward at the position of its last token, 1 there in
    the mask. group [B] ids (members need not be contiguous) -> advantages [B, T]. std is the sample
    std over the group's steps, as in ``group_advantages``; a group whose step rewards are all equal
    (or that has fewer than 2 steps) gets 0. Tokens after an output's last step end, and outputs
    without steps, get 0. ``scale=False`` skips the std division.
    """
    normalised = _group_normalise(step_rewards, step_mask, group, scale, eps)  # rtilde at each step end
    return normalised.flip(-1).cumsum(-1).flip(-1)  # reverse cumulative sum: steps ending at or after t


def reward_stats(rewards: torch.Tensor, group: torch.Tensor) -> Dict[str, float]:
    """reward_mean, reward_std, and zero_std_groups: the fraction of groups with no signal."""
    groups = torch.unique(group)
    flat = sum(bool(rewards[group == g].std(unbiased=False) < 1e-6) for g in groups)
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "zero_std_groups": flat / len(groups),
    }


# ------------------------------------------------- the GRPO family (algorithm=grpo's switches, grpo.py)


def rloo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al., 2024, arXiv:2402.14740): A_i = r_i - mean_{j != i} r_j within each group.

    rewards [B], group [B] ids -> [B]. Equal to G/(G-1) * (r_i - mean(r)), as verl's
    ``compute_rloo_outcome_advantage``; no std division. A group of one has no baseline: 0.
    """
    _, inverse = torch.unique(group, return_inverse=True)
    n = torch.zeros(int(inverse.max()) + 1, dtype=rewards.dtype, device=rewards.device)
    n.index_add_(0, inverse, torch.ones_like(rewards))  # [groups] members
    sums = torch.zeros_like(n).index_add_(0, inverse, rewards)
    others = (sums[inverse] - rewards) / (n[inverse] - 1).clamp(min=1)  # [B] mean of the other members
    return torch.where(n[inverse] > 1, rewards - others, torch.zeros_like(rewards))


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, *, group_baseline: bool
) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025, arXiv:2501.03262) from per-token rewards [B, T] (:func:`kl_shaped_rewards`:
    the outcome reward at the last token minus beta * log(pi_old / pi_ref) on every token):

    without baseline, the undiscounted reverse sums (the returns) whitened over every masked token of
    the batch (verl's ``reinforce_plus_plus``, gamma = 1); with ``group_baseline``, each output's total
    reward minus its group's mean, on every token, then whitened (verl's
    ``reinforce_plus_plus_baseline``). group [B], mask [B, T] -> [B, T], 0 off the mask.

    The statistics are token-weighted (a long output counts once per token), as verl's
    ``masked_whiten``; the variance is the population one (verl: sample; the two differ by a factor
    n / (n - 1) over n tokens). Under data parallelism the batch is a rank's slice: each rank
    whitens with its own statistics.
    """
    if group_baseline:
        centred = group_advantages(token_rewards.sum(-1), group, scale=False)  # [B]
        values = centred[:, None] * mask
    else:
        values = token_rewards.flip(-1).cumsum(-1).flip(-1) * mask  # [B, T] returns
    return whiten(values, mask)


def gspo_log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, max_log: float = 10.0
) -> torch.Tensor:
    """GSPO-token's log-ratio [B, T] (Zheng et al., 2025, arXiv:2507.18071, eq. 13-14):

        log s_{i,t} = sg(log s_i) + log pi_t - sg(log pi_t),  log s_i = mean_t log(pi_t / pi_old_t)

    Its value is the sequence ratio s_i on every token; its gradient is s_i * grad log pi_t, so a
    per-token advantage still applies (with equal advantages it is GSPO itself). log s_i is capped
    at ``max_log`` against overflow, as verl's ``compute_policy_loss_gspo``. logp, old_logp, mask [B, T].
    """
    seq = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B] log s_i
    return logp - logp.detach() + seq.clamp(max=max_log).detach()[:, None]


def cispo_objective(
    logp: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor, *, eps_low: float, eps_high: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv:2506.13585, eq. 4-5): sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A * log pi.

    The importance weight is clipped and detached, so every token keeps its gradient
    clip(ratio) * A * grad log pi (PPO's clip drops it). The paper bounds only the top (eps_low
    "set to a large value"): eps_low = 1 is that (the ratio is never below 0). [B, T] each; returns
    (objective to maximise, clipped [B, T] bool: the weight was capped).
    """
    ratio = torch.exp(log_ratio.detach())
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return weight * advantages * logp, weight != ratio


def dual_clip(objective: torch.Tensor, advantages: torch.Tensor, *, c: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dual-clip PPO (Ye et al., 2020, arXiv:1912.09729): for A < 0 the objective is bounded below by
    c * A (c > 1), so a huge ratio on a bad token cannot blow the loss up; verl's ``clip_ratio_c``.
    objective, advantages [B, T] -> (objective, floored [B, T] bool: the bound was hit, no gradient)."""
    floor = c * advantages
    floored = (advantages < 0) & (objective < floor)
    return torch.where(floored, floor, objective), floored


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, *, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al., 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"; verl's ``tis_imp_ratio_cap``): min(pi_old / pi_rollout, cap) [B, T],
    detached, from the trainer's and the sampling engine's log-probs of the sampled tokens."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def engine_drift(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """How far the sampling engine's log-probs are from the trainer's pi_old on the masked tokens:

    ``engine_kl``: masked mean of k3 = KL[pi_rollout || pi_old]'s estimator on tokens sampled from
    pi_rollout (r - log r - 1, r = pi_old / pi_rollout); ``engine_ratio_max``: max of pi_old / pi_rollout.
    """
    m = mask.bool()
    if not m.any():
        return {"engine_kl": 0.0, "engine_ratio_max": 0.0}
    kl = k3_kl(rollout_logp, old_logp)
    return {
        "engine_kl": float((kl * mask).sum() / mask.sum()),
        "engine_ratio_max": float(torch.exp(old_logp - rollout_logp)[m].max()),
    }
