"""Rule rewards: final-answer extraction and comparison, step segmentation and step checkers."""

from __future__ import annotations

import doctest
import json
import os
import time
from fractions import Fraction
from pathlib import Path

import pytest

import grpo_cli.rewards.answer as answer_module
import grpo_cli.rewards.steps as steps_module
from grpo_cli.rewards import (
    answers_match,
    check_arithmetic_steps,
    check_calculator_annotations,
    extract_answer,
    outcome_rewards,
    parse_number,
    split_steps,
    step_end_token_indices,
)


def gsm8k_dir() -> Path:
    """The shared GSM8K copy: $GRPO_GSM8K_DIR, else ``<repo>/../shared/data/gsm8k``."""
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("GRPO_GSM8K_DIR") or repo.parent / "shared" / "data" / "gsm8k")


@pytest.mark.parametrize("module", [answer_module, steps_module])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### $1,234.50", "1234.50"),
        ("#### -7", "-7"),
        ("#### 5 apples.", "5"),
        ("#### 3/4", "3/4"),
        ("#### .5", ".5"),
        ("#### yes", "yes"),
        ("A: 72 is wrong\n#### 18", "18"),  # #### beats A:
        ("#### 3\n#### 4", "4"),  # the last marker wins
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\nA: 18", "18"),
        ("A: -26", "-26"),
        ("A: 0.25 dollars", "0.25"),
        ("The answer is 26.", "26"),
        ("So the final answer is: $1,000 per month", "1000"),
        ("Answer: 12 cm", "12"),
        ("First 3 + 4 = 7, the answer is 7.\nThen 7 + 1 = 8", "7"),  # marker beats the last number
        ("To answer, compute 5+3=8", "8"),  # "answer" alone is no marker: the last number wins
        ("16 - 3 - 4 = 9 eggs", "9"),
        ("The temperature fell to -4 degrees", "-4"),
        ("5 - 3", "3"),  # a spaced minus is subtraction, not a sign
        ("It costs $3.50 in total.", "3.50"),
        ("She has 1,234,567 coins", "1234567"),
        ("The answer is:\n42", "42"),  # marker without a number on its line: the last number
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


PATHOLOGICAL = [
    "1e99999",
    "#### 1e99999",
    "9" * 10_000,
    "#### " + "9" * 10_000,
    "111," * 25_000 + "1111",  # thousands groups that fail at the very end
    "1," * 50_000,
    "-" * 100_000,
    "$" * 100_000,
    "1/" * 50_000,
    "####" * 25_000,
    "A:" * 50_000,
    "\nA: " * 25_000,
    "the answer is " * 10_000,
    "1." * 50_000,
]


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_inputs_finish_fast(text):
    start = time.perf_counter()
    extracted = extract_answer(text)
    parse_number(text)
    answers_match(extracted, "5")
    outcome_rewards([text], ["5"])
    # A guard against catastrophic backtracking, not a speed check: linear work on 100 kB takes
    # ~0.04 s here, quadratic work minutes; 5 s leaves room for a loaded CI machine (0.9 s was seen).
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("72", Fraction(72)),
        ("72.0", Fraction(72)),
        ("72.", Fraction(72)),
        ("1,234", Fraction(1234)),
        ("$5", Fraction(5)),
        ("-0.5", Fraction(-1, 2)),
        ("3/4", Fraction(3, 4)),
        ("1e3", Fraction(1000)),
        ("50%", Fraction(50)),
        ("1/0", None),
        ("1e99999", None),
        ("9" * 10_000, None),
        ("abc", None),
        ("1.2.3", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    start = time.perf_counter()
    assert parse_number(text) == expected
    assert time.perf_counter() - start < 0.05


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("72.0", "72", True),
        ("1,234", "1234", True),
        ("$18", "18", True),
        ("0.75", "3/4", True),
        ("-3", "3", False),
        ("72.5", "72", False),
        ("0.30000000000000004", "0.3", False),  # exact, as GSM8K's labels count it
        ("Yes", "yes", True),  # string fallback
        ("yes", "no", False),
        (None, "72", False),
        ("9" * 10_000, "9" * 10_000, True),  # too long to parse: compared as strings
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_outcome_rewards():
    completions = ["1+2=3\n#### 3", "1+2=4\n#### 4", "", "A: 3.0"]
    assert outcome_rewards(completions, ["3", "3", "3", "3"]) == [1.0, 0.0, 0.0, 1.0]
    assert outcome_rewards(completions, ["3"] * 4, correct=2.0, incorrect=-1.0) == [2.0, -1.0, -1.0, 2.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        outcome_rewards(["a", "b"], ["1"])


def test_gsm8k_labelled_solutions_agree_with_extraction():
    """Every model solution's correctness, judged by extraction + comparison, vs OpenAI's label."""
    path = gsm8k_dir() / "example_model_solutions.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found (set GRPO_GSM8K_DIR)")
    agree = total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        gold = extract_answer(row["ground_truth"])
        assert gold is not None
        for model in (value for value in row.values() if isinstance(value, dict)):
            total += 1
            agree += answers_match(extract_answer(model["solution"]), gold) == model["is_correct"]
    rate = agree / total
    print(f"GSM8K label agreement: {agree}/{total} = {rate:.4f}")
    assert total > 5000 and rate >= 0.99


# ----------------------------------------------------------------------------- split_steps


def test_split_steps():
    assert split_steps("") == []
    assert split_steps("\n \n") == []
    text = "a=1\n  b=2  \n\nc=3"  # text after the last delimiter is a step; spans are trimmed
    spans = split_steps(text)
    assert [text[s:e] for s, e in spans] == ["a=1", "b=2", "c=3"]
    assert spans == [(0, 3), (6, 9), (13, 16)]
    assert split_steps("one. two. ", delimiter=". ") == [(0, 3), (5, 8)]
    with pytest.raises(ValueError):
        split_steps("x", delimiter="")


# ----------------------------------------------------------------------------- arithmetic steps


def test_arithmetic_steps_all_correct():
    assert check_arithmetic_steps("23+45-17", "23+45=68\n68-17=51\n#### 51") == [True, True, True]
    # Left to right, not precedence; spaces and blank lines are tolerated.
    assert check_arithmetic_steps("2+3*4", "2 + 3 = 5\n\n5*4 = 20\n####20\n") == [True, True, True]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("23+45=67\n67-17=50\n#### 50", [False, True, False]),  # slip charged to its own step only
        ("23+45=68\n60-17=43\n#### 43", [True, False, False]),  # chain break: 60 is not 68
        ("23+45=68\n68+17=85\n#### 85", [True, False, False]),  # wrong operator
        ("23-17=6\n6+45=51\n#### 51", [False, False, True]),  # operations out of order
        ("45+23=68\n68-17=51\n#### 51", [False, True, True]),  # operands swapped
        ("23+45=68\n68-17=51\n#### 51\n51+0=51", [True, True, True, False]),  # beyond the question
        ("23+45=68\nso 68-17=51\n#### 51", [True, False, True]),  # unparsable line
        ("23+45=68\nthinking...\n51-0=51", [True, False, False]),  # garbage, then not the 2nd op
        ("23+45=68\n68-17=51\n#### 5", [True, True, False]),  # text after the last newline
        ("#### 51", [True]),  # the answer alone is right, no steps to check
        ("", []),  # no step at all
        ("I don't know", [False]),
        ("23+45=" + "9" * 5000, [False]),  # huge numbers are unparsable, not slow
    ],
)
def test_arithmetic_steps_errors(completion, expected):
    assert check_arithmetic_steps("23+45-17", completion) == expected


def test_arithmetic_steps_rejects_non_chain_question():
    with pytest.raises(ValueError):
        check_arithmetic_steps("What is 2+2?", "2+2=4")


# ----------------------------------------------------------------------------- calculator annotations


def test_calculator_annotations():
    completion = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "She sold 48+24 = <<48+24=73>>73 in all.\n"  # wrong
        "Each costs $3, so she earns nothing extra.\n"  # no annotation: nothing to check
        "Per minute: <<12/60=0.2>>0.2, total <<0.2*50=10>>10, and <<10/3=3.3333333>>\n"
        "Rounded: <<10/3=3.33>>3.33\n"  # 1e-3 off: beyond 1e-6 relative
        "Then <<(2+3)*-2**2=-20>> and <<0.1+0.2-0.3=0>> and <<560//10=56>>\n"
        "#### 72"
    )
    assert check_calculator_annotations(completion) == [True, False, True, True, False, True, True]
    assert check_calculator_annotations("") == []


@pytest.mark.parametrize(
    "annotation",
    [
        "__import__('os').system('x')=0",
        "open('/etc/passwd').read()=0",
        "(lambda: 1)()=1",
        "[1][0]=1",
        "x=1",
        "1 if 1 else 2=1",
        "'a'*3=3",
        "9**9**9=1",  # bounded power: rejected fast, not computed
        "10**400=1",
        "1/0=0",
        "(-8)**(1/3)=-2",  # complex in Python: rejected
        "(" * 150 + "1" + ")" * 150 + "=1",  # over the length cap
        "2*3",  # no value
        "True+1=2",
        "=",
    ],
)
def test_calculator_annotations_reject_non_arithmetic(annotation, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args) or 0)
    start = time.perf_counter()
    assert check_calculator_annotations(f"step <<{annotation}>> ok") == [False]
    assert calls == [] and time.perf_counter() - start < 0.1


def test_gsm8k_reference_annotations_check_correct():
    path = gsm8k_dir() / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found (set GRPO_GSM8K_DIR)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    verdicts = [v for row in rows for v in check_calculator_annotations(row["answer"])]
    assert len(verdicts) > 5000 and all(verdicts)


def test_gsm8k_train_annotations_hold_and_corrupted_ones_are_caught():
    """The train file's reference solutions: their annotations hold (measured: 23,716 of 23,716), and
    the same annotations with a digit appended to the claimed value (``<<48/2=241>>``) do not."""
    path = gsm8k_dir() / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found (set GRPO_GSM8K_DIR)")
    solutions = [json.loads(line)["answer"] for line in path.read_text(encoding="utf-8").splitlines()]
    annotations = [a for s in solutions for a in steps_module._ANNOTATION.findall(s)]
    held = sum(map(steps_module.annotation_is_correct, annotations)) / len(annotations)
    all_steps = sum(all(check_calculator_annotations(s)) for s in solutions) / len(solutions)
    corrupted = [f"{a}1" for a in annotations]
    caught = sum(not steps_module.annotation_is_correct(a) for a in corrupted) / len(corrupted)
    print(
        f"GSM8K train: {len(annotations)} annotations, {held:.4f} hold; solutions all correct {all_steps:.4f}; "
        f"corrupted caught {caught:.4f}"
    )
    assert len(annotations) > 20000 and held >= 0.99 and all_steps >= 0.99 and caught >= 0.99


# ----------------------------------------------------------------------------- steps -> tokens


def test_step_end_token_indices():
    completion = "12+3=15\n15*2=30\n#### 30"
    spans = split_steps(completion)
    # Tokens: "12" "+3" "=15" "\n15" "*2=" "30" "\n####" " 30" EOS(0, 0)
    offsets = [(0, 2), (2, 4), (4, 7), (7, 10), (10, 13), (13, 15), (15, 20), (20, 23), (0, 0)]
    assert step_end_token_indices(spans, offsets) == [2, 5, 7]
    # A cut completion: the last step ends beyond the generated tokens -> the last token.
    assert step_end_token_indices(spans, offsets[:7]) == [2, 5, 6]
    # A step ending in a gap the offsets do not cover (a tokenizer that drops spaces from offsets)
    # goes to the token before the gap.
    assert step_end_token_indices([(0, 4)], [(0, 3), (5, 8)]) == [0]
    assert step_end_token_indices([], offsets) == []
    with pytest.raises(ValueError):
        step_end_token_indices(spans, [])
