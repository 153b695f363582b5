"""Data: every task becomes a list of ``Example`` (question, prompt, solution, answer).

``load_examples(cfg.data, "train")`` dispatches on ``data.name`` through ``LOADERS``; a loader maps
``(DataConfig, split)`` to examples whose prompt is still the bare question, and ``load_examples``
applies ``data.prompt_template`` and ``data.max_examples`` the same way for every loader.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List

from grpo_cli.data import arithmetic
from grpo_cli.data.chat import format_prompt, render_prompt
from grpo_cli.data.loaders import load_gsm8k, load_jsonl, load_math
from grpo_cli.data.types import Example
from grpo_cli.errors import UserError, nearest

SPLITS = ("train", "test")


def _load_arithmetic(cfg, split: str) -> List[Example]:
    return arithmetic.generate(cfg.arithmetic, split, limit=cfg.max_examples)


LOADERS: Dict[str, Callable[..., List[Example]]] = {
    "arithmetic": _load_arithmetic,
    "gsm8k": load_gsm8k,
    "jsonl": load_jsonl,
    "math": load_math,
}
"""``data.name`` -> loader ``(DataConfig, split) -> list[Example]``."""


def load_examples(cfg, split: str, tokenizer=None) -> List[Example]:
    """The examples of ``split`` ("train" or "test") of the task ``cfg`` (a ``DataConfig``), prompts
    rendered for ``tokenizer`` (its chat template, ``data.chat_template``; without a tokenizer
    ``data.prompt_template`` alone), at most ``cfg.max_examples`` of them. No example is a UserError."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    if cfg.name not in LOADERS:
        raise UserError(f"data.name: unknown dataset {cfg.name!r}; {nearest(cfg.name, LOADERS)}")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise UserError(f"data.max_examples: {cfg.max_examples} must be at least 1 (or null for all)")
    if "{question}" not in cfg.prompt_template:
        raise UserError(
            f"data.prompt_template: {cfg.prompt_template!r} lacks {{question}}: every prompt would be the same"
        )
    examples = LOADERS[cfg.name](cfg, split)[: cfg.max_examples]
    if not examples:
        source = f" ({cfg.path})" if cfg.path and cfg.name != "arithmetic" else ""
        raise UserError(f"data: the {split} split of {cfg.name}{source} has no examples")
    return [dataclasses.replace(e, prompt=render_prompt(cfg, tokenizer, e.question)) for e in examples]


__all__ = ["Example", "LOADERS", "format_prompt", "load_examples", "render_prompt"]
