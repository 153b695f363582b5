"""The GRPO family as switches of algorithm=grpo: advantage estimators, GSPO's sequence ratio, CISPO,
dual-clip, rollout-drift correction (TIS), DAPO's overlong punishment and filtering."""

import math

import pytest
import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.grpo import GRPO
from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.rewards.base import FunctionReward
from grpo_cli.rewards.overlong import OverlongReward, overlong_penalty

# ------------------------------------------------------------------------------ advantage estimators


def test_rloo_leave_one_out_hand_values():
    # group 0 = {1, 0, 0, 1} (sum 2): r=1 -> 1 - (2-1)/3 = 2/3;  r=0 -> 0 - 2/3 = -2/3
    # group 1 = {2, 4}, interleaved with group 0: 2 - 4 = -2;  4 - 2 = 2
    # (= G/(G-1) * (r - mean): 4/3 * (1 - 0.5) = 2/3)
    rewards = torch.tensor([1.0, 2.0, 0.0, 0.0, 4.0, 1.0])
    group = torch.tensor([0, 1, 0, 0, 1, 0])
    expected = torch.tensor([2 / 3, -2.0, -2 / 3, -2 / 3, 2.0, 2 / 3])
    assert torch.allclose(F.rloo_advantages(rewards, group), expected, atol=1e-6)
    assert F.rloo_advantages(torch.tensor([5.0]), torch.tensor([0])).item() == 0.0  # a group of one: no baseline


def test_reinforce_pp_whitens_over_the_batch_tokens():
    # beta = 0: the outcome at each row's last token; rows left-padded (row 1 has one token)
    rewards, group = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0, 0, 1])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])  # 5 tokens
    token_rewards = F.kl_shaped_rewards(rewards, torch.zeros(3, 2), torch.zeros(3, 2), mask, beta=0.0)
    # no baseline: returns [1, 1 | 0 | 3, 3]: mean 1.6, var (2*0.36 + 2.56 + 2*1.96)/5 = 1.44, std 1.2
    # -> 1: -0.6/1.2 = -0.5;  0: -1.6/1.2 = -1.3333;  3: 1.4/1.2 = 1.1667; 0 off the mask
    adv = F.reinforce_pp_advantages(token_rewards, group, mask, group_baseline=False)
    assert torch.allclose(adv, torch.tensor([[-0.5, -0.5], [0.0, -4 / 3], [7 / 6, 7 / 6]]), atol=1e-5)
    # group baseline: group 0 mean 0.5 -> 0.5, -0.5; group 1 alone -> 0. Tokens [0.5, 0.5, -0.5, 0, 0]:
    # mean 0.1, var (0.16 + 0.16 + 0.36 + 0.01 + 0.01)/5 = 0.14, std 0.374166
    # -> 0.4/0.374166 = 1.069045;  -0.6/0.374166 = -1.603567;  -0.1/0.374166 = -0.267261
    adv = F.reinforce_pp_advantages(token_rewards, group, mask, group_baseline=True)
    expected = torch.tensor([[1.069045, 1.069045], [0.0, -1.603567], [-0.267261, -0.267261]])
    assert torch.allclose(adv, expected, atol=1e-5)


def test_reinforce_pp_puts_the_kl_in_the_reward():
    # beta 0.5, log(pi_old / pi_ref) = [[0.2, 0.4], [0, -0.2]], outcomes [1, 0] at the last token:
    # token rewards [[-0.1, -0.2 + 1 = 0.8], [0, 0.1]]; returns [[0.7, 0.8], [0.1, 0.1]]
    # mean 0.425, var (0.275^2 + 0.375^2 + 2 * 0.325^2)/4 = 0.106875, std 0.326917
    # -> [[0.841192, 1.147080], [-0.994137, -0.994137]]
    mask, group = torch.ones(2, 2), torch.tensor([0, 0])
    old, ref = torch.tensor([[0.2, 0.4], [0.0, -0.2]]), torch.zeros(2, 2)
    token_rewards = F.kl_shaped_rewards(torch.tensor([1.0, 0.0]), old, ref, mask, beta=0.5)
    assert torch.allclose(token_rewards, torch.tensor([[-0.1, 0.8], [0.0, 0.1]]), atol=1e-6)
    adv = F.reinforce_pp_advantages(token_rewards, group, mask, group_baseline=False)
    assert torch.allclose(adv, torch.tensor([[0.841192, 1.147080], [-0.994137, -0.994137]]), atol=1e-5)
    # baseline: totals 0.7, 0.1 -> centred +-0.3 on every token: whitened +-1
    adv = F.reinforce_pp_advantages(token_rewards, group, mask, group_baseline=True)
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), atol=1e-5)


# ----------------------------------------------------------------------------- ratios and objectives


def test_gspo_log_ratio_value_is_the_sequence_ratio_and_gradient_is_per_token():
    # log ratios of the 2 masked tokens: -1 - (-1.2) = 0.2, -2 - (-1.9) = -0.1 -> log s = 0.05 on every token
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.9, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    log_s = F.gspo_log_ratio(logp, old, mask)
    assert torch.allclose(log_s, torch.full((1, 3), 0.05), atol=1e-6)
    # A = 1, wide clip: d(s * A)/dlogp_t = s = e^0.05 = 1.051271 on each token (GSPO-token, eq. 14)
    obj, clipped = F.clip_objective(log_s, torch.ones(1, 3), eps_low=0.5, eps_high=0.5)
    (obj * mask).sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[math.exp(0.05), math.exp(0.05), 0.0]]), atol=1e-6)
    # GSPO's eps: s = 1.0513 > 1 + 4e-4 clips with A = +1 (objective 1.0004, no gradient) ...
    obj, clipped = F.clip_objective(log_s.detach(), torch.ones(1, 3), eps_low=3e-4, eps_high=4e-4)
    assert obj[0, 0].item() == pytest.approx(1.0004) and bool(clipped.all())
    # ... but not with A = -1: min(-1.0513, -1.0004) = -1.0513
    obj, clipped = F.clip_objective(log_s.detach(), -torch.ones(1, 3), eps_low=3e-4, eps_high=4e-4)
    assert obj[0, 0].item() == pytest.approx(-math.exp(0.05)) and not bool(clipped.any())
    # the sequence log-ratio is capped at 10 against overflow
    assert F.gspo_log_ratio(torch.tensor([[20.0]]), torch.zeros(1, 1), torch.ones(1, 1)).item() == 10.0


def test_cispo_clips_a_detached_weight_and_keeps_every_gradient():
    # ratio = e^[0.5, -0.5, 0.1] = [1.6487, 0.6065, 1.1052]; clip to [0.8, 1.28] -> w = [1.28, 0.8, 1.1052]
    # objective w * A * logp: 1.28*1*(-1) = -1.28;  0.8*(-1)*(-2) = 1.6;  1.1052*2*(-0.5) = -1.1052
    # gradient w * A: [1.28, -0.8, 2.2103], even on the clipped tokens (PPO's clip would give 0)
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    log_ratio = torch.tensor([0.5, -0.5, 0.1])
    adv = torch.tensor([1.0, -1.0, 2.0])
    obj, clipped = F.cispo_objective(logp, log_ratio, adv, eps_low=0.2, eps_high=0.28)
    assert torch.allclose(obj, torch.tensor([-1.28, 1.6, -math.exp(0.1)]), atol=1e-5)
    assert clipped.tolist() == [True, True, False]
    obj.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([1.28, -0.8, 2 * math.exp(0.1)]), atol=1e-5)


def test_dual_clip_bounds_negative_advantages_below():
    # ratios [5, 5, 2], A = [-1, +1, -1], eps 0.2, c = 3:
    # token 0: min(-5, -1.2) = -5 < 3 * -1 = -3 -> -3 (floored, no gradient)
    # token 1: A > 0: min(5, 1.2) = 1.2, untouched;  token 2: min(-2, -1.2) = -2 > -3, untouched
    log_ratio = torch.log(torch.tensor([5.0, 5.0, 2.0])).requires_grad_()
    adv = torch.tensor([-1.0, 1.0, -1.0])
    obj, _ = F.clip_objective(log_ratio, adv, eps_low=0.2, eps_high=0.2)
    obj, floored = F.dual_clip(obj, adv, c=3.0)
    assert torch.allclose(obj, torch.tensor([-3.0, 1.2, -2.0]), atol=1e-6)
    assert floored.tolist() == [True, False, False]
    obj.sum().backward()
    assert log_ratio.grad.tolist()[:2] == [0.0, 0.0] and log_ratio.grad[2].item() == pytest.approx(-2.0)


def test_tis_weights_and_engine_drift_hand_values():
    # pi_old / pi_rollout = e^[0.5, -0.5, 0] = [1.6487, 0.6065, 1]; cap 1.5 -> [1.5, 0.6065, 1]
    old = torch.tensor([[-1.0, -1.0, -2.0]])
    rollout = torch.tensor([[-1.5, -0.5, -2.0]])
    assert torch.allclose(F.tis_weights(old, rollout, cap=1.5), torch.tensor([[1.5, math.exp(-0.5), 1.0]]))
    # k3 of KL[rollout || old] with r = pi_old / pi_rollout: r - log r - 1
    # token 0: e^0.5 - 0.5 - 1 = 0.148721;  token 1: e^-0.5 + 0.5 - 1 = 0.106531;  token 2 masked out
    stats = F.engine_drift(old, rollout, torch.tensor([[1.0, 1.0, 0.0]]))
    assert stats["engine_kl"] == pytest.approx((0.148721 + 0.106531) / 2, abs=1e-5)
    assert stats["engine_ratio_max"] == pytest.approx(math.exp(0.5), abs=1e-6)


def test_overlong_penalty_dapo_hand_values():
    # L_max 20, buffer 4: expected 16. |o| <= 16: 0; 17: (16-17)/4 = -0.25; 19: -0.75; 20: -1; 25: -1 (capped)
    lengths = torch.tensor([10.0, 16.0, 17.0, 19.0, 20.0, 25.0])
    out = overlong_penalty(lengths, max_tokens=20, buffer=4, penalty=1.0)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0, -1.0]))
    assert torch.allclose(overlong_penalty(lengths, max_tokens=20, buffer=4, penalty=0.5), out * 0.5)


# ------------------------------------------------------------------------------------- the algorithm


def make_batch(lengths, T=4, **tensors):
    """B rows, left-padded: row i's completion is its last lengths[i] tokens of T + 1."""
    B = len(lengths)
    comp = torch.zeros(B, T + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        comp[i, T + 1 - n :] = 1
    ids = torch.ones(B, T + 1, dtype=torch.long)
    batch = Batch(ids, torch.ones_like(ids), comp, ["p"] * B, ["c"] * B, ["a"] * B, torch.zeros(B, dtype=torch.long))
    batch.tensors.update(tensors)
    batch.totals.update(sequences=float(B), tokens=float(comp[:, 1:].sum()))
    return batch


class FixedPolicy:
    """A policy whose log-probs are the leaf tensor ``logp`` [B, T]: gradients land on it."""

    def __init__(self, logp):
        self.logp = logp.clone().requires_grad_()

    def logprobs(self, batch, temperature=1.0, with_entropy=False):
        return self.logp, torch.zeros_like(self.logp)


def grpo(**kw):
    args = dict(beta=0.04, eps=0.2, eps_high=None, mu=1, aggregation="sequence", scale_rewards=True)
    return GRPO(**{**args, **kw})


def loss_and_grad(algo, batch, logp):
    policy = FixedPolicy(logp)
    loss, metrics = algo.loss(batch, policy)
    loss.backward()
    return loss.detach(), policy.logp.grad, metrics


def test_default_loss_is_the_papers_arithmetic_bit_for_bit():
    # the switches' defaults add no op: the same bits as eq. 3 composed directly
    torch.manual_seed(0)
    logp, old, ref, adv = (torch.randn(3, 4) for _ in range(4))
    batch = make_batch([4, 2, 3], old_logp=old, ref_logp=ref, advantages=adv)
    loss, grad, _ = loss_and_grad(grpo(mu=2), batch, logp)
    direct = logp.clone().requires_grad_()
    per_token, _ = F.grpo_token_loss(direct, old, ref, adv, beta=0.04, eps_low=0.2, eps_high=0.2)
    expected = F.aggregate(
        per_token, batch.target_mask, mode="sequence", total_sequences=3, total_tokens=9, max_tokens=4
    )
    expected.backward()
    assert torch.equal(loss, expected.detach()) and torch.equal(grad, direct.grad)


def test_tis_with_rollout_equal_to_old_is_the_identity():
    torch.manual_seed(1)
    logp, ref, adv = (torch.randn(2, 4) for _ in range(3))
    plain = make_batch([4, 3], ref_logp=ref, advantages=adv)
    loss, grad, metrics = loss_and_grad(grpo(), plain, logp)
    # mu = 1: pi_old is pi_theta detached, so the engine agrees exactly when rollout_logp = logp
    drifted = make_batch([4, 3], ref_logp=ref, advantages=adv, rollout_logp=logp.clone())
    loss2, grad2, metrics2 = loss_and_grad(grpo(tis_cap=2.0), drifted, logp)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert metrics2["engine_kl"] == 0.0 and metrics2["engine_ratio_max"] == 1.0 and "engine_kl" not in metrics


def test_tis_capped_hand_values():
    # one row of 2 tokens, mu = 1 (ratio 1), A = 1, beta 0, token mean over 2 tokens
    # weights min(e^[0.5, -0.5], 1.5) = [1.5, 0.60653]: loss = -(1.5 + 0.60653)/2 = -1.053265
    # d loss / d logp = -w * A / 2 = [-0.75, -0.303265]
    logp = torch.tensor([[-1.0, -1.0]])
    batch = make_batch([2], T=2, advantages=torch.ones(1, 2), rollout_logp=torch.tensor([[-1.5, -0.5]]))
    loss, grad, metrics = loss_and_grad(grpo(beta=0.0, aggregation="token", tis_cap=1.5), batch, logp)
    assert loss.item() == pytest.approx(-(1.5 + math.exp(-0.5)) / 2, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[-0.75, -math.exp(-0.5) / 2]]), atol=1e-6)
    assert metrics["engine_ratio_max"] == pytest.approx(math.exp(0.5), abs=1e-6)


def test_mask_truncated_drops_the_gradient_but_keeps_the_totals():
    # rows of 2 tokens, A = [1, 2], ratio 1, beta 0, token mean over 4 tokens;
    # row 0 truncated: loss -(2 + 2)/4 = -1 (not -(1 + 1 + 2 + 2)/4 = -1.5), row 0's gradient 0
    logp, adv = torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    batch = make_batch([2, 2], T=2, advantages=adv, truncated=torch.tensor([True, False]))
    loss, grad, _ = loss_and_grad(grpo(beta=0.0, aggregation="token", mask_truncated=True), batch, logp)
    assert loss.item() == pytest.approx(-1.0) and grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0
    assert loss_and_grad(grpo(beta=0.0, aggregation="token"), batch, logp)[0].item() == pytest.approx(-1.5)


def test_advantage_switch_picks_the_estimator():
    batch = make_batch([2, 2, 1, 2], T=2)
    batch.rewards, batch.group = torch.tensor([1.0, 0.0, 2.0, 4.0]), torch.tensor([0, 0, 1, 1])
    rloo = grpo(advantage="rloo").advantages(batch)
    assert torch.allclose(rloo[:, 0], torch.tensor([1.0, -1.0, -2.0, 2.0]))  # r_i - r_j in groups of 2
    mask = batch.target_mask
    batch.tensors["token_rewards"] = F.kl_shaped_rewards(batch.rewards, mask * 0, mask * 0, mask, beta=0.0)
    pp = grpo(advantage="reinforce_pp", reinforce_baseline="group").advantages(batch)
    expected = F.reinforce_pp_advantages(batch.tensors["token_rewards"], batch.group, mask, group_baseline=True)
    assert torch.equal(pp, expected)
    assert grpo(advantage="reinforce_pp").loss_beta == 0.0 and grpo().loss_beta == 0.04  # KL in the reward


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(advantage="rloo", supervision="process"), "algorithm.advantage"),
        (dict(advantage="vtrace"), "algorithm.advantage"),
        (dict(ratio_level="turn"), "algorithm.ratio_level"),
        (dict(policy_loss="ppo"), "algorithm.policy_loss"),
        (dict(dual_clip=1.0), "algorithm.dual_clip"),
    ],
)
def test_bad_switches_are_one_line_user_errors(kw, key):
    with pytest.raises(UserError, match=key):
        grpo(**kw)


def test_tis_cap_without_engine_logprobs_is_a_user_error():
    batch = make_batch([2], T=2, advantages=torch.ones(1, 2))
    with pytest.raises(UserError, match="algorithm.tis_cap"):
        grpo(tis_cap=2.0).loss(batch, FixedPolicy(torch.zeros(1, 2)))


def test_overlong_reward_wraps_any_reward_and_records_the_penalty():
    # completions of 1 and 3 tokens, L_max 3, buffer 2: expected 1 -> 0 and (1 - 3)/2 * 0.5 = -0.5
    batch = make_batch([1, 3], T=3)
    reward = OverlongReward(FunctionReward(lambda b: [1.0, 1.0], name="x"), buffer=2, penalty=0.5)
    assert reward(batch).tolist() == [1.0, 1.0]  # no L_max (stored samples): as it is
    batch.totals["max_tokens"] = 3.0
    assert reward(batch).tolist() == [1.0, 0.5]
    assert batch.tensors["reward/overlong"].tolist() == [0.0, -0.5] and batch.stats["overlong_penalty"] == -0.25


def test_build_reward_applies_the_overlong_buffer_to_outcome_rewards_only():
    from grpo_cli.config.schema import RewardConfig
    from grpo_cli.rewards.registry import build_reward

    assert isinstance(build_reward(RewardConfig(name="outcome", overlong_buffer=4)), OverlongReward)
    assert not isinstance(build_reward(RewardConfig(name="outcome")), OverlongReward)
    with pytest.raises(UserError, match="reward.overlong_buffer"):
        build_reward(RewardConfig(name="steps", overlong_buffer=4))


# ------------------------------------------------------------------------------------ training runs


def add_engine_logprobs(monkeypatch):
    """Stand in for an engine that returns its log-probs: the policy's own, shifted by 0.05 on odd tokens."""
    prepare = GRPO.prepare

    def with_rollout_logp(self, batch, policy):
        batch = prepare(self, batch, policy)
        with torch.no_grad():
            logp = policy.logprobs(batch, temperature=batch.totals.get("temperature", 1.0))[0]
        shift = 0.05 * (torch.arange(logp.shape[1], device=logp.device) % 2)
        batch.tensors["rollout_logp"] = (logp + shift) * batch.target_mask
        return batch

    monkeypatch.setattr(GRPO, "prepare", with_rollout_logp)


SWITCHES = {
    "rloo": (["algorithm.advantage=rloo"], None),
    "reinforce_pp": (["algorithm.advantage=reinforce_pp", "algorithm.reinforce_baseline=group"], "reward_kl"),
    "gspo": (
        ["algorithm.ratio_level=sequence", "algorithm.eps=3e-4", "algorithm.eps_high=4e-4", "algorithm.mu=2"],
        None,
    ),
    "cispo": (["algorithm.policy_loss=cispo", "algorithm.eps=1.0", "algorithm.eps_high=0.28"], None),
    "dual_clip": (["algorithm.dual_clip=3.0", "algorithm.mu=2"], "dual_clip_fraction"),
    "mask_truncated": (["algorithm.mask_truncated=true"], None),
    "overlong": (["reward.overlong_buffer=8", "reward.overlong_penalty=0.5"], "overlong_penalty"),
    "tis": (["algorithm.tis_cap=2.0"], "engine_kl"),
}


@pytest.mark.slow
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_each_switch_trains_two_steps(switch, sft_run, tmp_path, monkeypatch, length_rewards):
    from conftest import compose, metrics

    from grpo_cli.trainer.loop import train

    overrides, metric = SWITCHES[switch]
    if switch == "tis":
        add_engine_logprobs(monkeypatch)
    cfg = compose(
        "grpo_arithmetic",
        f"model.name_or_path={sft_run}",
        f"output_dir={tmp_path / switch}",
        "reward.name=length_mod_3",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "trainer.lr=1e-3",
        *overrides,
    )
    rows = metrics(train(cfg))
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if metric:
        assert all(math.isfinite(r[metric]) for r in rows)
    if switch == "tis":
        assert rows[0]["engine_ratio_max"] == pytest.approx(1.0, abs=1e-4)  # pi_old / pi_rollout <= e^0 = 1


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_tis_with_the_engines_own_logprobs_and_mu_1_is_the_identity(engine, sft_run, tmp_path, length_rewards):
    """The engines' rollout_logp (not a stand-in): in fp32 they are the trainer's log-probs up to
    summation order, so with mu = 1 the capped weight is 1 and a tis_cap run trains as the plain one."""
    from conftest import compose, metrics

    from grpo_cli.trainer.loop import train

    def run(name, *extra):
        cfg = compose(
            "grpo_arithmetic",
            f"model.name_or_path={sft_run}",
            f"output_dir={tmp_path / name}",
            "reward.name=length_mod_3",
            "trainer.steps=2",
            "source.prompts_per_step=2",
            "source.group_size=4",
            "trainer.lr=1e-3",
            f"rollout.engine={engine}",
            *extra,
        )
        return metrics(train(cfg))

    plain, corrected = run("plain"), run("tis", "algorithm.tis_cap=2.0")
    for a, b in zip(plain, corrected):
        assert b["engine_kl"] < 1e-8 and b["engine_ratio_max"] == pytest.approx(1.0, abs=1e-4)
        for key in ("loss", "grad_norm", "reward_mean", "kl", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
