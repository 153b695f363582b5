"""``reward=functions``: reward functions written the way TRL users write them, summed with weights.

Each entry of ``reward.functions`` is a user function (``module:function`` or
``path/to/file.py:function``) or a built-in (:data:`BUILTINS`), called on a batch as
``fn(prompts=[...], completions=[...], answer=[...], **columns)`` (see ``RewardConfig.functions``).

Every function is guarded on its own (:class:`grpo_cli.rewards.guard.GuardedReward`): one that
raises, hangs or returns the wrong length costs only its own term, and its warning names it
(``reward 'functions:my_mod:fn': ...``). A None (or NaN, as in TRL) reward means "not applicable":
0 in the weighted sum, left out of that function's mean (``reward_<name>`` in the batch's stats).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch

from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.rewards.base import FunctionReward, Reward
from grpo_cli.rewards.checkers import NUMERIC, AnswerChecker
from grpo_cli.rewards.guard import GuardedReward, import_function

KEY = "reward.functions"
RESERVED = {"mean", "std", "errors", "timeouts"}
"""``reward_<name>`` metrics the trainer already logs: a function so named gets a suffix."""
SKIPPED_COLUMNS = {"prompts", "completions"}
"""Dataset fields not passed as columns: they would collide with the call's own arguments."""


def accuracy_builtin(cfg, checker: AnswerChecker) -> Callable:
    """The task's answer checker (``data.answer_checker``: numeric, or math-verify for ``data=math``)."""

    def accuracy(prompts, completions, answer, **_) -> List[float]:
        return [
            cfg.correct if checker.correct(completion, gold) else cfg.incorrect
            for completion, gold in zip(completions, answer, strict=True)
        ]

    return accuracy


def format_builtin(cfg, checker: AnswerChecker) -> Callable:
    """1.0 when ``reward.format_pattern`` occurs in the completion (compiled once, here; ``checker``,
    the answer rule, is not used)."""
    try:
        pattern = re.compile(cfg.format_pattern)
    except re.error as e:
        raise UserError(f"reward.format_pattern: not a valid regex {cfg.format_pattern!r}: {e}") from None

    def format(prompts, completions, **_) -> List[float]:  # noqa: A001 - the name users write
        return [1.0 if pattern.search(c) else 0.0 for c in completions]

    return format


BUILTINS: Dict[str, Callable[[Any, AnswerChecker], Callable]] = {"accuracy": accuracy_builtin, "format": format_builtin}


def call_kwargs(batch: Batch) -> Dict[str, List[Any]]:
    """The keyword lists a function gets: every dataset field (None where a row lacks it) and the
    reference ``answer``, each aligned with ``batch.completions``."""
    rows: Sequence[Mapping[str, Any]] = batch.columns or [{}] * len(batch.completions)
    keys = list(dict.fromkeys(k for row in rows for k in row if k not in SKIPPED_COLUMNS))
    kwargs = {k: [row.get(k) for row in rows] for k in keys}
    kwargs["answer"] = list(batch.answers)
    return kwargs


def as_reward(fn: Callable, name: str) -> Reward:
    """``fn`` called TRL-style on a batch; None entries become NaN ("not applicable")."""

    def score(batch: Batch):
        out = fn(prompts=list(batch.prompts), completions=list(batch.completions), **call_kwargs(batch))
        if isinstance(out, (list, tuple)):
            return [math.nan if v is None else v for v in out]
        return out

    return FunctionReward(score, name=name)


def resolve(spec: str, cfg, checker: AnswerChecker = NUMERIC) -> Callable:
    """A built-in by name, else the user's function (``module:function`` or ``file.py:function``)."""
    if ":" not in spec:
        if spec in BUILTINS:
            return BUILTINS[spec](cfg, checker)
        raise UserError(
            f"{KEY}: unknown built-in {spec!r} (built-ins: {', '.join(BUILTINS)}; "
            "a function of yours is module:function or path/to/file.py:function)"
        )
    return import_function(spec, key=KEY)


def metric_names(fns: Sequence[Callable], specs: Sequence[str]) -> List[str]:
    """``reward_<name>`` suffixes: each function's ``__name__`` (the spec's when it has none), with
    ``_2``, ``_3``... for repeats and for names the trainer's own reward metrics use."""
    taken, names = set(RESERVED), []
    for fn, spec in zip(fns, specs):
        base = getattr(fn, "__name__", None) or spec.rpartition(":")[2]
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        names.append(name)
    return names


def check_weights(cfg) -> List[float]:
    specs, weights = list(cfg.functions), cfg.weights
    if not specs:
        raise UserError(f"{KEY}: reward=functions needs at least one function (e.g. [accuracy, format])")
    if weights is None:
        return [1.0] * len(specs)
    if len(weights) != len(specs):
        raise UserError(f"reward.weights: {len(weights)} weights for {len(specs)} reward.functions")
    return [float(w) for w in weights]


def build_functions(cfg, checker: AnswerChecker = NUMERIC) -> Reward:
    """The weighted sum of ``reward.functions``, each guarded on its own; the ``accuracy`` built-in
    checks answers with ``checker``, the run's answer checker."""
    weights = check_weights(cfg)
    specs = list(cfg.functions)
    fns = [resolve(spec, cfg, checker) for spec in specs]
    names = metric_names(fns, specs)
    guards = [
        GuardedReward(
            as_reward(fn, f"functions:{spec}"), timeout_s=cfg.timeout_s, incorrect=cfg.incorrect, optional=True
        )
        for fn, spec in zip(fns, specs)
    ]

    def score(batch: Batch) -> torch.Tensor:
        total = torch.zeros(len(batch.completions))
        errors = timeouts = 0
        for guard, name, weight in zip(guards, names, weights):
            rewards, e, t = guard.score(batch)
            errors, timeouts = errors + e, timeouts + t
            values = torch.tensor(rewards, dtype=torch.float32)
            applies = ~values.isnan()
            total += weight * torch.where(applies, values, torch.zeros_like(values))
            batch.tensors[f"reward/{name}"] = values  # each row's own score: the completion tables show it
            if applies.any():
                batch.stats[f"reward_{name}"] = float(values[applies].mean())
        batch.stats.update(reward_errors=errors, reward_timeouts=timeouts)
        return total

    return FunctionReward(score, name=cfg.name)
