"""Data sources (the paper's D): what each step trains on.

``dataset``: reference solutions from the data (SFT). Online sources that sample from the live
policy register here too. Every source returns a :class:`Batch` from ``next_batch(policy)``.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Type

import torch

from grpo_cli.data.types import Example
from grpo_cli.errors import UserError, nearest
from grpo_cli.trainer.batch import Batch, pack

SOURCES: Dict[str, Type] = {}


def register_source(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        SOURCES[name] = cls
        return cls

    return deco


def build_source(cfg: Any, **kwargs) -> Any:
    if cfg.name not in SOURCES:
        raise UserError(f"source.name: unknown source '{cfg.name}': {nearest(cfg.name, SOURCES)}")
    return SOURCES[cfg.name](cfg, **kwargs)


class EpochSampler:
    """Indices 0..n-1 in epochs, reshuffled each epoch by its own seeded RNG."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.shuffle, self.rng = n, shuffle, random.Random(seed)
        self.order: List[int] = []

    def take(self, k: int) -> List[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(self.n))
                if self.shuffle:
                    self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


def context_length(policy) -> int:
    return int(getattr(policy.model.config, "max_position_embeddings", 10**9))


@register_source("dataset")
class DatasetSource:
    """Reference (q, o) pairs, reshuffled every epoch; one batch of ``batch_size`` pairs per step."""

    provides_rewards = False

    def __init__(self, cfg, *, examples: List[Example], policy, batch_size: int, rollout, seed: int, **_):
        tok = policy.tokenizer
        limit = context_length(policy)
        self.rows = []
        for ex in examples:
            if ex.solution is None:
                continue
            p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            c = tok(ex.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(p) + len(c) <= limit:
                self.rows.append((ex, p, c))
        if not self.rows:
            raise UserError(
                f"data: no training example has a solution that fits the model's context of {limit} tokens"
            )
        self.skipped = len(examples) - len(self.rows)
        self.pad_id, self.batch_size = tok.pad_token_id, batch_size
        self.sampler = EpochSampler(len(self.rows), seed, cfg.shuffle)

    def next_batch(self, policy) -> Batch:
        rows = [self.rows[i] for i in self.sampler.take(self.batch_size)]
        ids, attn, comp = pack([r[1] for r in rows], [r[2] for r in rows], self.pad_id)
        return Batch(
            input_ids=ids,
            attention_mask=attn,
            completion_mask=comp,
            prompts=[r[0].prompt for r in rows],
            completions=[r[0].solution for r in rows],
            answers=[r[0].answer for r in rows],
            group=torch.arange(len(rows)),
        )


@register_source("online")
class OnlineSource:
    """P questions per step, G completions each, sampled from the live policy (pi_old = pi_theta now).

    Token ids go straight from the sampler into the batch (never re-tokenised), so the trained
    tokens are exactly the sampled ones. Logs ``accuracy`` (the answer rule, whatever the reward)
    and ``completion_length``.
    """

    def __init__(self, cfg, *, examples: List[Example], policy, batch_size: int, rollout, seed: int, **_):
        limit = context_length(policy) - rollout.max_new_tokens
        tok = policy.tokenizer
        self.examples = [e for e in examples if len(tok(e.prompt, add_special_tokens=False)["input_ids"]) <= limit]
        self.skipped = len(examples) - len(self.examples)
        if not self.examples:
            raise UserError(f"data: no prompt fits the context minus rollout.max_new_tokens ({limit} tokens)")
        self.P, self.G, self.rollout = cfg.prompts_per_step, cfg.group_size, rollout
        if self.G < 2:
            raise UserError(f"source.group_size: a group needs at least 2 completions, got {self.G}")
        self.sampler = EpochSampler(len(self.examples), seed)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, policy) -> Batch:
        from grpo_cli.generation import generate
        from grpo_cli.rewards.answer import answers_match, extract_answer

        questions = [self.examples[i] for i in self.sampler.take(self.P)]
        chosen = [ex for ex in questions for _ in range(self.G)]  # group members are contiguous
        r = self.rollout
        gens = generate(
            policy.model, policy.tokenizer, [ex.prompt for ex in chosen], max_new_tokens=r.max_new_tokens,
            temperature=r.temperature, top_p=r.top_p, batch_size=r.batch_size, generator=self.generator,
        )
        ids, attn, comp = pack([g.prompt_ids for g in gens], [g.completion_ids for g in gens], policy.tokenizer.pad_token_id)
        correct = [answers_match(extract_answer(g.text), ex.answer) for g, ex in zip(gens, chosen)]
        batch = Batch(
            input_ids=ids, attention_mask=attn, completion_mask=comp,
            prompts=[ex.prompt for ex in chosen], completions=[g.text for g in gens],
            answers=[ex.answer for ex in chosen], group=torch.arange(self.P).repeat_interleave(self.G),
        )
        batch.totals.update(temperature=r.temperature if r.temperature > 0 else 1.0, max_tokens=float(r.max_new_tokens))
        batch.stats.update(
            accuracy=sum(correct) / len(correct),
            completion_length=sum(len(g.completion_ids) for g in gens) / len(gens),
            truncated=sum(not g.finished for g in gens) / len(gens),
        )
        return batch
