"""Token-budget micro-batches (``trainer.max_tokens_per_microbatch``): the packing on hand-made lengths,
and, on the tiny model, that the micro-batch losses add up to the full batch's loss and their
gradients to its gradient, for GRPO, PPO and SFT (the full batch in one pass is the oracle)."""

import pytest
import torch

from grpo_cli.batch import token_budget_splits
from grpo_cli.trainer import loop
from tests.conftest import compose
from tests.test_batch import batch_of


@pytest.mark.parametrize(
    "lengths, budget, unit, splits",
    [
        # greedy in order: 3 | 4+2 (6) | 9 alone (over the budget) | 1
        ([3, 4, 2, 9, 1], 6, 1, [(0, 1), (1, 3), (3, 4), (4, 5)]),
        ([2, 2, 2, 2], 100, 1, [(0, 4)]),  # all fit: one micro-batch
        ([5, 5, 5], 5, 1, [(0, 1), (1, 2), (2, 3)]),  # exactly the budget fits
        ([7, 8], 1, 1, [(0, 1), (1, 2)]),  # every row over the budget: each alone
        # pairs: (1+2) | (3+1) would make 7 > 6, so it starts a new one; (3+1)+(1+1) = 6 fits
        ([1, 2, 3, 1, 1, 1], 6, 2, [(0, 2), (2, 6)]),
        ([4, 4, 1, 1], 5, 2, [(0, 2), (2, 4)]),  # a pair of 8 over the budget is alone, never split
        ([], 10, 1, []),
    ],
)
def test_token_budget_splits_on_hand_made_lengths(lengths, budget, unit, splits):
    assert token_budget_splits(lengths, budget, unit) == splits


def test_token_budget_splits_cover_every_row_in_order_within_the_budget():
    gen = torch.Generator().manual_seed(0)
    for budget in (1, 7, 20, 64):
        lengths = torch.randint(1, 16, (40,), generator=gen).tolist()
        splits = token_budget_splits(lengths, budget)
        assert [a for a, _ in splits] == [0] + [b for _, b in splits[:-1]] and splits[-1][1] == 40
        assert all(sum(lengths[a:b]) <= budget or b - a == 1 for a, b in splits)
        # greedy: no micro-batch could have taken the next one's first row
        assert all(sum(lengths[a : b + 1]) > budget for a, b in splits[:-1])


def test_token_micro_batches_count_real_tokens_and_keep_the_totals():
    batch = batch_of(6).with_totals()  # lengths 2, 3, 4, 2, 3, 4 (prompt 1 + completion i % 3 + 1)
    assert batch.attention_mask.sum(1).tolist() == [2, 3, 4, 2, 3, 4]
    parts = batch.token_micro_batches(6)  # 2+3 | 4+2 | 3 | 4
    assert [p.prompts for p in parts] == [["p0", "p1"], ["p2", "p3"], ["p4"], ["p5"]]
    assert all(p.totals == batch.totals for p in parts)
    # with grad_accum 2 first (rows 0-2 | 3-5), then the budget within each
    assert [len(p) for p in loop.micro_batches(batch, 2, 6)] == [2, 1, 2, 1]
    assert [len(p) for p in loop.micro_batches(batch, 2, 0)] == [3, 3]  # off: grad_accum alone


def prepared(recipe, tmp_path, *overrides):
    """(algorithm, policy, batch): one batch of the recipe's source on the tiny model, rewarded and
    prepared as the loop does (no update yet)."""
    from grpo_cli.algorithms import build_algorithm
    from grpo_cli.data import load_examples
    from grpo_cli.models.load import load_model_and_tokenizer
    from grpo_cli.rewards.checkers import answer_checker
    from grpo_cli.rewards.registry import build_reward
    from grpo_cli.trainer.distributed import LOCAL

    cfg = compose(recipe, "model.name_or_path=tiny", f"output_dir={tmp_path}", *overrides)
    cpu = torch.device("cpu")
    algorithm = build_algorithm(cfg.algorithm)
    checker = answer_checker(cfg.data)
    reward = build_reward(cfg.reward, cpu, checker=checker)
    loaded = load_model_and_tokenizer(cfg.model)
    policy = loop.build_policy(cfg, algorithm, tmp_path, cpu, loaded)
    examples = load_examples(cfg.data, "train", loaded[1])
    source = loop.make_source(cfg, examples, policy, reward, checker, tmp_path, LOCAL)
    policy = algorithm.setup(policy)
    batch = source.next_batch(policy).with_totals()
    loop.reward_batch(reward, batch, policy.tokenizer)
    return algorithm, policy, algorithm.prepare(batch, policy)


def loss_and_grads(algorithm, policy, parts):
    """The summed loss of ``parts`` and the gradient it leaves on every trainable parameter."""
    params = [p for p in policy.trainable().parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    total = 0.0
    for mb in parts:
        loss, _ = algorithm.loss(mb, policy)
        loss.backward()
        total += float(loss.detach())
    return total, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("grpo_arithmetic", ["reward.name=length_mod_3", "source.prompts_per_step=3", "source.group_size=4"]),
        ("grpo_arithmetic", ["reward.name=length_mod_3", "source.prompts_per_step=3", "algorithm.aggregation=token"]),
        ("ppo_arithmetic", ["reward.name=length_mod_3", "source.prompts_per_step=8"]),
        ("sft_arithmetic", ["trainer.batch_size=8"]),
    ],
)
def test_token_micro_batches_give_the_full_batch_loss_and_gradient(tmp_path, length_rewards, recipe, overrides):
    algorithm, policy, batch = prepared(recipe, tmp_path, *overrides)
    lengths = batch.attention_mask.sum(1)
    budget = int(lengths.sum()) // 3  # a third of the batch's tokens: 3 or more micro-batches
    parts = loop.micro_batches(batch, 1, budget, algorithm.rows_together)
    assert len(parts) >= 3 and sum(len(p) for p in parts) == len(batch)
    full_loss, full_grads = loss_and_grads(algorithm, policy, [batch])
    loss, grads = loss_and_grads(algorithm, policy, parts)
    assert loss == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
    assert any(bool(g.abs().sum() > 0) for g in full_grads)  # a real gradient, not zeros on both sides
    for g, ref in zip(grads, full_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_a_pair_loss_never_sees_a_split_pair():
    from grpo_cli.algorithms.dpo import check_pairs

    batch = batch_of(6).with_totals()  # groups [0, 0, 1, 1, 2, 2]: (o+, o-) pairs; lengths 2, 3, 4, 2, 3, 4
    parts = batch.token_micro_batches(4, unit=2)  # (2+3) over 4, alone | (4+2) alone | (3+4) alone
    assert [len(p) for p in parts] == [2, 2, 2]
    for p in parts:
        check_pairs(p)


@pytest.mark.slow
def test_a_run_with_a_token_budget_packs_every_update(tmp_path, monkeypatch, length_rewards):
    from grpo_cli.batch import Batch

    seen = []
    real = Batch.token_micro_batches

    def spy(self, max_tokens, unit=1):
        parts = real(self, max_tokens, unit)
        seen.append((max_tokens, [int(p.attention_mask.sum()) for p in parts]))
        return parts

    monkeypatch.setattr(Batch, "token_micro_batches", spy)
    cfg = compose(
        "grpo_arithmetic",
        "model.name_or_path=tiny",
        "reward.name=length_mod_3",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "trainer.steps=2",
        "trainer.max_tokens_per_microbatch=64",
        f"output_dir={tmp_path}",
    )
    run = loop.train(cfg)
    assert [budget for budget, _ in seen] == [64, 64]  # one packing per update, the configured budget
    assert all(len(sizes) > 1 and all(s <= 64 for s in sizes) for _, sizes in seen)
    assert (run / "metrics.jsonl").read_text().count("\n") == 2


def test_the_default_budget_follows_the_model_on_a_cpu_and_is_off_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop.token_budget(None, cpu, 512 * 8) == 1024  # 2**22 / 4096: the step benchmark's model
    assert loop.token_budget(None, cpu, 128 * 4) == 8192  # the tiny default model: its batches stay whole
    assert loop.token_budget(None, cpu, 896 * 24) == 1024  # Qwen2.5-0.5B: 195 by the rule, held at the floor
    assert loop.token_budget(None, cpu, 0) == 1024  # a config without hidden_size / num_hidden_layers
    assert loop.token_budget(None, cuda, 512 * 8) == 0  # a GPU's memory was already below TRL's
    assert loop.token_budget(0, cpu, 512 * 8) == 0  # an explicit setting always wins
    assert loop.token_budget(4096, cuda, 512 * 8) == 4096
    assert compose("grpo_arithmetic").trainer.max_tokens_per_microbatch is None


def test_width_x_depth_reads_the_models_config_through_a_lora_wrapper():
    from grpo_cli.config.schema import LoraConfig, TinyModelConfig
    from grpo_cli.models.load import apply_lora
    from grpo_cli.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(TinyModelConfig(), len(tok), tok.pad_token_id, tok.eos_token_id)
    assert loop.width_x_depth(model) == 128 * 4
    assert loop.width_x_depth(apply_lora(model, LoraConfig(enabled=True, r=4))) == 128 * 4
    assert loop.width_x_depth(torch.nn.Linear(2, 2)) == 0  # no config: the CPU floor applies
