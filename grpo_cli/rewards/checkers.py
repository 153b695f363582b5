"""Answer checkers: how a task's final answer is found in a text and compared with the reference.

One checker per answer format, chosen once from the config by :func:`answer_checker`
(``data.answer_checker``; ``auto`` follows ``data.name``); the outcome reward, ``grpo eval`` and the
``accuracy`` statistic of sampling all use the one chosen, so they never disagree.

- ``numeric``: GSM8K's rule (``#### 72``, "the answer is 72", else the last number), compared exactly
  as numbers (:mod:`grpo_cli.rewards.answer`).
- ``math``: MATH's rule: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces),
  compared by Hugging Face's ``math-verify`` (LaTeX and plain expressions, fractions, roots, intervals,
  sets, units and ``\\text{}``): equivalent forms match, near misses do not. We do not normalise LaTeX
  ourselves.

math-verify's own time limits use ``signal.alarm``, which works only in the main thread; the reward
guard runs rewards in a thread when ``reward.timeout_s > 0``. So they are turned off here and the
guard's limit applies instead; math-verify's errors are raised (not swallowed as "incorrect"), so the
guard counts them in ``reward_errors``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from grpo_cli.errors import UserError
from grpo_cli.rewards.answer import answers_match, extract_answer

BOX_COMMANDS = ("\\boxed", "\\fbox")
MAX_BOXED_CHARS = 1000
"""A boxed answer longer than this is not an answer (a runaway generation); it is not parsed."""


@dataclass(frozen=True)
class AnswerChecker:
    """``extract(text) -> answer or None`` and ``match(pred, gold) -> bool`` of one answer format."""

    name: str
    extract: Callable[[str], Optional[str]]
    match: Callable[[Optional[str], str], bool]

    def correct(self, completion: str, answer: str) -> bool:
        """Whether ``completion``'s final answer equals the reference ``answer``."""
        return bool(self.match(self.extract(completion), answer))


def _closing_brace(text: str, start: int) -> Optional[int]:
    """Index of the ``}`` closing the ``{`` at ``start``, or None when it is never closed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` of ``text`` (braces nested to any
    depth), stripped; None when there is none or it is never closed.

    >>> last_boxed("so $x = \\\\boxed{\\\\frac{1}{2}}$, not \\\\fbox{3}")
    '3'
    >>> last_boxed("no box") is None
    True
    """
    if text is None:
        return None
    starts = [(text.rfind(command + "{"), command) for command in BOX_COMMANDS]
    start, command = max(starts)
    if start < 0:
        return None
    brace = start + len(command)
    end = _closing_brace(text, brace)
    if end is None:
        return None
    content = text[brace + 1 : end].strip()
    return content or None


class _QuietTimeoutNotice(logging.Filter):
    """Drops math-verify's notice that its own time limit is off: that is deliberate (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify():
    """The math_verify module, imported on first use: it loads sympy, which would slow every
    command's start-up; only runs whose checker is ``math`` pay for it."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_QuietTimeoutNotice())
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse(answer: str):
    """math-verify's parse of one bare answer, wrapped in ``$...$`` so it is read as LaTeX. Cached:
    parsing is the costly part of a check, and a group's reference (and often its answers) repeat.
    The result is a list of immutable sympy objects and strings, never modified by ``verify``."""
    return _math_verify().parse(f"${answer}$", parsing_timeout=None, raise_on_error=True)


def math_match(pred: Optional[str], gold: str) -> bool:
    """Whether two bare answers are the same mathematical object by math-verify (``\\frac12`` and
    ``0.5``; ``(1,2]`` and ``(1, 2]``; not ``[1,2]`` and ``(1,2)``). A missing or oversized
    prediction never matches; math-verify's errors are raised for the reward guard to count."""
    if pred is None or gold is None or len(pred) > MAX_BOXED_CHARS:
        return False
    if pred.strip() == gold.strip():  # the same LaTeX: equal without parsing it
        return True
    return bool(_math_verify().verify(_parse(gold), _parse(pred), timeout_seconds=None, raise_on_error=True))


NUMERIC = AnswerChecker("numeric", extract_answer, answers_match)
MATH = AnswerChecker("math", last_boxed, math_match)
CHECKERS: Dict[str, AnswerChecker] = {c.name: c for c in (NUMERIC, MATH)}
AUTO = {"math": "math"}
"""``data.answer_checker=auto``: the checker of each ``data.name`` that is not ``numeric``."""


def answer_checker(data_cfg) -> AnswerChecker:
    """The checker ``data.answer_checker`` names; ``auto`` is ``math`` for ``data=math``, else ``numeric``."""
    name = getattr(data_cfg, "answer_checker", "auto")
    if name == "auto":
        name = AUTO.get(data_cfg.name, "numeric")
    if name not in CHECKERS:
        raise UserError(f"data.answer_checker: expected auto or one of {', '.join(CHECKERS)}, got {name!r}")
    return CHECKERS[name]
