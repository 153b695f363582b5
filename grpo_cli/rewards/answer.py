"""Final-answer extraction and comparison: the rule behind the outcome reward.

Every function here is pure, fast and total: model output is arbitrary text (a 10,000-digit number,
``1e99999``, a megabyte of ``####``), so parsing is bounded and never raises on bad input.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import List, Optional, Sequence

MAX_NUMBER_CHARS = 100
"""Longer numeric strings are not parsed (compared as strings): no model answer is that precise,
and ``int()`` of a huge literal costs time (and raises past 4300 digits)."""

MAX_EXPONENT = 100
"""Largest ``|e|`` accepted in ``1e5``-style numbers: ``Fraction('1e99999')`` builds a huge integer."""

# A number as written in text: optional sign and ``$``, digits with optional thousands commas
# (``1,234,567``), optional decimals, optional ``/denominator``. The minus is a sign only when it
# touches the digits and follows no word character or ``)``: in ``16-3=13`` and ``16 - 3`` it is the
# subtraction. Every optional piece follows a greedy run that never has to give characters back, so
# matching is linear in the text length (no catastrophic backtracking on ``1,111,111,...``).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\$\s?)?(?:\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|\.\d+)")
# Final-answer markers, weakest last: GSM8K's ``#### 72``; "A: 72" at the start of a line (OpenAI's
# model solutions); "the answer is 72" / "Answer: 72" anywhere.
_HASH_MARKER = re.compile(r"####")
_SOFT_MARKER = re.compile(r"(?:^|\n)[ \t]*A[ \t]*:|\banswer\b[ \t]*(?:is\b[ \t]*:?|:)", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRACTION = re.compile(r"([-+]?\d+)/(\d+)")


def _clean_number(raw: str) -> str:
    """``"-$1,234.50"`` -> ``"-1234.50"``: drop the currency sign, thousands commas and spaces."""
    return raw.replace("$", "").replace(",", "").replace(" ", "")


def _first_number(text: str) -> Optional[str]:
    match = _NUMBER.search(text)
    return _clean_number(match.group()) if match else None


def _last_number(text: str) -> Optional[str]:
    matches = list(_NUMBER.finditer(text))
    return _clean_number(matches[-1].group()) if matches else None


def _after_marker(text: str, marker: re.Pattern) -> Optional[str]:
    """What follows the last ``marker``: its first number, else the rest of its line, else None."""
    matches = list(marker.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    rest = text[last.end() :]
    line = rest.split("\n", 1)[0]
    number = _first_number(line)
    if number is not None:
        return number
    # Non-numeric answers ("#### yes") are kept as text and compared as strings.
    stripped = line.strip().rstrip(".").strip()
    return stripped or None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a solution, as a normalised string, or None when there is none.

    Priority, strongest marker first: the last ``#### x`` line (GSM8K's format, and the one our SFT
    targets end with); else the last ``A: x`` line or "answer is x" / "Answer: x"; else the last
    number of the text (models often state the result without a marker; the GSM8K model solutions
    agree with their correctness labels on >99% this way). After a marker, the first number on the
    marker's line wins, so trailing units or words ("#### 5 apples.") are ignored.

    Numbers are returned without ``$``, thousands commas or spaces: ``"#### $1,234"`` -> ``"1234"``.

    >>> extract_answer("48/2 = <<48/2=24>>24\\n#### 72")
    '72'
    >>> extract_answer("So she makes $18.\\nA: 18")
    '18'
    >>> extract_answer("The answer is -3.5 degrees.")
    '-3.5'
    >>> extract_answer("no idea") is None
    True
    """
    for marker in (_HASH_MARKER, _SOFT_MARKER):
        found = _after_marker(text, marker)
        if found is not None:
            return found
    return _last_number(text)


def parse_number(s: str) -> Optional[Fraction]:
    """``s`` as an exact number, or None: ``"1,234"``, ``"$5"``, ``"-0.5"``, ``"3/4"``, ``"72."``, ``"1e3"``.

    Bounded: strings over ``MAX_NUMBER_CHARS`` or exponents over ``MAX_EXPONENT`` give None (the
    caller compares them as strings), so pathological input finishes in microseconds.
    """
    if s is None or len(s) > 4 * MAX_NUMBER_CHARS:
        return None
    s = _clean_number(s.strip()).rstrip(".").rstrip("%")
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    fraction = _FRACTION.fullmatch(s)
    if fraction:
        numerator, denominator = int(fraction.group(1)), int(fraction.group(2))
        return Fraction(numerator, denominator) if denominator else None
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    mantissa, _, exponent = s.lower().partition("e")
    if exponent and abs(int(exponent)) > MAX_EXPONENT:
        return None
    return Fraction(s)


def _normalise_text(s: str) -> str:
    return " ".join(_clean_number(s).strip().rstrip(".").lower().split())


def answers_match(pred: Optional[str], gold: str) -> bool:
    """Whether a predicted answer equals the reference: exactly as numbers when both parse
    (``"72.0" == "72"``, ``"1,234" == "1234"``, ``"0.75" == "3/4"``), else as normalised strings
    (case, spaces, ``$`` and commas ignored). A missing prediction (None) never matches.
    """
    if pred is None or gold is None:
        return False
    pred_number, gold_number = parse_number(pred), parse_number(gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    return _normalise_text(pred) == _normalise_text(gold)


def outcome_rewards(
    completions: Sequence[str], answers: Sequence[str], *, correct: float = 1.0, incorrect: float = 0.0
) -> List[float]:
    """Outcome supervision: one reward per completion, ``correct`` when its extracted final answer
    matches the reference answer, ``incorrect`` otherwise (a missing answer is incorrect).

    >>> outcome_rewards(["2+3=5\\n#### 5", "2+3=6\\n#### 6", "I don't know"], ["5", "5", "5"])
    [1.0, 0.0, 0.0]
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return [
        correct if answers_match(extract_answer(completion), answer) else incorrect
        for completion, answer in zip(completions, answers)
    ]
