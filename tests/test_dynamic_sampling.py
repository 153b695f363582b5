"""Dynamic sampling (DAPO): the pure pieces on hand-computed values, the online source with a fake
sampler and reward, and short training runs (resume included)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, rows

from grpo_cli.batch import Batch, concat_batches, drop_pad_columns, pack
from grpo_cli.data.types import Example
from grpo_cli.errors import UserError
from grpo_cli.trainer import loop
from grpo_cli.trainer.dynamic import choose_groups, flat_groups, round_stats, rows_of_groups, sample_stats
from grpo_cli.trainer.sources import EpochSampler, OnlineSource

B = torch.tensor


def test_flat_groups_marks_the_groups_whose_rewards_are_all_equal():
    rewards = B([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 0.5])
    group = B([3, 3, 3, 3, 7, 7, 7, 7, 9, 9])
    assert flat_groups(rewards, group).tolist() == [False, True, True]


def test_choose_groups_takes_signal_first_then_fills_with_the_earliest_flat_groups():
    F, T = False, True
    # enough signal: round 0's group 0, round 1's groups 1 and 2 (round 1's flat group 0 is left out)
    assert choose_groups([B([F, T, T]), B([T, F, F])], 3) == [[0], [1, 2]]
    # surplus: the last round's extra signal group is dropped
    assert choose_groups([B([F, F]), B([F])], 2) == [[0, 1], []]
    # short: 1 group with signal (round 1's 0), filled with round 0's first flat group
    assert choose_groups([B([T, T]), B([F, T])], 2) == [[0], [0]]
    # nothing with signal: the first round's flat groups
    assert choose_groups([B([T, T]), B([T, T])], 2) == [[0, 1], []]


def test_rows_of_groups_follows_the_order_of_unique_ids():
    group = B([5, 5, 2, 2, 9, 9])  # unique: 2, 5, 9
    assert rows_of_groups(group, [0, 2]) == [2, 3, 4, 5]
    assert rows_of_groups(group, [1]) == [0, 1]


def test_round_stats_count_every_sampled_group_and_the_flat_ones_filled_in():
    F, T = False, True
    stats = round_stats([B([T, T, F, T]), B([F, T, T, T]), B([], dtype=torch.bool)], samples=32, target=4)
    # 6 of 8 groups flat; 2 with signal kept, 2 short; 32 samples / 2 kept
    assert stats == {"zero_std_groups": 0.75, "sample_rounds": 3.0, "samples_per_kept_group": 16.0, "groups_short": 2.0}


def test_sample_stats_measure_the_rows_kept():
    batch = mini_batch([[5], [6], [6]], [[7, 7], [8], [1, 1, 1]], [0, 0, 1], truncated=B([True, False, False]))
    batch.completions = ["1", "2", "1"]
    stats = sample_stats(batch, SimpleNamespace(correct=lambda c, a: c == a))
    assert stats == {"accuracy": 2 / 3, "completion_length": 2.0, "truncated": 1 / 3}


def mini_batch(prompts, completions, group, pad=0, **tensors):
    ids, attn, comp = pack(prompts, completions, pad)
    return Batch(
        input_ids=ids,
        attention_mask=attn,
        completion_mask=comp,
        prompts=[f"p{i}" for i in range(len(prompts))],
        completions=[" ".join(map(str, c)) for c in completions],
        answers=["1"] * len(prompts),
        group=B(group),
        tensors=dict(tensors),
        questions=[f"q{i}" for i in range(len(prompts))],
    )


def test_concat_batches_left_pads_to_the_longest_and_keeps_groups_apart():
    a = mini_batch([[5], [6]], [[7], [8]], [0, 0], truncated=B([True, False]), step=B([[1.0], [2.0]]))
    a.rewards = B([1.0, 0.0])
    b = mini_batch(
        [[5, 5], [6]],
        [[7, 7], [8]],
        [0, 1],
        pad=0,
        truncated=B([False, True]),
        step=B([[3.0, 4.0, 5.0], [0.0, 0.0, 6.0]]),
    )
    b.rewards = B([0.5, 0.5])
    out = concat_batches([a, b], pad_id=0)
    assert out.input_ids.tolist() == [[0, 0, 5, 7], [0, 0, 6, 8], [5, 5, 7, 7], [0, 0, 6, 8]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert out.completion_mask.tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert out.group.tolist() == [0, 0, 1, 2]  # b's 0 and 1 come after a's 0
    assert out.rewards.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert out.tensors["truncated"].tolist() == [True, False, False, True]
    # [B, T-1] tensors: right-aligned like the tokens
    assert out.tensors["step"].tolist() == [[0, 0, 1], [0, 0, 2], [3, 4, 5], [0, 0, 6]]
    assert out.completions == ["7", "8", "7 7", "8"] and out.questions == ["q0", "q1", "q0", "q1"]


def test_drop_pad_columns_cuts_what_is_padding_in_every_row():
    batch = mini_batch([[5], [6, 6]], [[7], [8]], [0, 0], truncated=B([True, False]), step=B([[0, 0, 1], [0, 2, 3]]))
    batch = batch.select([0])  # keeps T = 3: one leading column of padding
    out = drop_pad_columns(batch)
    assert out.input_ids.tolist() == [[5, 7]] and out.completion_mask.tolist() == [[0, 1]]
    assert out.tensors["step"].tolist() == [[0, 1]] and out.tensors["truncated"].tolist() == [True]


# --- the online source: a fake sampler (one token per answer) and a reward set per question ---


class FakeTokenizer:
    pad_token_id = 0


def fake_source(rewards, P=2, G=4, rounds=3, rank=0, world_size=1, sync=bool):
    """An OnlineSource over questions q0, q1, ...; ``rewards[q]`` are q's G rewards. Sampling is faked:
    question qN's completions are N+1 tokens long, the k-th reads str(k) (correct when k == 1)."""
    src = object.__new__(OnlineSource)
    src.examples = [Example(f"q{i}", f"q{i}", None, "1") for i in range(len(rewards))]
    src.P, src.G, src.checker, src.rank, src.world_size = (
        P,
        G,
        SimpleNamespace(correct=lambda c, a: c == a),
        rank,
        world_size,
    )
    src.sampler = EpochSampler(len(rewards), seed=0, shuffle=False)  # pops from the end: q_{n-1}, q_{n-2}, ...
    src.dynamic, src.max_rounds, src.sync = True, rounds, sync
    src.drawn = []

    def sample(policy, questions):
        src.drawn.append([q.question for q in questions])
        n = [int(q.question[1:]) for q in questions]
        return Batch(
            *pack([[9]] * (len(n) * G), [[3] * (k + 1) for k in n for _ in range(G)], 0),
            prompts=[q.prompt for q in questions for _ in range(G)],
            completions=[str(j) for _ in questions for j in range(G)],
            answers=["1"] * (len(n) * G),
            group=torch.arange(len(n)).repeat_interleave(G),
            tensors={"truncated": B([k % 2 == 1 for k in n for _ in range(G)])},
            totals={"temperature": 1.0},
        )

    src.sample = sample
    src.score = lambda batch: B([rewards[p][j] for p, j in zip(batch.prompts, map(int, batch.completions))])
    return src


POLICY = SimpleNamespace(tokenizer=FakeTokenizer())
FLAT, SIGNAL = [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]


def test_the_source_drops_flat_groups_and_samples_until_the_batch_is_full():
    # drawn in order q5 q4 | q3 q2 | ...: round 1 has 2 flat groups, round 2 one of each, round 3 fills
    rewards = {"q0": SIGNAL, "q1": SIGNAL, "q2": SIGNAL, "q3": FLAT, "q4": FLAT, "q5": [0.0] * 4}
    src = fake_source(rewards)
    batch = src.next_batch(POLICY)
    assert src.drawn == [["q5", "q4"], ["q3", "q2"], ["q1", "q0"]]
    assert batch.prompts == ["q2"] * 4 + ["q1"] * 4  # q0's surplus group dropped
    assert batch.group.tolist() == [0] * 4 + [1] * 4
    assert batch.rewards.tolist() == SIGNAL + SIGNAL
    assert not flat_groups(batch.rewards, batch.group).any()
    assert batch.input_ids.shape == (8, 4)  # round 2's T was 5 (q3: 4 tokens): its all-pad column dropped
    assert batch.completion_mask.sum(1).tolist() == [3] * 4 + [2] * 4
    assert batch.tensors["truncated"].tolist() == [False] * 4 + [True] * 4
    assert batch.stats == {
        "accuracy": 0.25,  # one "1" of 4 per group
        "completion_length": 2.5,
        "truncated": 0.5,
        "zero_std_groups": 0.5,  # 3 of 6 sampled
        "sample_rounds": 3.0,
        "samples_per_kept_group": 12.0,  # 24 samples, 2 kept
        "groups_short": 0.0,
    }


def test_the_source_stops_when_full_and_fills_with_flat_groups_when_the_rounds_run_out():
    rewards = {"q0": SIGNAL, "q1": FLAT, "q2": SIGNAL, "q3": FLAT}
    full = fake_source(rewards, rounds=2)
    batch = full.next_batch(POLICY)  # q3 flat, q2 signal; q1 flat, q0 signal: full after 2 rounds
    assert batch.prompts == ["q2"] * 4 + ["q0"] * 4 and batch.stats["groups_short"] == 0
    short = fake_source({"q0": FLAT, "q1": FLAT, "q2": SIGNAL, "q3": FLAT}, rounds=2)
    batch = short.next_batch(POLICY)  # only q2 has signal: the first flat group drawn (q3) fills
    assert batch.prompts == ["q3"] * 4 + ["q2"] * 4
    assert batch.stats["groups_short"] == 1 and batch.stats["zero_std_groups"] == 0.75
    one = fake_source({"q0": FLAT, "q1": FLAT}, rounds=1)
    batch = one.next_batch(POLICY)  # no signal at all: the round as drawn (plain GRPO: only the KL term)
    assert batch.prompts == ["q1"] * 4 + ["q0"] * 4 and batch.stats["groups_short"] == 2


def test_a_full_rank_draws_the_other_ranks_rounds_questions_without_sampling_them():
    rewards = {"q0": FLAT, "q1": FLAT, "q2": SIGNAL, "q3": FLAT}
    # rank 1 of 2 (its slice: the second question of each round) is full after one round; rank 0 is not
    src = fake_source(rewards, rounds=2, rank=1, world_size=2, sync=lambda short: True)
    batch = src.next_batch(POLICY)
    assert src.drawn == [["q2"]] and src.sampler.order == []  # q3 q2 | q1 q0 drawn, only q2 sampled
    assert batch.prompts == ["q2"] * 4
    assert batch.stats["sample_rounds"] == 2 and batch.stats["groups_short"] == 0
    assert batch.stats["zero_std_groups"] == 0 and batch.stats["samples_per_kept_group"] == 4


def test_dynamic_sampling_without_a_reward_is_refused_in_one_line():
    cfg = SimpleNamespace(dynamic_sampling=True, max_sample_rounds=3, prompts_per_step=2, group_size=4)
    with pytest.raises(UserError, match="source.dynamic_sampling"):
        OnlineSource(cfg, examples=[], policy=None, rollout=None, seed=0, score=None)


# --- training runs from the tiny SFT model; a 0/1 reward and groups of 2: about half the groups are flat ---

COMMON = [
    "reward.name=length_mod_3_is_0",
    "source.prompts_per_step=2",
    "source.group_size=2",
    "source.dynamic_sampling=true",
    "source.max_sample_rounds=3",
    "trainer.lr=1e-2",
]


@pytest.mark.slow
def test_a_grpo_run_with_dynamic_sampling_trains_on_groups_with_signal(sft_run, tmp_path, length_rewards):
    run = loop.train(
        compose(
            "grpo_arithmetic",
            *COMMON,
            f"model.name_or_path={sft_run}",
            "trainer.steps=2",
            f"output_dir={tmp_path / 'r'}",
        )
    )
    for row in rows(run):
        assert 1 <= row["sample_rounds"] <= 3 and 0 <= row["groups_short"] <= 2
        assert row["samples_per_kept_group"] >= 2 and 0 <= row["zero_std_groups"] <= 1
        assert row["groups_short"] > 0 or row["reward_std"] > 0  # a full batch: no flat group trained on


@pytest.mark.slow
def test_resume_with_dynamic_sampling_equals_the_uninterrupted_run(sft_run, tmp_path, length_rewards):
    common = [
        *COMMON,
        f"model.name_or_path={sft_run}",
        "trainer.steps=4",
        "trainer.save_every=2",
        "trainer.keep_checkpoints=4",
    ]
    full = loop.train(compose("grpo_arithmetic", *common, f"output_dir={tmp_path / 'full'}"))
    shutil.copytree(full, tmp_path / "cut", symlinks=True)
    for name in ("final", "step_000004"):  # as if killed after the step-2 checkpoint
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / name)
    resumed = loop.train(compose("grpo_arithmetic", *common, f"output_dir={tmp_path / 'cut'}", "resume=true"))
    assert rows(resumed) == rows(full)
    assert sum(r["sample_rounds"] for r in rows(full)) > 4  # some step needed a second round


@pytest.mark.slow
def test_a_process_reward_filters_on_its_summary_and_the_trainer_labels_the_kept_steps(sft_run, tmp_path):
    """reward=steps: groups are kept by each output's mean step reward; the kept batch (its rounds'
    per-position tensors dropped) gets its step labels from the trainer's own scoring."""
    cfg = compose(
        "grpo_process_arithmetic",
        f"model.name_or_path={sft_run}",
        f"output_dir={tmp_path / 'p'}",
        "reward.checker=calculator",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "source.dynamic_sampling=true",
    )
    for row in rows(loop.train(cfg)):
        assert row["sample_rounds"] >= 1 and row["loss"] == row["loss"]  # trained, not NaN


def test_reward_round_stats_average_values_and_sum_counts():
    from grpo_cli.trainer.dynamic import reward_round_stats

    rounds = [
        {"accuracy": 0.5, "reward_format": 1.0, "overlong_penalty": -0.2, "reward_errors": 1},
        {"accuracy": 0.0, "reward_format": 0.5, "overlong_penalty": 0.0, "reward_errors": 2},
    ]
    # format (1.0 + 0.5) / 2 = 0.75; overlong (-0.2 + 0) / 2 = -0.1; errors 1 + 2 = 3; accuracy left out
    expected = {"overlong_penalty": -0.1, "reward_errors": 3.0, "reward_format": 0.75}
    assert reward_round_stats(rounds) == pytest.approx(expected)


@pytest.mark.slow
def test_dynamic_sampling_keeps_the_engine_logprobs_and_the_reward_stats(sft_run, tmp_path):
    """The kept batch still carries rollout_logp (drift metrics, tis_cap) and the reward's own stats."""
    from conftest import compose, metrics

    from grpo_cli.trainer.loop import train

    cfg = compose(
        "paradigm_arithmetic",
        "method=dapo",
        f"model.name_or_path={sft_run}",
        f"output_dir={tmp_path / 'run'}",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "algorithm.tis_cap=2.0",
    )
    rows = metrics(train(cfg))
    for row in rows:
        assert row["engine_kl"] < 1e-6 and row["engine_ratio_max"] == pytest.approx(1.0, abs=1e-3)
        assert "overlong_penalty" in row and row["sample_rounds"] >= 1
