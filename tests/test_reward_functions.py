"""``reward=functions``: TRL-style reward functions, weighted, guarded one by one, reading dataset columns."""

from __future__ import annotations

import json
import sys
import threading

import pytest
import torch

from grpo_cli.batch import Batch
from grpo_cli.cli import main
from grpo_cli.data import load_examples
from grpo_cli.errors import UserError
from grpo_cli.rewards.registry import build_reward
from tests.conftest import TINY, compose, metrics


def _module(tmp_path, body: str, name: str = "user_rewards") -> str:
    """A TRL user's reward module written to ``tmp_path``; returns its path for a spec."""
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return str(path)


def _reward(*overrides: str):
    return build_reward(compose("grpo_arithmetic", "reward=functions", *overrides).reward)


def _batch(completions, answers=None, columns=None):
    n = len(completions)
    return Batch(
        torch.zeros(n, 2, dtype=torch.long),
        torch.ones(n, 2, dtype=torch.long),
        torch.ones(n, 2, dtype=torch.long),
        [f"q{i}" for i in range(n)],
        list(completions),
        answers or ["1"] * n,
        torch.arange(n),
        columns=columns or [],
    )


BODY = """
def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

def only_short(prompts, completions, **kwargs):
    return [1.0 if len(c) < 3 else None for c in completions]

def boom(prompts, completions, **kwargs):
    raise RuntimeError("boom")

def wrong_length(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)

def hang(prompts, completions, **kwargs):
    import sys
    sys.modules["rf_release"].wait(30)
    return [5.0] * len(completions)

def seen(prompts, completions, difficulty, answer, **kwargs):
    import sys
    sys.modules["rf_seen"].append(dict(prompts=prompts, completions=completions, difficulty=difficulty,
                                       answer=answer, **kwargs))
    return [float(d) for d in difficulty]
"""


def test_weighted_sum_with_none_counted_zero_and_per_function_means(tmp_path):
    mod = _module(tmp_path, BODY)
    reward = _reward(f"reward.functions=[{mod}:length,{mod}:only_short]", "reward.weights=[0.5,2]")
    batch = _batch(["a", "bbbb", "cc"])
    # length: 1, 4, 2; only_short: 1, None, 1
    # sums: 0.5*1 + 2*1 = 2.5; 0.5*4 + 2*0 = 2.0 (None counts 0); 0.5*2 + 2*1 = 3.0
    assert reward(batch).tolist() == [2.5, 2.0, 3.0]
    # means: length (1+4+2)/3 = 7/3; only_short over its applicable rows: (1+1)/2 = 1
    assert batch.stats["reward_length"] == pytest.approx(7 / 3)
    assert batch.stats["reward_only_short"] == 1.0
    assert batch.stats["reward_errors"] == 0 and batch.stats["reward_timeouts"] == 0


def test_weights_default_to_one_and_duplicate_names_are_told_apart(tmp_path):
    mod = _module(tmp_path, BODY)
    reward = _reward(f"reward.functions=[{mod}:length,{mod}:length]")
    batch = _batch(["ab", "abc"])
    assert reward(batch).tolist() == [4.0, 6.0]  # 1*2 + 1*2; 1*3 + 1*3
    assert batch.stats["reward_length"] == 2.5 and batch.stats["reward_length_2"] == 2.5


def test_a_function_that_raises_costs_only_its_own_term_and_is_named(tmp_path, capsys):
    mod = _module(tmp_path, BODY)
    reward = _reward(f"reward.functions=[{mod}:length,{mod}:boom]", "reward.incorrect=-1")
    batch = _batch(["a", "bbb"])
    # length 1, 3 plus boom's reward.incorrect -1 for each completion: 0, 2
    assert reward(batch).tolist() == [0.0, 2.0]
    assert batch.stats["reward_errors"] == 2 and batch.stats["reward_boom"] == -1.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"reward 'functions:{mod}:boom': RuntimeError: boom" in err[0], err


def test_a_function_returning_the_wrong_length_is_named(tmp_path, capsys):
    mod = _module(tmp_path, BODY)
    reward = _reward(f"reward.functions=[{mod}:wrong_length,accuracy]")
    batch = _batch(["#### 1", "#### 2"])  # accuracy: 1, 0; wrong_length: reward.incorrect 0 each
    assert reward(batch).tolist() == [1.0, 0.0]
    assert batch.stats["reward_errors"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"reward 'functions:{mod}:wrong_length': ValueError: returned 3 rewards for 2 completions" in err[0]
    ), err


def test_a_function_that_hangs_is_timed_out_alone(tmp_path, monkeypatch, capsys):
    release = threading.Event()
    monkeypatch.setitem(sys.modules, "rf_release", release)
    mod = _module(tmp_path, BODY)
    reward = _reward(f"reward.functions=[{mod}:hang,{mod}:length]", "reward.timeout_s=0.2")
    try:
        batch = _batch(["a", "bb"])
        assert reward(batch).tolist() == [1.0, 2.0]  # hang: reward.incorrect 0; length: 1, 2
        assert batch.stats["reward_timeouts"] == 2 and batch.stats["reward_errors"] == 0
    finally:
        release.set()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"reward 'functions:{mod}:hang': a call took longer than reward.timeout_s" in err[0]


def test_builtins_accuracy_and_format():
    reward = _reward("reward.functions=[accuracy,format]", "reward.format_pattern='^<ans>'", "reward.correct=2")
    batch = _batch(["<ans>#### 1", "<ans>#### 3", "#### 1"])
    # accuracy (reward.correct=2): 2, 0, 2; format: 1, 1, 0
    assert reward(batch).tolist() == [3.0, 1.0, 2.0]
    assert batch.stats["reward_accuracy"] == pytest.approx(4 / 3)
    assert batch.stats["reward_format"] == pytest.approx(2 / 3)


def test_the_default_format_is_the_answer_line():
    batch = _batch(["2+3=5\n#### 5", "5"])
    assert _reward("reward.functions=[format]")(batch).tolist() == [1.0, 0.0]


def test_columns_reach_the_function_as_aligned_lists(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    rows = [
        {"question": "1+1", "answer": "1+1=2\n#### 2", "difficulty": 1},
        {"question": "2*3", "answer": "2*3=6\n#### 6", "difficulty": 3, "topic": "mul"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose("grpo_arithmetic", "data=jsonl", f"data.path={data}")
    examples = load_examples(cfg.data, "train")
    assert examples[1].columns == rows[1]

    seen = []
    monkeypatch.setitem(sys.modules, "rf_seen", seen)
    mod = _module(tmp_path, BODY)
    reward = _reward(f"reward.functions=[{mod}:seen]")
    order = [1, 0, 1]
    batch = _batch(["x", "y", "z"], [examples[i].answer for i in order], [examples[i].columns for i in order])
    assert reward(batch).tolist() == [3.0, 1.0, 3.0]
    call = seen[0]
    assert call["completions"] == ["x", "y", "z"] and call["prompts"] == ["q0", "q1", "q2"]
    assert call["difficulty"] == [3, 1, 3]
    assert call["topic"] == ["mul", None, "mul"]  # a row without the field: None
    assert call["question"] == ["2*3", "1+1", "2*3"]
    assert call["answer"] == ["6", "2", "6"]  # the reference final answer, not the row's field
    one = batch.select([2])  # the guard's one-by-one retries see the same columns
    assert one.columns == [rows[1]]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["reward.functions=[accuracy,format]", "reward.weights=[1]"], "reward.weights: 1 weights for 2"),
        (["reward.functions=[format]", "reward.format_pattern='('"], "reward.format_pattern: not a valid regex"),
        (["reward.functions=[no_such_module_xyz:f]"], "reward.functions: cannot import 'no_such_module_xyz'"),
        (["reward.functions=[/no/such/file.py:f]"], "reward.functions: no such file '/no/such/file.py'"),
        (["reward.functions=[accuracyy]"], "reward.functions: unknown built-in 'accuracyy'"),
        ([], "reward.functions: reward=functions needs at least one function"),
    ],
)
def test_config_errors_are_one_line(overrides, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "recipe=grpo_arithmetic", *TINY, "reward=functions", *overrides])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_custom_still_errs_with_its_own_key():
    with pytest.raises(UserError, match="^reward.function: expected module:function"):
        build_reward(compose("grpo_arithmetic", "reward=custom", "reward.function=nocolon").reward)


@pytest.mark.slow
def test_a_trl_style_module_reading_a_column_trains_through_reward_functions(tmp_path):
    from grpo_cli.trainer.loop import train

    data = tmp_path / "train.jsonl"
    rows = [
        {"question": f"{a}+{b}", "answer": f"{a}+{b}={a + b}\n#### {a + b}", "difficulty": a % 3}
        for a in range(1, 7)
        for b in range(1, 4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "seen.jsonl"
    module = tmp_path / "trl_rewards.py"
    module.write_text(
        "import json\n"
        "def fn(prompts, completions, difficulty, **kwargs):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(json.dumps([prompts, difficulty]) + '\\n')\n"
        "    return [d + len(c) % 2 for d, c in zip(difficulty, completions)]\n"
    )
    run = train(
        compose(
            "grpo_arithmetic",
            "model.name_or_path=tiny",
            "data=jsonl",
            f"data.path={data}",
            "reward=functions",
            f"reward.functions=[{module}:fn]",
            "trainer.steps=2",
            "source.prompts_per_step=2",
            "source.group_size=2",
            f"output_dir={tmp_path / 'run'}",
        )
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2 and all(len(d) == 4 for _, d in calls)  # one call per step, 2 prompts x 2 samples
    difficulty = {r["question"] + "\n": r["difficulty"] for r in rows}  # prompt_template "{question}\n"
    assert all(d == [difficulty[p] for p in prompts] for prompts, d in calls)  # each completion's own row
    last = metrics(run)[-1]
    assert "reward_fn" in last and last["reward_errors"] == 0


def test_offline_samples_get_their_questions_columns_and_old_files_still_load():
    from grpo_cli.data.types import Example
    from grpo_cli.trainer.offline import samples_batch

    examples = [Example("a", "a\n", None, "1", {"difficulty": 1}), Example("b", "b\n", None, "2", {"difficulty": 2})]
    sample = dict(prompt_ids=[1], completion_ids=[2], completion="x", answer="2", reward=1.0)  # an old row's fields
    rows = [
        {**sample, "question": 1, "prompt": "b\n"},
        {**sample, "question": 0, "prompt": "other data\n"},  # source.samples from other data: no columns
        {**sample, "question": 7, "prompt": "b\n"},
    ]
    batch = samples_batch(rows, torch.arange(3), 0, examples)
    assert batch.columns == [{"difficulty": 2}, {}, {}]
    assert samples_batch(rows, torch.arange(3), 0).columns == [{}, {}, {}]
