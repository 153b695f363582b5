"""The algorithms' math against hand-computed values (arithmetic in the comments)."""

import math

import pytest
import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.sft import sft_loss


def test_sft_loss_hand_value():
    # completion tokens have log-probs -1 and -3 (the prompt's -5 is masked out):
    # loss = -(-1 + -3) / 2 = 2
    logp = torch.tensor([[-5.0, -1.0, -3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    assert sft_loss(logp, mask, total_tokens=2.0).item() == pytest.approx(2.0)


def test_group_advantages_hand_values():
    # group 0: rewards [1, 0, 0, 1]: mean 0.5, sample std sqrt((4 * 0.25) / 3) = 0.57735
    #          -> advantages [+0.8660, -0.8660, -0.8660, +0.8660]
    # group 1: rewards [1, 1, 1, 1]: std 0 -> no signal, advantages 0 (not NaN)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = F.group_advantages(rewards, group)
    a = 0.5 / math.sqrt(1.0 / 3.0)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-5)
    assert not torch.isnan(adv).any()


def test_group_advantages_interleaved_groups_and_no_scaling():
    # groups need not be contiguous; scale=False (Dr. GRPO) only centres:
    # group 7: [2, 0] mean 1 -> [1, -1];  group 3: [3, 1, 2] mean 2 -> [1, -1, 0]
    rewards = torch.tensor([2.0, 3.0, 0.0, 1.0, 2.0])
    group = torch.tensor([7, 3, 7, 3, 3])
    adv = F.group_advantages(rewards, group, scale=False)
    assert torch.allclose(adv, torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0]))


def test_k3_kl_hand_values():
    # log(pi_ref/pi) = log 2: 2 - log 2 - 1 = 0.30685;  equal probabilities: 1 - 0 - 1 = 0
    logp = torch.tensor([math.log(0.25), math.log(0.5)])
    ref = torch.tensor([math.log(0.5), math.log(0.5)])
    kl = F.k3_kl(logp, ref)
    assert torch.allclose(kl, torch.tensor([2 - math.log(2) - 1, 0.0]), atol=1e-6)
    assert (F.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()  # always non-negative


def test_clipped_surrogate_positive_and_negative_advantages():
    # ratio = e^(logp - old): [e^0.5 = 1.6487, e^-0.5 = 0.6065, 1.1052]; eps = 0.2
    # A = +1, ratio 1.6487: min(1.6487, 1.2)  = 1.2     (clipped: no gradient beyond 1 + eps)
    # A = -1, ratio 0.6065: min(-0.6065, -0.8) = -0.8   (clipped at 1 - eps)
    # A = +2, ratio 1.1052: min(2.2103, 2.2103) = 2.2103 (inside the range)
    logp = torch.tensor([0.5, -0.5, 0.1])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    obj, clipped = F.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.2)
    assert torch.allclose(obj, torch.tensor([1.2, -0.8, 2 * math.exp(0.1)]), atol=1e-5)
    assert clipped.tolist() == [True, True, False]


def test_clip_higher_only_widens_the_upper_side():
    # ratio e^0.22 = 1.2461 with A = 1: eps_high 0.28 leaves it unclipped, eps 0.2 clips to 1.2
    logp, old, adv = torch.tensor([0.22]), torch.zeros(1), torch.ones(1)
    assert F.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)[0].item() == pytest.approx(math.exp(0.22))
    assert F.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.2)[0].item() == pytest.approx(1.2)


def test_grpo_loss_gradient_wrt_logprobs():
    # Unclipped token, ratio 1 (mu = 1: old = logp), A = 0.5, beta = 0.1, pi_ref/pi = e^-1:
    # d/dlogp of -(ratio * A - beta * (e^(ref-logp) - (ref-logp) - 1))
    #   = -(A) + beta * (-e^(ref-logp) + 1) = -0.5 + 0.1 * (1 - 0.36788) = -0.43679
    # i.e. -GC with GC = A + beta * (pi_ref/pi - 1) = 0.5 + 0.1 * (0.36788 - 1) = 0.43679
    logp = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-2.0]])
    loss, parts = F.grpo_token_loss(
        logp, logp.detach(), ref, torch.tensor([[0.5]]), beta=0.1, eps_low=0.2, eps_high=0.2
    )
    loss.sum().backward()
    gc = 0.5 + 0.1 * (math.exp(-1.0) - 1)
    assert logp.grad.item() == pytest.approx(-gc, abs=1e-6)
    assert parts["gc"].item() == pytest.approx(gc, abs=1e-6)


def test_clipped_token_passes_only_the_kl_gradient():
    # ratio e^0.5 > 1.2 with A = 1: the surrogate is the constant 1.2; only the KL term's
    # gradient remains: beta * (1 - pi_ref/pi) = 0.1 * (1 - e^0) = 0 with ref = logp.
    logp = torch.tensor([[0.5]], requires_grad=True)
    loss, _ = F.grpo_token_loss(
        logp, torch.zeros(1, 1), logp.detach(), torch.ones(1, 1), beta=0.1, eps_low=0.2, eps_high=0.2
    )
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(0.0, abs=1e-7)


def test_aggregation_modes_with_ragged_lengths():
    # sequence 0 has 1 token (loss 4), sequence 1 has 3 tokens (losses 1, 2, 3)
    # sequence (paper): (4/1 + 6/3) / 2 = 3
    # token (DAPO):     (4 + 6) / 4 = 2.5
    # constant (Dr. GRPO, max 5 tokens): 10 / (2 * 5) = 1
    x = torch.tensor([[4.0, 9.0, 9.0], [1.0, 2.0, 3.0]])
    m = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    kw = dict(total_sequences=2.0, total_tokens=4.0, max_tokens=5.0)
    assert F.aggregate(x, m, mode="sequence", **kw).item() == pytest.approx(3.0)
    assert F.aggregate(x, m, mode="token", **kw).item() == pytest.approx(2.5)
    assert F.aggregate(x, m, mode="constant", **kw).item() == pytest.approx(1.0)


def test_micro_batch_losses_add_up_to_the_full_batch():
    # Normalising by whole-batch totals makes the split exact for every aggregation.
    torch.manual_seed(0)
    x, m = torch.rand(6, 5), (torch.rand(6, 5) > 0.3).float()
    kw = dict(total_sequences=6.0, total_tokens=float(m.sum()), max_tokens=5.0)
    for mode in ("sequence", "token", "constant"):
        full = F.aggregate(x, m, mode=mode, **kw)
        parts = F.aggregate(x[:2], m[:2], mode=mode, **kw) + F.aggregate(x[2:], m[2:], mode=mode, **kw)
        assert torch.allclose(full, parts)


def test_online_rft_gc_is_the_correctness_indicator():
    # rule rewards [1, 0, 1, 0.0]: kept (GC 1) exactly where correct
    from grpo_cli.algorithms.rft import rft_coefficients

    assert rft_coefficients(torch.tensor([1.0, 0.0, 1.0, 0.0]), 0.5).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_sequence_log_ratio_sum_and_length_normalised():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0: (0.5 + 0 - 1) = -0.5 over 3 tokens; row 1: (0.5 + 0.5) = 1.0 over 2 (third masked)
    total = F.sequence_log_ratio(logp, ref, mask, length_normalise=False)
    mean = F.sequence_log_ratio(logp, ref, mask, length_normalise=True)
    assert torch.allclose(total, torch.tensor([-0.5, 1.0]))
    assert torch.allclose(mean, torch.tensor([-0.5 / 3, 0.5]))


def test_dpo_pair_loss_and_gc_hand_values():
    import math

    chosen, rejected = torch.tensor([0.0, 1.0]), torch.tensor([0.0, -1.0])
    loss, parts = F.dpo_pair_loss(chosen, rejected, beta=0.5)
    # pair 0: margin 0 -> loss log 2 = 0.6931, GC = sigmoid(0) = 0.5
    # pair 1: margin 0.5 * (1 - (-1)) = 1 -> loss log(1 + e^-1) = 0.3133, GC = sigmoid(-1) = 0.2689
    assert torch.allclose(parts["margin"], torch.tensor([0.0, 1.0]))
    assert torch.allclose(loss, torch.tensor([math.log(2), math.log(1 + math.exp(-1))]), atol=1e-6)
    assert torch.allclose(parts["gc"], torch.tensor([0.5, 1 / (1 + math.e)]), atol=1e-6)


def test_dpo_gradient_is_beta_times_gc_on_chosen_and_minus_on_rejected():
    chosen = torch.tensor([0.3, -0.2], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    loss, parts = F.dpo_pair_loss(chosen, rejected, beta=0.1)
    loss.sum().backward()
    # d(-log sigmoid(m))/d chosen = -beta * sigmoid(-m) = -beta * GC;  d/d rejected = +beta * GC
    assert torch.allclose(chosen.grad, -0.1 * parts["gc"], atol=1e-7)
    assert torch.allclose(rejected.grad, 0.1 * parts["gc"], atol=1e-7)


def test_kl_shaped_rewards_hand_values():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])  # first position is the prompt
    r = F.kl_shaped_rewards(torch.tensor([1.0]), logp, ref, mask, beta=0.1)
    # t=1: -0.1 * (-1 - -1.5) = -0.05;  t=2: -0.1 * (-2 - -1) = +0.1, plus the outcome 1 -> 1.1
    assert torch.allclose(r, torch.tensor([[0.0, -0.05, 1.1]]))


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.8]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    adv, ret = F.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_2 = 1 + 0 - 0.8 = 0.2;  delta_1 = 0 + 0.8 - 0.5 = 0.3
    # A_2 = 0.2;  A_1 = 0.3 + 0.5 * 0.2 = 0.4;  R = A + V: 1.0, 0.9; the prompt position stays 0
    assert torch.allclose(adv, torch.tensor([[0.0, 0.4, 0.2]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 0.9, 1.0]]))


def test_gae_vectorised_equals_the_plain_loop():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.tensor([9, 4, 1, 6, 7])
    mask = (torch.arange(T)[None, :] >= T - lengths[:, None]).float()  # right-aligned outputs
    for gamma, lam in [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)]:
        fast = F.gae(rewards, values, mask, gamma=gamma, lam=lam)
        slow = F.gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
        for a, b in zip(fast, slow):
            assert torch.allclose(a, b, atol=1e-5)


def test_gae_masks_with_holes_equal_the_plain_loop():
    """Multi-turn masks: tool-output tokens (masked) sit between the model's tokens."""
    g = torch.Generator().manual_seed(1)
    for B, T in [(6, 11), (3, 30)]:
        rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
        mask = (torch.rand(B, T, generator=g) < 0.6).float()
        mask[0] = 0.0  # a row with nothing to train on
        for gamma, lam in [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)]:
            fast = F.gae(rewards, values, mask, gamma=gamma, lam=lam)
            slow = F.gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
            for a, b in zip(fast, slow):
                assert torch.allclose(a, b, atol=1e-5)


def test_gae_hand_values_across_a_hole():
    rewards = torch.tensor([[0.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.8]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # position 1 is a tool's output: skipped
    adv, ret = F.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_2 = 1 + 0 - 0.8 = 0.2;  delta_0 = 0 + V_2 - V_0 = 0.8 - 0.5 = 0.3 (V_1, r_1 unused)
    # A_2 = 0.2;  A_0 = 0.3 + 0.5 * 0.2 = 0.4;  R = A + V: 0.9, 1.0; the hole stays 0
    assert torch.allclose(adv, torch.tensor([[0.4, 0.0, 0.2]]))
    assert torch.allclose(ret, torch.tensor([[0.9, 0.0, 1.0]]))


def test_value_loss_with_and_without_clipping():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([2.0, 0.1])
    # unclipped: 0.5 * (1 - 2)^2 = 0.5;  0.5 * (0 - 0.1)^2 = 0.005
    assert torch.allclose(F.value_loss(v, old, ret, clip=0.0), torch.tensor([0.5, 0.005]))
    # clip 0.2: V clipped to 0.5 + 0.2 = 0.7 -> 0.5 * (0.7 - 2)^2 = 0.845 > 0.5: the max is taken
    assert torch.allclose(F.value_loss(v, old, ret, clip=0.2), torch.tensor([0.845, 0.005]))


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = F.whiten(x, mask)
    # mean 2, population std sqrt(2/3) = 0.8165: (-1.2247, 0, 1.2247), masked position 0
    assert torch.allclose(w, torch.tensor([[-1.2247, 0.0, 1.2247, 0.0]]), atol=1e-4)
    assert F.explained_variance(x, x, mask) == pytest.approx(1.0)
    assert F.explained_variance(torch.full_like(x, 2.0), x, mask) == pytest.approx(0.0)


def test_bradley_terry_loss_hand_values():
    import math

    # r+ - r- = 0 -> log 2;  = 2 -> log(1 + e^-2) = 0.1269
    loss = F.bradley_terry_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(loss, torch.tensor([math.log(2), math.log(1 + math.exp(-2))]), atol=1e-6)
