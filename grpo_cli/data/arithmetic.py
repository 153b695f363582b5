"""The embedded synthetic task: arithmetic chains with one checkable step per line.

A question is a chain such as ``23+45-17``, **evaluated left to right** (not with the usual
precedence: ``2+3*4`` is ``(2+3)*4 = 20``), because each line of the solution performs exactly one
operation on the previous line's result, which is what makes every step checkable::

    23+45=68
    68-17=51
    #### 51

The last line uses GSM8K's final-answer format, so the same reward and evaluation code serve both
tasks. Like human-written data, part of the training solutions can be terse: ``direct_fraction``
of them give the final line alone, without the worked steps. A tiny model copies both styles after
SFT, and answering directly is mostly wrong for it: the headroom RL climbs by learning to show
its work (the test split's reference solutions are always complete). With ``tool_fraction``, part of
the training solutions call a python tool instead, as a multi-turn rollout writes them (the output
block is the environment's, grpo_cli/tools/base.py)::

    ```python
    print((23+45)*17)
    ```
    ```output
    1156
    ```
    #### 1156

which pays off once ``mul_digits`` makes the products too large for a tiny model's head. Problems
are a pure function of the config: ``random.Random`` seeded from ``seed`` and the split, never the
global RNG. Train and test are disjoint for every seed: a stable hash of the question string
decides which split a question may belong to.
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from typing import List, Optional, Tuple

from grpo_cli.config.schema import ARITHMETIC_MAX_DIGITS as MAX_DIGITS
from grpo_cli.config.schema import ARITHMETIC_MAX_OPS as MAX_OPS
from grpo_cli.data.types import Example
from grpo_cli.errors import UserError
from grpo_cli.tools.base import CODE_CLOSE, CODE_OPEN, output_block

OPERATORS = "+-*"
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
TEST_BUCKETS = 10
"""One question in ``TEST_BUCKETS`` (by hash) belongs to the test side of the question space."""


def _validate(cfg) -> None:
    """Raise UserError naming the ``data.arithmetic.*`` key of an impossible setting."""
    key = "data.arithmetic."
    bad_ops = sorted(set(cfg.ops) - set(OPERATORS))
    if not cfg.ops or bad_ops:
        raise UserError(f"{key}ops: {cfg.ops!r} must be made of the operators + - * (bad: {bad_ops})")
    for name in ("digits", "mul_digits"):
        if not 1 <= getattr(cfg, name) <= MAX_DIGITS:
            raise UserError(f"{key}{name}: {getattr(cfg, name)} must be between 1 and {MAX_DIGITS}")
    if not 1 <= cfg.min_ops <= cfg.max_ops <= MAX_OPS:
        raise UserError(
            f"{key}min_ops/max_ops: need 1 <= min_ops <= max_ops <= {MAX_OPS}, got {cfg.min_ops} and {cfg.max_ops}"
        )
    for name in ("direct_fraction", "tool_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UserError(f"{key}{name}: {getattr(cfg, name)} must be between 0 and 1")
    for name in ("num_train", "num_test"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{key}{name}: {getattr(cfg, name)} must not be negative")


def split_of(question: str) -> str:
    """``"train"`` or ``"test"``: the side of the question space a question belongs to.

    A hash of the text alone (not of the seed) decides, so no seed's test question is ever any
    seed's training question.
    """
    digest = hashlib.blake2b(question.encode(), digest_size=4).digest()
    return "test" if int.from_bytes(digest, "little") % TEST_BUCKETS == 0 else "train"


def python_expression(question: str) -> str:
    """``question`` as a Python expression with its value: parentheses where Python's precedence
    would differ from the chain's left-to-right order (``23+45*17`` -> ``(23+45)*17``; ``2*3+4-5``
    needs none: ``+ -`` and ``*`` alone are left-associative)."""
    tokens = re.findall(r"\d+|[+\-*]", question)
    expr, low = tokens[0], False  # low: a + or - outside parentheses in ``expr``
    for op, number in zip(tokens[1::2], tokens[2::2]):
        if op == "*" and low:
            expr = f"({expr})"
        expr, low = f"{expr}{op}{number}", op in "+-"  # after a *, any + - is inside parentheses
    return expr


def tool_solution(question: str, answer: int) -> str:
    """The solution that calls the tool: a python block printing the chain, the output block the
    environment appends (grpo_cli/tools/base.py), and the answer line."""
    code = f"print({python_expression(question)})"
    observation = output_block(f"{answer}\n", None)  # what print writes
    return f"{CODE_OPEN}{code}{CODE_CLOSE}{observation}#### {answer}"


def _draw(
    rng: random.Random, ops: str, digits: int, min_ops: int, max_ops: int, mul_digits: int = 1
) -> Tuple[str, str, int]:
    """One random problem: ``(question, solution, answer)``.

    Right operands of ``*`` have up to ``mul_digits`` digits (1-9 by default, so numbers stay
    small); ``-`` never takes more than the running value, so every intermediate result is
    non-negative.
    """
    high = 10**digits - 1
    value = rng.randint(0, high)
    question = [str(value)]
    lines = []
    for _ in range(rng.randint(min_ops, max_ops)):
        op = rng.choice(ops)
        if op == "*":
            operand = rng.randint(1, 10**mul_digits - 1)
        elif op == "-":
            operand = rng.randint(0, min(value, high))
        else:
            operand = rng.randint(0, high)
        result = _APPLY[op](value, operand)
        question.append(f"{op}{operand}")
        lines.append(f"{value}{op}{operand}={result}")
        value = result
    lines.append(f"#### {value}")
    return "".join(question), "\n".join(lines), value


def generate(cfg, split: str, limit: Optional[int] = None) -> List[Example]:
    """``cfg.num_train`` or ``cfg.num_test`` distinct problems of ``split`` ("train" or "test").

    ``cfg`` is an ``ArithmeticConfig`` (or the matching DictConfig). Examples come with
    ``prompt == question``; ``load_examples`` applies the prompt template. Deterministic in
    ``cfg``; ``limit`` stops early and gives a prefix of the full list. Raises UserError when the
    settings allow fewer distinct problems than requested.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _validate(cfg)
    count = cfg.num_train if split == "train" else cfg.num_test
    if limit is not None:
        count = min(count, limit)
    ops = "".join(op for op in OPERATORS if op in cfg.ops)  # a repeated operator is not weighted
    # String seeds are hashed with SHA-512 by random.seed: stable across runs and machines.
    rng = random.Random(f"grpo-arithmetic:{cfg.seed}:{split}")
    # Separate streams, so the questions do not depend on direct_fraction or tool_fraction, and
    # tool_fraction=0 draws exactly today's numbers.
    style = random.Random(f"grpo-arithmetic-style:{cfg.seed}")
    tool = random.Random(f"grpo-arithmetic-tool:{cfg.seed}")
    direct = cfg.direct_fraction if split == "train" else 0.0
    tools = cfg.tool_fraction if split == "train" else 0.0
    seen = set()
    examples = []
    # A bounded number of draws: a small question space (1 digit, 1 op) is reported, not looped on.
    draws_left = 20 * count + 1000
    while len(examples) < count and draws_left > 0:
        draws_left -= 1
        question, solution, answer = _draw(rng, ops, cfg.digits, cfg.min_ops, cfg.max_ops, cfg.mul_digits)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        if style.random() < direct:
            solution = solution.rsplit("\n", 1)[-1]  # the final line alone
        if tools and tool.random() < tools:  # drawn only when asked for (the default draws nothing)
            solution = tool_solution(question, answer)
        columns = {"question": question, "answer": str(answer)}  # the fields of a JSONL row of this task
        examples.append(
            Example(question=question, prompt=question, solution=solution, answer=str(answer), columns=columns)
        )
    if len(examples) < count:
        raise UserError(
            f"data.arithmetic: only {len(examples)} distinct {split} problems found for "
            f"num_{split}={count}; raise digits or max_ops, add operators, or ask for fewer problems"
        )
    return examples
