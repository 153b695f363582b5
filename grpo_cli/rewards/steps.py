"""Reasoning steps for process supervision: segmentation, rule step checkers, step -> token mapping.

Process supervision rewards each step at its last token (DeepSeekMath, section 4.1.3). A step is one
line by default. The checkers here are rules, not learned models: ``check_arithmetic_steps`` knows the
embedded arithmetic task exactly; ``check_calculator_annotations`` verifies GSM8K's ``<<48/2=24>>``
annotations with a safe evaluator (model output is never handed to ``eval``).
"""

from __future__ import annotations

import ast
import bisect
import math
import operator
import os
import re
from typing import List, Optional, Sequence, Tuple

from grpo_cli.rewards.answer import answers_match

Span = Tuple[int, int]


def split_steps(text: str, delimiter: str = "\n") -> List[Span]:
    """Character spans ``(start, end)`` of the non-blank steps of ``text``, in order.

    Steps are the pieces between delimiters; text after the last delimiter is a step too. Each span
    is trimmed of surrounding whitespace, so ``text[end - 1]`` is the step's last visible character
    (the one whose token receives the step's reward). Blank pieces are not steps.

    >>> split_steps("1+2=3\\n\\n3+4=7\\n#### 7")
    [(0, 5), (7, 12), (13, 19)]
    """
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty string")
    spans = []
    start = 0
    while start <= len(text):
        end = text.find(delimiter, start)
        if end == -1:
            end = len(text)
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            left = start + (len(piece) - len(piece.lstrip()))
            spans.append((left, left + len(stripped)))
        start = end + len(delimiter)
    return spans


# ----------------------------------------------------------------------------- arithmetic task

_QUESTION_TERM = re.compile(r"([+\-*])(\d+)")
# Numbers are capped at 100 digits: a model can emit a 10,000-digit "number", and int() of it is slow
# (and raises past 4300 digits); the task (18 digits, 50 operations at most) stays far below.
_ARITHMETIC_STEP = re.compile(r"\s*(-?\d{1,100})\s*([+\-*])\s*(-?\d{1,100})\s*=\s*(-?\d{1,100})\s*")
_FINAL_STEP = re.compile(r"\s*####\s*(.*?)\s*")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def parse_arithmetic_question(question: str) -> Tuple[int, List[Tuple[str, int]]]:
    """``"23+45-17"`` -> ``(23, [("+", 45), ("-", 17)])``; ValueError if it is not such a chain."""
    compact = "".join(question.split())
    head = re.match(r"\d+", compact)
    if head is None or not _QUESTION_TERM.sub("", compact[head.end() :]) == "":
        raise ValueError(f"not an arithmetic chain question: {question!r}")
    terms = [(op, int(number)) for op, number in _QUESTION_TERM.findall(compact[head.end() :])]
    if not terms:
        raise ValueError(f"not an arithmetic chain question (no operation): {question!r}")
    return int(head.group()), terms


def check_arithmetic_steps(question: str, completion: str, *, delimiter: str = "\n") -> List[bool]:
    """One verdict per step (line; a piece between ``delimiter``s) of ``completion`` for an
    arithmetic-chain ``question``.

    The k-th non-final line must read ``a op b=c`` where ``op b`` is the question's k-th operation,
    ``a`` continues the chain (the question's first operand for the first line, afterwards the
    result *written* on the previous line, so one slip is charged to its own step and not to every
    later one), and ``c == a op b``. A ``#### x`` line is correct when x is the true final answer.
    Unparsable lines, and lines beyond the question's operations, are incorrect.

    >>> check_arithmetic_steps("2+3*4", "2+3=5\\n5*4=21\\n#### 20")
    [True, False, True]
    """
    first, terms = parse_arithmetic_question(question)
    truth = [first]
    for op, operand in terms:
        truth.append(_APPLY[op](truth[-1], operand))
    verdicts = []
    k = 0  # index of the question operation the next arithmetic line must perform
    expected_left: Optional[int] = first
    for start, end in split_steps(completion, delimiter):
        line = completion[start:end]
        final = _FINAL_STEP.fullmatch(line)
        if final:
            verdicts.append(answers_match(final.group(1), str(truth[-1])))
            continue
        step = _ARITHMETIC_STEP.fullmatch(line)
        ok = False
        if step and k < len(terms):
            a, op, b, c = int(step.group(1)), step.group(2), int(step.group(3)), int(step.group(4))
            ok = a == expected_left and (op, b) == terms[k] and c == _APPLY[op](a, b)
        verdicts.append(ok)
        # The next line continues from what this line wrote, or from the true value if it wrote
        # nothing usable.
        expected_left = int(step.group(4)) if step else (truth[k + 1] if k < len(terms) else None)
        k += 1
    return verdicts


# ----------------------------------------------------------------------------- calculator annotations

MAX_EXPRESSION_CHARS = 200
"""Longer annotations are incorrect without being parsed (bounds parser time and nesting)."""
MAX_MAGNITUDE = 1e100
"""Intermediate values beyond this are rejected: no annotation needs them, and it bounds ``**``."""

_ANNOTATION = re.compile(r"<<(.*?)>>")
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: math.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate_node(node: ast.AST) -> float:
    """Evaluate an arithmetic AST; anything but numbers, + - * / // **, unary +/- raises ValueError.

    ``//`` is allowed because GSM8K's own annotations use it (``<<560//10=56>>``).
    """
    if isinstance(node, ast.Expression):
        return _evaluate_node(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = float(node.value)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        # math.pow works on floats: it raises OverflowError instead of building a huge int, and
        # ValueError instead of returning a complex number for (-8) ** (1/3).
        value = _BINARY[type(node.op)](_evaluate_node(node.left), _evaluate_node(node.right))
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate_node(node.operand))
    else:
        raise ValueError(f"not allowed in a calculator annotation: {type(node).__name__}")
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ValueError("value out of range")
    return value


def safe_evaluate(expression: str) -> Optional[float]:
    """The value of an arithmetic expression, or None if it is not one (never runs code).

    >>> safe_evaluate("(3+1)*2**3/4"), safe_evaluate("__import__('os')") is None
    (8.0, True)
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        return _evaluate_node(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


def annotation_is_correct(annotation: str) -> bool:
    """``"48/2=24"`` -> True: the expression left of the last ``=`` equals the value right of it,
    within 1e-6 relative (1e-9 absolute, so ``0.1+0.2-0.3=0`` holds)."""
    expression, equals, claimed = annotation.rpartition("=")
    if not equals:
        return False
    value, target = safe_evaluate(expression), safe_evaluate(claimed)
    if value is None or target is None:
        return False
    return math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-9)


def check_calculator_annotations(completion: str, *, delimiter: str = "\n") -> List[bool]:
    """One verdict per step (line) of a GSM8K-style ``completion``: correct when every ``<<expr=value>>``
    annotation in it holds; a step without annotations counts as correct (nothing to check).

    >>> check_calculator_annotations("48/2 = <<48/2=24>>24\\n48+24 = <<48+24=70>>70\\n#### 70")
    [True, False, True]
    """
    return [
        all(annotation_is_correct(a) for a in _ANNOTATION.findall(completion, start, end))
        for start, end in split_steps(completion, delimiter)
    ]


# ----------------------------------------------------------------------------- steps -> tokens


def step_end_token_indices(step_spans: Sequence[Span], token_offsets: Sequence[Span]) -> List[int]:
    """For each step, the index of the completion token holding its last character.

    ``step_spans`` are ``(start, end)`` character spans in the completion (as from ``split_steps``);
    ``token_offsets`` the ``(start, end)`` character offsets of the completion's tokens (a
    tokenizer's ``offset_mapping``), in order. Zero-width tokens (special tokens such as EOS) hold
    no character. If the last character falls in a gap between tokens, the token before the gap is
    used; a step ending beyond the last generated character (a cut completion) maps to the last token.

    >>> step_end_token_indices([(0, 5), (6, 11)], [(0, 2), (2, 4), (4, 6), (6, 9), (9, 12), (0, 0)])
    [2, 4]
    """
    if not step_spans:
        return []
    if not token_offsets:
        raise ValueError("steps given but the completion has no tokens")
    # Character-holding tokens, by start offset (offsets are increasing along the sequence).
    held = [(start, end, index) for index, (start, end) in enumerate(token_offsets) if end > start]
    starts = [start for start, _, _ in held]
    last_char = max((end for _, end, _ in held), default=0)
    indices = []
    for _, step_end in step_spans:
        char = step_end - 1
        position = bisect.bisect_right(starts, char) - 1
        if char >= last_char:
            indices.append(len(token_offsets) - 1)
        else:  # position -1: the step ends before the first token starts, so that token it is
            indices.append(held[max(position, 0)][2])
    return indices


def token_char_offsets(tokenizer, completion_ids: Sequence[int], text: str) -> List[Span]:
    """Character span ``(start, end)`` in ``text`` of each sampled completion token.

    ``text`` is the decoded completion (``decode(completion_ids, skip_special_tokens=True)``), so the
    spans come from the ids that were sampled, never from re-tokenising the text (which may split it
    differently). Special tokens (EOS) and the leading bytes of a character split across tokens are
    zero-width. Fast path: decode each token alone, exact when the pieces join into ``text``
    (character-level and most byte-level BPE tokenizers). Otherwise (SentencePiece drops a lone
    token's leading space) token k ends where ``decode(completion_ids[:k+1])`` stops agreeing with
    ``text``: exact, but quadratic in the completion length.

    >>> from grpo_cli.models.tiny import build_tokenizer
    >>> tok = build_tokenizer()
    >>> token_char_offsets(tok, tok("1+2")["input_ids"] + [tok.eos_token_id], "1+2")
    [(0, 1), (1, 2), (2, 3), (3, 3)]
    """
    ids = list(completion_ids)
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    ends: List[int] = []
    if "".join(pieces) == text:
        for piece in pieces:
            ends.append((ends[-1] if ends else 0) + len(piece))
    else:
        for k in range(len(ids)):
            prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
            agreed = len(os.path.commonprefix([prefix, text]))
            ends.append(max(agreed, ends[-1] if ends else 0))  # a split character: no progress yet
    return list(zip([0] + ends[:-1], ends))
