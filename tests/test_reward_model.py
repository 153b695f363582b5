"""Reward-model training (grpo_cli/algorithms/reward_model.py): the Bradley-Terry and pointwise losses,
their gradients and metrics on hand-made scores, the process reward model's step loss, and setup on
the tiny model. The scorer is replaced by fixed scores so every number is computed by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from grpo_cli.algorithms.reward_model import ProcessRewardModelTraining, RewardModelTraining
from grpo_cli.batch import Batch
from grpo_cli.errors import UserError

LOG2 = math.log(2.0)
# softplus(x) = log(1 + e^x): -log sigmoid(m) = softplus(-m), BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x)
SP_M2 = math.log1p(math.exp(-2.0))  # 0.126928
SP_P2 = math.log1p(math.exp(2.0))  # 2.126928
SP_M1 = math.log1p(math.exp(-1.0))  # 0.313262
SP_P1 = math.log1p(math.exp(1.0))  # 1.313262


class FixedScores(torch.nn.Module):
    """A scorer whose scores [B, T] are given: the loss under test is all that computes."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores))

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape == self.scores.shape and attention_mask.shape == self.scores.shape
        return self.scores


def scored_batch(last_scores, rewards=None, group=None):
    """4 rows of T = 3 columns; the last column holds ``last_scores``, the others 50 (a loss reading any
    other column than the last token's would be far off)."""
    B = len(last_scores)
    ids = torch.ones(B, 3, dtype=torch.long)
    batch = Batch(
        ids,
        torch.ones_like(ids),
        torch.ones_like(ids),
        ["q"] * B,
        ["o"] * B,
        ["1"] * B,
        torch.tensor(group if group is not None else [i // 2 for i in range(B)]),
        rewards=None if rewards is None else torch.tensor(rewards),
    )
    scores = [[50.0, 50.0, s] for s in last_scores]
    return batch.with_totals(), SimpleNamespace(model=FixedScores(scores))


def test_pairwise_loss_is_bradley_terry_per_pair_with_the_last_tokens_score():
    # rows (o+, o-) pairs: (2, 0) margin 2 and (-1, 1) margin -2
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(-2) = log(1 + e^2) = 2.126928
    # mean over P = 4 / 2 = 2 pairs: (0.126928 + 2.126928) / 2 = 1.126928
    batch, policy = scored_batch([2.0, 0.0, -1.0, 1.0])
    algo = RewardModelTraining(objective="pairwise", threshold=0.5)
    loss, metrics = algo.loss(batch, policy)
    assert loss.item() == pytest.approx((SP_M2 + SP_P2) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(1.126928, abs=1e-6)
    assert metrics == pytest.approx({"pair_acc": 0.5, "margin": 0.0})  # margins 2 and -2
    # d/dr+ of -log sigmoid(r+ - r-) = -sigmoid(-(r+ - r-)), / P: pair 1 -sigmoid(-2) / 2 = -0.059601,
    # pair 2 -sigmoid(2) / 2 = -0.440399; r- gets the opposite; no other column gets any gradient
    loss.backward()
    s2, sm2 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0))
    expected = torch.tensor([[0, 0, -sm2 / 2], [0, 0, sm2 / 2], [0, 0, -s2 / 2], [0, 0, s2 / 2]])
    torch.testing.assert_close(policy.model.scores.grad, expected)


def test_pairwise_micro_batch_losses_add_up_to_the_batch_loss():
    # each half is normalised by the whole batch's P = 2 pairs: 0.126928 / 2 and 2.126928 / 2
    batch, policy = scored_batch([2.0, 0.0, -1.0, 1.0])
    algo = RewardModelTraining(objective="pairwise", threshold=0.5)
    whole = algo.loss(batch, policy)[0].item()
    first, second = batch.micro_batches(2)
    assert first.totals["sequences"] == second.totals["sequences"] == 4.0
    first_loss = algo.loss(first, scored_batch([2.0, 0.0])[1])[0].item()
    second_loss = algo.loss(second, scored_batch([-1.0, 1.0])[1])[0].item()
    assert first_loss == pytest.approx(SP_M2 / 2, abs=1e-6) and second_loss == pytest.approx(SP_P2 / 2, abs=1e-6)
    assert first_loss + second_loss == pytest.approx(whole, abs=1e-6)


def test_pairwise_refuses_rows_that_are_not_pairs_of_one_question():
    batch, policy = scored_batch([2.0, 0.0, -1.0, 1.0], group=[0, 1, 1, 2])
    with pytest.raises(UserError, match="pair"):
        RewardModelTraining(objective="pairwise", threshold=0.5).loss(batch, policy)


def test_pointwise_loss_is_binary_cross_entropy_against_the_thresholded_reward():
    # scores [2, 0, -1, 1]; rewards [1, 0, 0.7, 0.5] > 0.5 -> labels [1, 0, 1, 0] (0.5 itself is not correct)
    # BCE: label 1 at 2: log(1 + e^-2) = 0.126928; label 0 at 0: log 2 = 0.693147;
    #      label 1 at -1: log(1 + e^1) = 1.313262; label 0 at 1: log(1 + e^1) = 1.313262
    # mean over 4 sequences: 3.446599 / 4 = 0.861650
    batch, policy = scored_batch([2.0, 0.0, -1.0, 1.0], rewards=[1.0, 0.0, 0.7, 0.5])
    algo = RewardModelTraining(objective="pointwise", threshold=0.5)
    loss, metrics = algo.loss(batch, policy)
    assert loss.item() == pytest.approx((SP_M2 + LOG2 + SP_P1 + SP_P1) / 4, abs=1e-6)
    assert loss.item() == pytest.approx(0.861650, abs=1e-6)
    # accuracy: score > 0 against the label: [yes, yes (0 is not > 0), no, no] = 0.5; mean score 0.5
    assert metrics == pytest.approx({"accuracy": 0.5, "score_mean": 0.5})
    assert algo.main_metric == "accuracy"
    # d BCE / dx = sigmoid(x) - y, / 4 sequences, on the last column only
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = torch.tensor(
        [[0, 0, (sig(2) - 1) / 4], [0, 0, (0.5 - 0) / 4], [0, 0, (sig(-1) - 1) / 4], [0, 0, sig(1) / 4]]
    )
    torch.testing.assert_close(policy.model.scores.grad, expected)


def test_evaluate_gives_the_loss_metrics_without_gradient():
    batch, policy = scored_batch([2.0, 0.0, -1.0, 1.0], rewards=[1.0, 0.0, 0.7, 0.5])
    algo = RewardModelTraining(objective="pointwise", threshold=0.5)
    assert algo.evaluate(batch, policy) == pytest.approx({"accuracy": 0.5, "score_mean": 0.5})
    assert policy.model.scores.grad is None


def test_unknown_objective_is_a_user_error():
    with pytest.raises(UserError, match="algorithm.objective: expected 'pairwise' or 'pointwise', got 'listwise'"):
        RewardModelTraining(objective="listwise", threshold=0.5)


def test_setup_puts_a_zero_head_on_the_lm_whose_first_losses_are_log_2():
    # A zero head scores every output 0: each pair's -log sigmoid(0) = log 2, each BCE(0, y) = log 2,
    # so both losses are exactly log 2 = 0.693147 before any step, whatever the labels.
    from grpo_cli.batch import pack
    from grpo_cli.config.schema import TinyModelConfig
    from grpo_cli.models.scorer import Scorer
    from grpo_cli.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    lm = build_tiny_model(
        TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        len(tok),
        tok.pad_token_id,
        tok.eos_token_id,
    )
    enc = lambda xs: [tok(x, add_special_tokens=False)["input_ids"] for x in xs]  # noqa: E731
    ids, attn, comp = pack(
        enc(["1+1\n", "1+1\n", "2*3\n", "2*3\n"]), enc(["#### 2", "#### 3", "#### 6", "#### 5"]), tok.pad_token_id
    )
    batch = Batch(
        ids,
        attn,
        comp,
        [""] * 4,
        [""] * 4,
        [""] * 4,
        torch.tensor([0, 0, 1, 1]),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
    ).with_totals()
    for objective in ("pairwise", "pointwise"):
        algo = RewardModelTraining(objective=objective, threshold=0.5)
        policy = algo.setup(SimpleNamespace(model=lm))
        assert isinstance(policy.model, Scorer) and policy.model.kind == "outcome" and policy.model.lm is lm
        loss, _ = algo.loss(batch, policy)
        assert loss.item() == pytest.approx(LOG2, abs=1e-6)
        loss.backward()
        # the head learns: dL/dw = sum_i dL/ds_i * h_i is not 0. The trunk gets no gradient yet:
        # dL/dh_i = dL/ds_i * w with w = 0 (it starts learning once the head has moved).
        assert policy.model.head.weight.grad.abs().sum() > 0
        assert all(p.grad is None or not p.grad.any() for p in lm.parameters())
        policy.model.zero_grad()


def test_process_reward_model_reads_the_score_of_each_steps_last_token():
    # One row, T = 4: scores [9, 2, 0, -1]. step_logits drops column 0 (it predicts nothing):
    # position p - 1 holds the score at token p: [2, 0, -1]. Steps end at targets 0 and 2 (mask
    # [1, 0, 1]); step rewards [1, 5, 0] > 0.5 -> labels [1, 1, 0] (the unmasked 5 counts nowhere).
    # BCE: label 1 at 2: log(1 + e^-2) = 0.126928; label 0 at -1: log(1 + e^-1) = 0.313262
    # over totals["steps"] = 2: 0.440190 / 2 = 0.220095
    ids = torch.ones(1, 4, dtype=torch.long)
    batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids), ["q"], ["o"], ["1"], torch.tensor([0]))
    batch.tensors.update(step_mask=torch.tensor([[1.0, 0.0, 1.0]]), step_rewards=torch.tensor([[1.0, 5.0, 0.0]]))
    policy = SimpleNamespace(model=FixedScores([[9.0, 2.0, 0.0, -1.0]]))
    algo = ProcessRewardModelTraining(threshold=0.5)
    batch = algo.prepare(batch.with_totals(), policy)
    assert batch.totals["steps"] == 2.0
    loss, metrics = algo.loss(batch, policy)
    assert loss.item() == pytest.approx((SP_M2 + SP_M1) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.220095, abs=1e-6)
    # step_acc: (2 > 0) = 1 = label, (-1 > 0) = 0 = label: 1.0; step_label_mean on the steps (1 + 0) / 2 = 0.5
    assert metrics == pytest.approx({"step_acc": 1.0, "step_label_mean": 0.5})
    loss.backward()
    # dBCE/dx = sigmoid(x) - y over 2 steps, at tokens 1 and 3 only
    g1, g3 = (1 / (1 + math.exp(-2.0)) - 1) / 2, (1 / (1 + math.exp(1.0))) / 2
    torch.testing.assert_close(policy.model.scores.grad, torch.tensor([[0.0, g1, 0.0, g3]]))


def test_process_reward_model_needs_step_labels():
    ids = torch.ones(1, 4, dtype=torch.long)
    batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids), ["q"], ["o"], ["1"], torch.tensor([0]))
    with pytest.raises(UserError, match="reward=steps"):
        ProcessRewardModelTraining(threshold=0.5).prepare(batch, SimpleNamespace(model=None))
