"""Data sources (the paper's D): what each step trains on.

``dataset``: reference solutions from the data (SFT). Online sources that sample from the live
policy register here too. Every source returns a :class:`Batch` from ``next_batch(policy)``.

Resume: a checkpoint stores every :class:`EpochSampler`, ``torch.Generator`` and ``random.Random``
attribute of the source (``source_state``), so a source that keeps its data position and sampling
randomness in those resumes exactly with no code of its own; a source with other state defines
``state_dict()`` / ``load_state_dict(state)`` (tensors and plain containers only).

Data parallel (grpo_cli/trainer/distributed.py): a source gets ``rank`` and ``world_size``; every
rank draws the same global batch from the same seeded sampler and keeps its slice of whole groups.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Type

import torch

from grpo_cli.data.types import Example
from grpo_cli.errors import UserError, nearest
from grpo_cli.generation import check_rollout
from grpo_cli.trainer.batch import Batch, pack
from grpo_cli.trainer.distributed import check_divisible, rank_seed, shard

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

    def state_dict(self) -> Dict[str, Any]:
        """The data position: the RNG state and what is left of the current epoch."""
        return {"rng": self.rng.getstate(), "order": list(self.order), "n": self.n}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise UserError(f"resume: the checkpoint's data has {state['n']} examples, this config gives {self.n}")
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])


def source_state(source: Any) -> Dict[str, Any]:
    """Everything a source needs to continue exactly: its samplers, generators and RNGs (found by
    type among its attributes) and its own ``state_dict()`` if it has one."""
    state: Dict[str, Any] = {}
    for name, value in vars(source).items():
        if isinstance(value, EpochSampler):
            state[name] = value.state_dict()
        elif isinstance(value, torch.Generator):
            state[name] = value.get_state()
        elif isinstance(value, random.Random):
            state[name] = value.getstate()
    if callable(getattr(source, "state_dict", None)):
        state["state_dict()"] = source.state_dict()
    return state


def load_source_state(source: Any, state: Dict[str, Any]) -> None:
    """Restore what :func:`source_state` captured."""
    for name, value in state.items():
        if name == "state_dict()":
            source.load_state_dict(value)
            continue
        target = getattr(source, name, None)
        if isinstance(target, EpochSampler):
            target.load_state_dict(value)
        elif isinstance(target, torch.Generator):
            target.set_state(value)
        elif isinstance(target, random.Random):
            target.setstate(value)
        else:
            raise UserError(f"resume: the checkpoint's data source has '{name}', this source does not (another source.name?)")


def reseed_source(source: Any, seed: int) -> None:
    """Fresh streams for a source's own generators and RNGs, its data position kept (a rank resuming
    a checkpoint that holds no state for it: a run resumed on more processes)."""
    for value in vars(source).values():
        if isinstance(value, torch.Generator):
            value.manual_seed(seed)
        elif isinstance(value, random.Random):
            value.seed(seed)


def context_length(policy) -> int:
    return int(getattr(policy.model.config, "max_position_embeddings", 10**9))


def prompts_that_fit(examples: List[Example], policy, max_new_tokens: int) -> List[int]:
    """Indices of the examples whose prompt leaves ``max_new_tokens`` of the model's context free."""
    limit = context_length(policy) - max_new_tokens
    tok = policy.tokenizer
    fits = [i for i, e in enumerate(examples) if len(tok(e.prompt, add_special_tokens=False)["input_ids"]) <= limit]
    if not fits:
        raise UserError(f"data: no prompt fits the context minus rollout.max_new_tokens ({limit} tokens)")
    return fits


@register_source("dataset")
class DatasetSource:
    """Reference (q, o) pairs, reshuffled every epoch; one batch of ``batch_size`` pairs per step."""

    provides_rewards = False

    def __init__(self, cfg, *, examples: List[Example], policy, batch_size: int, rollout, seed: int, rank: int = 0,
                 world_size: int = 1, **_):
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
        check_divisible(batch_size, world_size, "trainer.batch_size")
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSampler(len(self.rows), seed, cfg.shuffle)  # the same on every rank

    def next_batch(self, policy) -> Batch:
        rows = shard([self.rows[i] for i in self.sampler.take(self.batch_size)], self.rank, self.world_size)
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
    and ``completion_length``. For a process reward it also records each token's character offset
    in its completion, ``tensors["char_ends"]`` (see grpo_cli/rewards/process.py).
    """

    samples_each_step = True  # so the trainer trims the heap before each update (trainer/memory.py)

    def __init__(self, cfg, *, examples: List[Example], policy, batch_size: int, rollout, seed: int, reward=None,
                 rank: int = 0, world_size: int = 1, **_):
        self.examples = [examples[i] for i in prompts_that_fit(examples, policy, rollout.max_new_tokens)]
        self.skipped = len(examples) - len(self.examples)
        self.P, self.G, self.rollout = cfg.prompts_per_step, cfg.group_size, rollout
        check_rollout(rollout, policy.device)
        if self.G < 1:
            raise UserError(f"source.group_size: expected at least 1 completion per question, got {self.G}")
        check_divisible(self.P, world_size, "source.prompts_per_step")
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSampler(len(self.examples), seed)  # the same questions on every rank
        self.generator = torch.Generator(device=policy.device).manual_seed(rank_seed(seed, rank))  # each rank its own samples
        self.token_offsets = bool(getattr(reward, "wants_token_offsets", False))  # a process reward's step ends

    def next_batch(self, policy) -> Batch:
        from grpo_cli.generation import generate, rollout_options
        from grpo_cli.rewards.answer import answers_match, extract_answer

        questions = shard([self.examples[i] for i in self.sampler.take(self.P)], self.rank, self.world_size)
        chosen = [ex for ex in questions for _ in range(self.G)]  # group members are contiguous
        r = self.rollout
        gens = generate(policy.model, policy.tokenizer, [ex.prompt for ex in chosen], generator=self.generator,
                        **rollout_options(r))
        ids, attn, comp = pack([g.prompt_ids for g in gens], [g.completion_ids for g in gens], policy.tokenizer.pad_token_id)
        correct = [answers_match(extract_answer(g.text), ex.answer) for g, ex in zip(gens, chosen)]
        batch = Batch(
            input_ids=ids, attention_mask=attn, completion_mask=comp,
            prompts=[ex.prompt for ex in chosen], completions=[g.text for g in gens],
            answers=[ex.answer for ex in chosen], group=torch.arange(len(questions)).repeat_interleave(self.G),
        )
        batch.totals.update(temperature=r.temperature if r.temperature > 0 else 1.0, max_tokens=float(r.max_new_tokens))
        if self.token_offsets:
            from grpo_cli.rewards.process import char_ends

            batch.tensors["char_ends"] = char_ends(policy.tokenizer, [g.completion_ids for g in gens], batch.completions, comp)
        batch.stats.update(
            accuracy=sum(correct) / len(correct),
            completion_length=sum(len(g.completion_ids) for g in gens) / len(gens),
            truncated=sum(not g.finished for g in gens) / len(gens),
        )
        return batch
