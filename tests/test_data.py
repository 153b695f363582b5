"""Data: the embedded arithmetic task, the JSONL/Parquet/GSM8K loaders and ``load_examples``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grpo_cli.config.schema import ArithmeticConfig, DataConfig
from grpo_cli.data import load_examples
from grpo_cli.data.arithmetic import generate, python_expression, split_of, tool_solution
from grpo_cli.errors import UserError
from grpo_cli.rewards import check_arithmetic_steps
from grpo_cli.tools.base import output_spans

STEP = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")


def gsm8k_dir() -> Path:
    """The shared GSM8K copy: $GRPO_GSM8K_DIR, else ``<repo>/../shared/data/gsm8k``."""
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("GRPO_GSM8K_DIR") or repo.parent / "shared" / "data" / "gsm8k")


def left_to_right(question: str) -> int:
    """Reference evaluation of a chain, independent of the generator's code."""
    tokens = re.findall(r"\d+|[+\-*]", question)
    value = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        value = {"+": value + int(number), "-": value - int(number), "*": value * int(number)}[op]
    return value


# ----------------------------------------------------------------------------- arithmetic


def test_arithmetic_is_deterministic_and_seeded():
    cfg = ArithmeticConfig(num_train=300, num_test=50)
    assert generate(cfg, "train") == generate(cfg, "train")
    assert generate(cfg, "test") == generate(cfg, "test")
    assert generate(cfg, "train", limit=10) == generate(cfg, "train")[:10]  # max_examples: a prefix
    other = generate(dataclasses.replace(cfg, seed=cfg.seed + 1), "train")
    assert [e.question for e in other] != [e.question for e in generate(cfg, "train")]


def test_arithmetic_splits_are_disjoint_and_unique():
    cfg = ArithmeticConfig(num_train=5000, num_test=500)
    train = {e.question for e in generate(cfg, "train")}
    test = [e.question for e in generate(cfg, "test")]
    assert len(train) == 5000 and len(set(test)) == 500
    assert not train & set(test)
    # The split is a property of the question, so other seeds' training sets miss this test set too.
    other_train = {e.question for e in generate(dataclasses.replace(cfg, seed=7), "train")}
    assert not other_train & set(test)
    assert all(split_of(q) == "test" for q in test)


def test_arithmetic_answers_and_steps_are_right():
    cfg = ArithmeticConfig(num_train=2000, ops="+-*", max_ops=4, direct_fraction=0.0)
    for example in generate(cfg, "train"):
        assert example.answer == str(left_to_right(example.question))
        assert example.solution.endswith(f"\n#### {example.answer}")
        assert all(check_arithmetic_steps(example.question, example.solution))
        lines = example.solution.split("\n")[:-1]
        for line in lines:
            a, op, b, c = STEP.fullmatch(line).groups()
            assert int(c) >= 0  # every intermediate result is non-negative
            assert op != "*" or 1 <= int(b) <= 9  # single-digit multipliers


def test_arithmetic_difficulty_knobs():
    def steps_and_operands(**overrides):
        cfg = ArithmeticConfig(num_train=1000, direct_fraction=0.0, **overrides)
        lines = [line for e in generate(cfg, "train") for line in e.solution.split("\n")[:-1]]
        counts = [len(e.solution.split("\n")) - 1 for e in generate(cfg, "train")]
        operands = [int(STEP.fullmatch(line).group(3)) for line in lines]
        return counts, operands

    easy_counts, easy_operands = steps_and_operands(min_ops=1, max_ops=1, digits=2)
    hard_counts, hard_operands = steps_and_operands(min_ops=4, max_ops=6, digits=4)
    assert set(easy_counts) == {1} and set(hard_counts) == {4, 5, 6}
    assert max(easy_operands) < 100 and max(hard_operands) >= 1000
    _, multiply_operands = steps_and_operands(ops="*", digits=3)
    assert max(multiply_operands) <= 9


def test_arithmetic_generates_the_requested_count():
    assert len(generate(ArithmeticConfig(), "train")) == 20000


def test_direct_fraction_makes_terse_training_solutions_only():
    # About half of the training solutions become the final line alone; the questions do not
    # change, and test solutions stay worked step by step.
    full = generate(ArithmeticConfig(num_train=2000, direct_fraction=0.0), "train")
    mixed = generate(ArithmeticConfig(num_train=2000, direct_fraction=0.5), "train")
    assert [e.question for e in full] == [e.question for e in mixed]
    direct = [e for e in mixed if "\n" not in e.solution]
    assert 0.4 < len(direct) / len(mixed) < 0.6
    assert all(e.solution == f"#### {e.answer}" for e in direct)
    test = generate(ArithmeticConfig(num_test=200, direct_fraction=1.0), "test")
    assert all("\n" in e.solution for e in test)


def test_default_problems_are_unchanged():
    # The first 20 default problems of each split, hashed with the code before tool_fraction and
    # mul_digits existed (commit 9c32e52): the default task must stay bit-identical.
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for e in generate(ArithmeticConfig(), split, limit=20):
            row = [e.question, e.prompt, e.solution, e.answer, e.columns]
            digest.update(json.dumps(row, sort_keys=True).encode())
    assert digest.hexdigest() == "f05d16072a125e1712690237f681703adfa886815a1fb3d0a4eb02113b12703a"


@pytest.mark.parametrize(
    "question, expression",
    [
        ("123*456*78", "123*456*78"),
        ("23+45*17", "(23+45)*17"),  # (23+45)*17 = 1156, not 23+765
        ("2*3+4-5", "2*3+4-5"),
        ("9-4*2*3+1*5", "((9-4)*2*3+1)*5"),
        ("7", "7"),
    ],
)
def test_python_expression_keeps_left_to_right_order(question, expression):
    assert python_expression(question) == expression
    assert eval(expression) == left_to_right(question)


def test_tool_solution_is_what_a_rollout_writes():
    assert tool_solution("123*456*78", 4363344) == (
        "```python\nprint(123*456*78)\n```\n```output\n4363344\n```\n#### 4363344"
    )
    solution = tool_solution("23+45*17", 1156)
    ((start, end),) = output_spans(solution)
    assert solution[start:end] == "\n```output\n1156\n```\n"  # the environment's part, not trained


TOOL_TASK = dict(digits=3, mul_digits=2, ops="+*", min_ops=2, max_ops=3, num_train=2000, num_test=200)


def test_mul_digits_gives_multi_digit_multipliers_and_right_answers():
    cfg = ArithmeticConfig(direct_fraction=0.0, **TOOL_TASK)
    examples = generate(cfg, "train")
    assert generate(cfg, "train") == examples  # deterministic
    multipliers = [int(m) for e in examples for m in re.findall(r"\*(\d+)", e.question)]
    assert max(multipliers) == 99 and min(multipliers) >= 1 and sum(m >= 10 for m in multipliers) > len(multipliers) / 2
    for e in examples:
        assert e.answer == str(left_to_right(e.question)) == str(eval(python_expression(e.question)))
        assert all(check_arithmetic_steps(e.question, e.solution))
    test = {e.question for e in generate(cfg, "test")}
    assert len(test) == 200 and not test & {e.question for e in examples}


def test_tool_fraction_rewrites_training_solutions_only():
    worked = generate(ArithmeticConfig(direct_fraction=0.5, **TOOL_TASK), "train")
    mixed = generate(ArithmeticConfig(direct_fraction=0.5, tool_fraction=0.8, **TOOL_TASK), "train")
    assert [e.question for e in mixed] == [e.question for e in worked]
    assert [e.answer for e in mixed] == [e.answer for e in worked]
    tool = [m.solution == tool_solution(m.question, int(m.answer)) for m in mixed]
    assert 0.75 < sum(tool) / len(tool) < 0.85
    # The other solutions are the ones without the tool: the worked/direct choice is not re-drawn.
    assert all(m.solution == w.solution for m, w, t in zip(mixed, worked, tool) if not t)
    assert any("\n" not in m.solution for m in mixed)  # direct_fraction still applies to the rest
    test = generate(ArithmeticConfig(tool_fraction=1.0, **TOOL_TASK), "test")
    assert test == generate(ArithmeticConfig(**TOOL_TASK), "test")  # the reference stays worked


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"ops": "+/"}, "data.arithmetic.ops"),
        ({"ops": ""}, "data.arithmetic.ops"),
        ({"digits": 0}, "data.arithmetic.digits"),
        ({"min_ops": 3, "max_ops": 2}, "data.arithmetic.min_ops"),
        ({"num_train": -1}, "data.arithmetic.num_train"),
        # 100 questions exist in all: 500 distinct ones cannot be drawn.
        ({"digits": 1, "ops": "+", "min_ops": 1, "max_ops": 1, "num_train": 500}, "data.arithmetic: only"),
        ({"direct_fraction": 1.5}, "data.arithmetic.direct_fraction"),
        ({"tool_fraction": -0.1}, "data.arithmetic.tool_fraction"),
        ({"mul_digits": 0}, "data.arithmetic.mul_digits"),
    ],
)
def test_arithmetic_bad_settings(overrides, key):
    with pytest.raises(UserError, match=re.escape(key)):
        generate(ArithmeticConfig(**overrides), "train")


# ----------------------------------------------------------------------------- load_examples


def test_load_examples_formats_prompts_and_limits():
    cfg = DataConfig(prompt_template="Q: {question} =\n", max_examples=7)
    examples = load_examples(cfg, "train")
    assert len(examples) == 7
    assert all(e.prompt == f"Q: {e.question} =\n" for e in examples)
    default = load_examples(DataConfig(max_examples=3), "test")
    assert [e.prompt for e in default] == [e.question + "\n" for e in default]


def test_load_examples_accepts_dictconfig():
    cfg = OmegaConf.structured(DataConfig(max_examples=5))
    assert load_examples(cfg, "test") == load_examples(DataConfig(max_examples=5), "test")


@pytest.mark.parametrize(
    "cfg, split, message",
    [
        (DataConfig(name="gsm8"), "train", r"data\.name: unknown dataset 'gsm8'; did you mean: gsm8k\?"),
        (DataConfig(name="zzz"), "train", r"valid: arithmetic, gsm8k, jsonl"),
        (DataConfig(), "validation", r"unknown split 'validation'"),
        (DataConfig(prompt_template="{question} {answer}"), "train", r"data\.prompt_template"),
        (DataConfig(prompt_template="no placeholder"), "train", r"lacks \{question\}"),
        (DataConfig(max_examples=0), "train", r"data\.max_examples"),
        (DataConfig(arithmetic=ArithmeticConfig(num_test=0)), "test", r"test split of arithmetic has no"),
    ],
)
def test_load_examples_errors(cfg, split, message):
    with pytest.raises(UserError, match=message):
        load_examples(cfg, split)


# ----------------------------------------------------------------------------- jsonl / parquet


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def jsonl_cfg(path, **overrides) -> DataConfig:
    return DataConfig(name="jsonl", path=str(path), **overrides)


def test_jsonl_with_configurable_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"q": "What is 2+2?", "sol": "2+2=4", "final": 4},
            {"q": "What is 3*3?", "sol": "3*3=9\n#### 9", "final": "9"},
        ],
    )
    cfg = jsonl_cfg(path, question_field="q", solution_field="sol", answer_field="final")
    first, second = load_examples(cfg, "train")
    assert (first.question, first.prompt, first.answer) == ("What is 2+2?", "What is 2+2?\n", "4")
    assert first.solution == "2+2=4\n#### 4"  # the final-answer line SFT teaches is added
    assert second.solution == "3*3=9\n#### 9"  # and not doubled
    # A single file serves whichever split is asked for.
    assert load_examples(cfg, "test") == [first, second]


def test_jsonl_answer_extracted_from_solution_or_absent_solution(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "x?", "answer": "So 5.\nA: 1,250"}])
    (example,) = load_examples(jsonl_cfg(path), "train")
    assert example.answer == "1250" and example.solution == "So 5.\nA: 1,250\n#### 1250"
    only_answers = load_examples(jsonl_cfg(path, solution_field=None, answer_field="answer"), "train")
    assert only_answers[0].solution is None


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "a", "answer": "#### 1"}, "", {"answer": "#### 2"}])
    with pytest.raises(UserError, match=re.escape(f"{path}:3: missing field 'question' (data.question_field")):
        load_examples(jsonl_cfg(path), "train")
    with pytest.raises(UserError, match=re.escape(f"{path}:1: missing field 'sol' (data.solution_field")):
        load_examples(jsonl_cfg(path, solution_field="sol"), "train")


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "a", "answer": "#### 1"}, '{"question": "b",'])
    with pytest.raises(UserError, match=re.escape(f"{path}:2: malformed JSON")):
        load_examples(jsonl_cfg(path), "train")
    write_jsonl(path, ["[1, 2]"])
    with pytest.raises(UserError, match=re.escape(f"{path}:1: expected a JSON object")):
        load_examples(jsonl_cfg(path), "train")


def test_jsonl_row_without_final_answer(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "a", "answer": "no number"}])
    with pytest.raises(UserError, match=re.escape(f"{path}:1: no final answer in field 'answer'")):
        load_examples(jsonl_cfg(path), "train")


def test_jsonl_empty_dataset(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UserError, match="has no examples"):
        load_examples(jsonl_cfg(path), "train")


def test_jsonl_max_examples_stops_reading(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "#### 1"}, "not json"])
    assert len(load_examples(jsonl_cfg(path, max_examples=1), "train")) == 1


def test_parquet_file_and_split_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "answer": f"step\n#### {i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    write_jsonl(tmp_path / "test.jsonl", rows[:1])
    by_file = load_examples(jsonl_cfg(tmp_path / "train.parquet"), "train")
    assert [(e.question, e.answer) for e in by_file] == [(f"q{i}", str(i)) for i in range(4)]
    assert load_examples(jsonl_cfg(tmp_path), "train") == by_file
    assert [e.question for e in load_examples(jsonl_cfg(tmp_path), "test")] == ["q0"]
    # Hub-style shards, read in order; subdirectories (other configs) are not searched.
    shards = tmp_path / "shards"
    (shards / "other").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[2:]), shards / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), shards / "train-00000-of-00002.parquet")
    write_jsonl(shards / "other" / "train.jsonl", [{"question": "other", "answer": "#### 0"}])
    assert load_examples(jsonl_cfg(shards), "train") == by_file
    with pytest.raises(UserError, match=re.escape("train.parquet: row 1: missing field 'prompt'")):
        load_examples(jsonl_cfg(tmp_path / "train.parquet", question_field="prompt"), "train")


def test_directory_without_split_and_missing_path(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "#### 1"}])
    with pytest.raises(UserError, match=r"no validation\.jsonl or validation\.parquet in .*found: train\.jsonl"):
        load_examples(jsonl_cfg(tmp_path, test_split="validation"), "test")
    with pytest.raises(UserError, match="no such file or directory"):
        load_examples(jsonl_cfg(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(UserError, match=r"data\.path: required"):
        load_examples(DataConfig(name="jsonl"), "train")


def test_hub_failure_is_a_user_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\ndetails")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"cannot load hub dataset 'openai/gsm8k' \(config main, split 'train'\)"):
        load_examples(DataConfig(name="gsm8k"), "train")


# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_local_copy():
    directory = gsm8k_dir()
    if not (directory / "train.jsonl").is_file():
        pytest.skip(f"{directory} not found (set GRPO_GSM8K_DIR)")
    cfg = DataConfig(name="gsm8k", path=str(directory))
    train, test = load_examples(cfg, "train"), load_examples(cfg, "test")
    assert (len(train), len(test)) == (7473, 1319)
    first = train[0]
    assert first.question.startswith("Natalia sold clips") and first.prompt == first.question + "\n"
    assert "<<48/2=24>>" in first.solution and first.answer == "72"
    for example in train + test:
        final = example.solution.rsplit("\n", 1)[-1]
        assert final.startswith("#### ") and final[5:].replace(",", "") == example.answer
    assert {e.question for e in train}.isdisjoint(e.question for e in test)
    assert (
        len(load_examples(DataConfig(name="gsm8k", path=str(directory / "test.jsonl"), max_examples=10), "train")) == 10
    )
