"""MATH: the last ``\\boxed{}`` answer, math-verify equivalence on real answer pairs, the ``math`` loader,
``grpo eval samples=F data=math``, and the checker under the reward guard (errors counted, threads)."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from grpo_cli.batch import Batch
from grpo_cli.cli import main
from grpo_cli.config.schema import DataConfig, RewardConfig
from grpo_cli.config.store import options
from grpo_cli.data import load_examples
from grpo_cli.errors import UserError
from grpo_cli.generation import rollout_options, sample_batch
from grpo_cli.metrics import sampling_metrics
from grpo_cli.models.load import load_model_and_tokenizer
from grpo_cli.rewards import checkers
from grpo_cli.rewards.checkers import MATH, NUMERIC, answer_checker, last_boxed, math_match
from grpo_cli.rewards.registry import build_reward

# ----------------------------------------------------------------------------- the boxed answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is $\\boxed{5}$.", "5"),
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("\\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),  # escaped braces do not count
        ("First \\boxed{3}, then corrected: \\boxed{4}", "4"),  # several boxes: the last
        ("\\boxed{1} and finally \\fbox{2}", "2"),  # \fbox too
        ("\\fbox{2} then \\boxed{ x = 1 }", "x = 1"),
        ("no box at all: 42", None),
        ("\\boxed{never closed", None),
        ("\\boxed{}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# ----------------------------------------------------------------------------- equivalence

MATCH = [
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\dfrac12"),
    ("\\sqrt{12}", "2\\sqrt{3}"),
    ("(1, 2]", "(1,2]"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("10", "10\\%"),
    ("5", "5\\text{ cm}"),
    ("x=3", "3"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("-\\frac{7}{4}", "-1.75"),
]
NEAR_MISSES = [
    ("0.33", "\\frac{1}{3}"),
    ("2", "\\sqrt{2}"),
    ("(1,2)", "[1,2]"),
    ("[1,2]", "(1,2)"),
    ("-\\frac12", "\\frac12"),
    ("x=4", "3"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("2\\sqrt{2}", "2\\sqrt{3}"),
]


@pytest.mark.parametrize("pred, gold", MATCH)
def test_equivalent_forms_match(pred, gold):
    assert math_match(pred, gold)


@pytest.mark.parametrize("pred, gold", NEAR_MISSES)
def test_near_misses_do_not_match(pred, gold):
    assert not math_match(pred, gold)


def test_missing_or_runaway_answers_never_match():
    assert not math_match(None, "1")
    assert not math_match("1" * (checkers.MAX_BOXED_CHARS + 1), "1")


def test_completions_are_checked_by_their_last_box():
    assert MATH.correct("We get $x = \\boxed{\\dfrac{3}{4}}$.", "0.75")
    assert not MATH.correct("The answer is 0.75", "0.75")  # unboxed: MATH's format is the box
    assert NUMERIC.correct("The answer is 0.75", "3/4")  # GSM8K's rule unchanged


def test_checker_follows_data_unless_overridden():
    assert answer_checker(DataConfig(name="math")) is MATH
    for name in ("arithmetic", "gsm8k", "jsonl"):
        assert answer_checker(DataConfig(name=name)) is NUMERIC
    assert answer_checker(DataConfig(name="jsonl", answer_checker="math")) is MATH
    assert answer_checker(DataConfig(name="math", answer_checker="numeric")) is NUMERIC
    with pytest.raises(UserError, match="data.answer_checker"):
        answer_checker(DataConfig(name="math", answer_checker="latex"))


def test_math_verify_works_off_the_main_thread():
    """math-verify's own time limit uses signal.alarm (main thread only); the guard calls rewards in
    a thread, so the checker must work there."""
    results, errors = {}, []

    def check(i: int) -> None:
        try:
            results[i] = [math_match(p, g) for p, g in MATCH[:4] + NEAR_MISSES[:4]]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=check, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {i: [True] * 4 + [False] * 4 for i in range(2)}


# ----------------------------------------------------------------------------- the outcome reward


def _batch(completions, answers) -> Batch:
    n = len(completions)
    ids = torch.ones(n, 2, dtype=torch.long)
    return Batch(ids, ids, ids, ["q"] * n, list(completions), list(answers), torch.arange(n))


def test_outcome_reward_uses_the_math_checker_under_the_guard():
    cfg = RewardConfig(name="outcome", timeout_s=5.0)  # a limit: the reward runs in a thread
    reward = build_reward(cfg, checker=MATH)
    batch = _batch(["\\boxed{\\frac{1}{2}}", "\\boxed{0.33}", "no box"], ["0.5", "\\frac13", "1"])
    assert reward(batch).tolist() == [1.0, 0.0, 0.0]
    assert batch.stats["reward_errors"] == 0 and batch.stats["reward_timeouts"] == 0


def test_functions_accuracy_builtin_uses_the_math_checker():
    reward = build_reward(RewardConfig(name="functions", functions=["accuracy"]), checker=MATH)
    batch = _batch(["\\boxed{\\dfrac12}", "\\boxed{0.33}"], ["0.5", "\\frac13"])
    assert reward(batch).tolist() == [1.0, 0.0]


def test_a_checker_error_scores_incorrect_and_is_counted(monkeypatch):
    real = checkers.math_match

    def fragile(pred, gold):
        if pred == "boom":
            raise RuntimeError("parser failure")
        return real(pred, gold)

    checker = dataclasses.replace(MATH, match=fragile)
    reward = build_reward(RewardConfig(name="outcome", timeout_s=5.0, incorrect=-1.0), checker=checker)
    batch = _batch(["\\boxed{2}", "\\boxed{boom}", "\\boxed{3}"], ["2", "2", "2"])
    assert reward(batch).tolist() == [1.0, -1.0, -1.0]  # the error costs only its own completion
    assert batch.stats["reward_errors"] == 1


# ----------------------------------------------------------------------------- loader and eval

TRAIN = [
    {
        "problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?",
        "solution": "We have $\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$.",
        "level": "Level 1",
        "type": "Prealgebra",
    },
    {"problem": "Solve $x^2=4$, $x>0$.", "solution": "So $x=\\boxed{2}$.", "level": "Level 2", "type": "Algebra"},
]
TEST = [  # MATH-500's rows: an answer field beside the solution
    {"problem": "Simplify $\\sqrt{12}$.", "solution": "$\\sqrt{12}=\\boxed{2\\sqrt{3}}$", "answer": "2\\sqrt{3}"},
]


def _math_dir(tmp_path):
    for name, rows in (("train", TRAIN), ("test", TEST)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dataclasses.replace(options()["data"]["math"], path=str(tmp_path))


def test_math_loader_reads_boxed_answers_and_keeps_solutions_as_written(tmp_path):
    cfg = _math_dir(tmp_path)
    train = load_examples(cfg, "train")
    assert [e.answer for e in train] == ["\\frac{3}{4}", "2"]
    assert train[0].solution == TRAIN[0]["solution"] and "####" not in train[0].solution
    assert train[0].prompt == TRAIN[0]["problem"] + "\n"
    (test,) = load_examples(cfg, "test")
    assert test.answer == "2\\sqrt{3}" and test.question == TEST[0]["problem"]


def test_math_solution_without_a_box_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"problem": "p", "solution": "it is 3"}) + "\n")
    cfg = dataclasses.replace(options()["data"]["math"], path=str(tmp_path))
    with pytest.raises(UserError, match=r"train\.jsonl:1: no final answer .*\\boxed"):
        load_examples(cfg, "train")


def test_math_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\ndetails")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"cannot load hub dataset 'HuggingFaceH4/MATH-500'") as error:
        load_examples(options()["data"]["math"], "test")
    assert "\n" not in str(error.value)


def test_eval_scores_boxed_samples_with_math_verify(tmp_path):
    rows = [
        {"completion": "so $\\boxed{\\dfrac12}$", "answer": "0.5"},
        {"completion": "$x \\in \\boxed{(1,2]}$", "answer": "(1, 2]"},
        {"completion": "about \\boxed{0.33}", "answer": "\\frac{1}{3}"},
        {"completion": "I think 7", "answer": "7"},  # no box: no answer
    ]
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["eval", f"samples={f}", "data=math", f"eval.output_dir={tmp_path / 'out'}"])
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["accuracy"] == 0.5 and result["no_answer"] == 1 and result["checker"] == "math"
    scored = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["extracted"] for r in scored] == ["\\dfrac12", "(1,2]", "0.33", None]


# ----------------------------------------------------------------------------- every user of the checker


def test_sampling_metrics_vote_and_score_with_the_math_checker():
    answers = [["\\frac12", "0.5", "1/3", "\\dfrac{1}{3}", "\\frac{1}{3}"]]  # 2 halves, 3 thirds
    got = sampling_metrics(answers, ["1/2"], [2, 5], match=MATH.match)
    assert got["maj@2"] == 1.0  # \frac12 and 0.5 are one answer, not two of one vote each
    assert got["maj@5"] == 0.0  # the thirds win the vote, spelt three ways
    assert got["pass@5"] == 1.0


def test_sample_batch_accuracy_uses_the_chosen_checker():
    from conftest import compose

    cfg = compose("grpo_arithmetic", "model.name_or_path=tiny")
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    examples = load_examples(cfg.data, "train")[:2]
    options_ = rollout_options(cfg.rollout)
    always = dataclasses.replace(NUMERIC, extract=lambda text: "1", match=lambda pred, gold: True)
    batch, _ = sample_batch(model.eval(), tok, examples, group=torch.arange(2), checker=always, **options_)
    assert batch.stats["accuracy"] == 1.0
    batch, _ = sample_batch(model.eval(), tok, examples, group=torch.arange(2), checker=MATH, **options_)
    assert batch.stats["accuracy"] == 0.0  # arithmetic answers are never boxed


def test_eval_counts_checker_errors_as_incorrect(tmp_path, monkeypatch):
    def fragile(pred, gold):
        raise RuntimeError("parser failure")

    monkeypatch.setitem(checkers.CHECKERS, "math", dataclasses.replace(MATH, match=fragile))
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"completion": "\\boxed{1}", "answer": "1"}) + "\n")
    main(["eval", f"samples={f}", "data=math", f"eval.output_dir={tmp_path / 'out'}"])
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["accuracy"] == 0.0 and result["checker_errors"] == 1


def test_identical_answers_match_without_parsing(monkeypatch):
    monkeypatch.setattr(checkers, "_parse", None)  # would raise if called
    assert math_match(" \\frac{3}{4}", "\\frac{3}{4} ")
