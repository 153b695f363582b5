"""Data sources (the paper's D): what each step trains on.

Every source is a :class:`Source`: ``next_batch(policy)`` returns a :class:`Batch`, and the source
states what it must save to resume exactly (``state_dict`` / ``load_state_dict``). ``dataset``:
reference solutions from the data (SFT); ``online``: samples from the live policy; the offline
sources (samples of the start model) are in :mod:`grpo_cli.trainer.offline`; ``source.name`` picks
one in :mod:`grpo_cli.trainer.source_registry`.

Data parallel (grpo_cli/trainer/distributed.py): a source gets ``rank`` and ``world_size``; every
rank draws the same global batch from the same seeded sampler and keeps its slice of whole groups.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from grpo_cli.batch import Batch, concat_batches, drop_pad_columns, pack
from grpo_cli.data.chat import end_of_turn_id
from grpo_cli.data.types import Example
from grpo_cli.errors import UserError
from grpo_cli.generation import check_rollout, rollout_options, sample_batch
from grpo_cli.rewards.checkers import NUMERIC, AnswerChecker
from grpo_cli.tools.base import output_spans
from grpo_cli.trainer.distributed import check_divisible, rank_seed, shard
from grpo_cli.trainer.dynamic import (
    ROUND_TENSORS,
    choose_groups,
    flat_groups,
    reward_round_stats,
    round_stats,
    rows_of_groups,
    sample_stats,
)


class Source:
    """The data source protocol: one :class:`Batch` per step, and its own resume state.

    ``state_dict()`` holds the data position and sampling randomness (tensors and plain containers
    only); a checkpoint stores it and ``load_state_dict`` restores it, so a resumed run draws the
    same batches. ``reseed(seed)`` gives the source fresh random streams with its data position
    kept (a rank resuming a checkpoint that holds no state for it: a run resumed on more processes).
    """

    samples_each_step: bool = False
    """True when ``next_batch`` samples from the live policy (the trainer trims the heap before the
    update on such steps: trainer/memory.py)."""
    skipped: int = 0
    """Training examples left out because they do not fit the model's context (reported once)."""

    def next_batch(self, policy) -> Batch:
        raise NotImplementedError

    def heldout_batches(self) -> List[Batch]:
        """Batches scored for the ``heldout_*`` metrics; none by default."""
        return []

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def reseed(self, seed: int) -> None:
        """Fresh random streams; a source without randomness of its own beyond its sampler keeps all."""


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


def check_state_keys(state: Dict[str, Any], expected: set) -> None:
    """A checkpoint's source state must be this source's (not another ``source.name``'s)."""
    extra = sorted(set(state) - expected)
    if extra or not expected <= set(state):
        raise UserError(
            f"resume: the checkpoint's data source saved {sorted(state)}, this source expects "
            f"{sorted(expected)} (another source.name?)"
        )


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


def written_mask(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> List[int]:
    """Per token (its character ``offsets`` [start, end) in the text): 1 where the model wrote it, 0
    where any of its characters lies in one of ``spans`` (observations: a token straddling the
    boundary is a hole too, so the model is never trained to write an observation's text)."""
    return [int(not any(max(a, s) < min(b, e) for s, e in spans)) for a, b in offsets]


def solution_ids(tok, solution: str) -> Tuple[List[int], Optional[List[int]]]:
    """The token ids of an SFT solution and, when it holds tool observations (``output_spans``), which
    of them the model wrote (:func:`written_mask`); None when it wrote them all."""
    spans = output_spans(solution)
    if not spans:
        return tok(solution, add_special_tokens=False)["input_ids"], None
    if not getattr(tok, "is_fast", False):
        raise UserError("data: SFT on tool solutions (```output blocks) needs a fast tokenizer (character offsets)")
    enc = tok(solution, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], written_mask(enc["offset_mapping"], spans)


def mask_holes(completion_mask: torch.Tensor, written: Sequence[Optional[List[int]]]) -> torch.Tensor:
    """``completion_mask`` [B, T] (as ``pack`` lays it out: completions right-aligned) with 0 on the
    completion tokens a row's ``written`` mask marks 0; rows with None keep every token."""
    out = completion_mask.clone()
    for b, mask in enumerate(written):
        if mask is not None:
            out[b, out.shape[1] - len(mask) :] *= torch.tensor(mask, dtype=out.dtype)
    return out


class DatasetSource(Source):
    """Reference (q, o) pairs, reshuffled every epoch; one batch of ``batch_size`` pairs per step.

    Tool observations in a solution (grpo_cli/tools/base.py's ``output`` blocks) were not written by
    the model: their tokens stay in the sequence (attended to) but get completion_mask 0, so no loss
    is taken on them. Every other solution gives today's batches, bit for bit."""

    def __init__(
        self,
        cfg,
        *,
        examples: List[Example],
        policy,
        batch_size: int,
        rollout,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        chat: bool = False,
        **_,
    ):
        tok = policy.tokenizer
        limit = context_length(policy)
        # The target is the assistant's turn: under a chat template it ends with the end-of-turn token.
        end = (end_of_turn_id(tok) if chat else None) or tok.eos_token_id
        self.rows = []
        for ex in examples:
            if ex.solution is None:
                continue
            p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            c, written = solution_ids(tok, ex.solution)
            c = c + [end]
            if len(p) + len(c) <= limit:
                self.rows.append((ex, p, c, None if written is None else written + [1]))
        if not self.rows:
            raise UserError(f"data: no training example has a solution that fits the model's context of {limit} tokens")
        self.skipped = len(examples) - len(self.rows)
        self.pad_id, self.batch_size = tok.pad_token_id, batch_size
        check_divisible(batch_size, world_size, "trainer.batch_size")
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSampler(len(self.rows), seed, cfg.shuffle)  # the same on every rank

    def next_batch(self, policy) -> Batch:
        rows = shard([self.rows[i] for i in self.sampler.take(self.batch_size)], self.rank, self.world_size)
        ids, attn, comp = pack([r[1] for r in rows], [r[2] for r in rows], self.pad_id)
        if any(r[3] is not None for r in rows):
            comp = mask_holes(comp, [r[3] for r in rows])
        return Batch(
            input_ids=ids,
            attention_mask=attn,
            completion_mask=comp,
            prompts=[r[0].prompt for r in rows],
            completions=[r[0].solution for r in rows],
            answers=[r[0].answer for r in rows],
            group=torch.arange(len(rows)),
            columns=[r[0].columns for r in rows],
            questions=[r[0].question for r in rows],
        )

    def state_dict(self) -> Dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        check_state_keys(state, {"sampler"})
        self.sampler.load_state_dict(state["sampler"])


class OnlineSource(Source):
    """P questions per step, G completions each, sampled from the live policy (pi_old = pi_theta now).

    Logs ``accuracy`` (the answer rule, whatever the reward), ``completion_length`` and ``truncated``.
    ``source.dynamic_sampling``: the batch keeps only groups whose rewards differ, in up to
    ``source.max_sample_rounds`` rounds of P questions (trainer/dynamic.py, which says what happens when
    the rounds run out); it carries the rewards it was filtered on (``score``, the run's reward), so the
    trainer does not score it again. A process (per-step) reward filters on its [B] summary (each
    output's mean step reward); the trainer re-scores the kept batch for the step labels. Data
    parallel, each rank fills its own P / N groups; ``sync`` (``Dist.any``) keeps the ranks' rounds,
    and so their shared question sampler, in step: a rank already full draws its round's questions
    without sampling them.
    """

    samples_each_step = True

    def __init__(
        self,
        cfg,
        *,
        examples: List[Example],
        policy,
        rollout,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        checker: AnswerChecker = NUMERIC,
        score: Optional[Callable[[Batch], torch.Tensor]] = None,
        sync: Callable[[bool], bool] = bool,
        **_,
    ):
        self.dynamic, self.max_rounds, self.score, self.sync = cfg.dynamic_sampling, cfg.max_sample_rounds, score, sync
        if self.dynamic and score is None:
            raise UserError("source.dynamic_sampling: filters groups by their rewards; set reward=outcome (or another)")
        self.examples = [examples[i] for i in prompts_that_fit(examples, policy, rollout.max_new_tokens)]
        self.skipped = len(examples) - len(self.examples)
        self.P, self.G, self.rollout, self.checker = cfg.prompts_per_step, cfg.group_size, rollout, checker
        check_rollout(rollout, policy.device)
        check_divisible(self.P, world_size, "source.prompts_per_step")
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSampler(len(self.examples), seed)  # the same questions on every rank
        self.generator = torch.Generator(device=policy.device).manual_seed(
            rank_seed(seed, rank)
        )  # each rank its own samples

    def next_batch(self, policy) -> Batch:
        questions = shard([self.examples[i] for i in self.sampler.take(self.P)], self.rank, self.world_size)
        batch = self.sample(policy, questions)
        return self.fill(policy, batch) if self.dynamic else batch

    def sample(self, policy, questions: List[Example]) -> Batch:
        """G completions of each question, as one batch (group ids 0..len(questions)-1)."""
        chosen = [ex for ex in questions for _ in range(self.G)]  # group members are contiguous
        r = self.rollout
        batch, _ = sample_batch(
            policy.model,
            policy.tokenizer,
            chosen,
            generator=self.generator,
            checker=self.checker,
            group=torch.arange(len(questions)).repeat_interleave(self.G),
            **rollout_options(r),
        )
        batch.totals.update(temperature=r.temperature if r.temperature > 0 else 1.0, max_tokens=float(r.max_new_tokens))
        return batch

    def fill(self, policy, batch: Batch) -> Batch:
        """Dynamic sampling from the first round's ``batch``: further rounds until ``target`` groups with
        signal are drawn (on every rank) or the rounds run out, then the chosen groups as one batch."""
        target = self.P // self.world_size
        rounds, flat = [], []
        while True:
            if batch is not None:
                batch.rewards = self.score(batch)
                # per-position tensors a per-step reward left: the trainer re-scores the kept batch
                batch.tensors = {k: v for k, v in batch.tensors.items() if v.dim() == 1 or k in ROUND_TENSORS}
                rounds.append(batch)
                flat.append(flat_groups(batch.rewards, batch.group))
            else:
                flat.append(torch.zeros(0, dtype=torch.bool))  # full already: this round only drew its questions
            short = sum(int((~f).sum()) for f in flat) < target
            if len(flat) == self.max_rounds or not self.sync(short):
                break
            questions = shard([self.examples[i] for i in self.sampler.take(self.P)], self.rank, self.world_size)
            batch = self.sample(policy, questions) if short else None
        chosen = choose_groups([f for f in flat if len(f)], target)
        parts = [b.select(rows_of_groups(b.group, c)) for b, c in zip(rounds, chosen) if c]
        kept = drop_pad_columns(concat_batches(parts, policy.tokenizer.pad_token_id))  # a dropped long row's width
        kept.stats = {
            **reward_round_stats([b.stats for b in rounds]),
            **sample_stats(kept, self.checker),
            **round_stats(flat, sum(map(len, rounds)), target),
        }
        return kept

    def state_dict(self) -> Dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        check_state_keys(state, {"sampler", "generator"})
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
