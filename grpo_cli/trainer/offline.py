"""Offline data sources: outputs sampled once from the start (SFT) model, before training.

``rft``:   the correct samples, deduplicated (RFT's D in the unified paradigm).
``pairs``: (o+, o-) pairs of the same question, one correct and one not (DPO's D, reward models).
``labelled``: every distinct sample with its reward (pointwise reward models).

Each samples ``questions x samples_per_question`` completions with the ``rollout`` settings, rewards
them with the run's reward (the ``score`` the trainer hands it) and writes every sample with its
reward to ``<run>/samples.jsonl`` (token ids included, so the trained tokens are exactly the sampled
ones). ``source.samples=PATH`` reuses such a file instead of sampling again. Batches carry the stored
rewards.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from grpo_cli.batch import Batch, pack
from grpo_cli.data.loaders import read_jsonl
from grpo_cli.data.types import Example
from grpo_cli.errors import UserError
from grpo_cli.generation import check_rollout, rollout_options, sample_batch
from grpo_cli.trainer.distributed import check_divisible, gather_objects, on_main, rank_seed, shard
from grpo_cli.trainer.sources import EpochSampler, Source, check_state_keys, prompts_that_fit

Sample = Dict[str, object]
"""One stored sample: question (index), prompt, answer, completion, prompt_ids, completion_ids, reward."""


Score = Callable[[Batch], torch.Tensor]
"""The run's reward, as the trainer calls it (``score_batch`` with the reward bound): [B] rewards."""


def sample_questions(
    policy, examples: List[Example], questions: List[int], *, k: int, rollout, score: Score, generator: torch.Generator
) -> List[Sample]:
    """k completions per question from the policy, rewarded by ``score``, in chunks of rollout.batch_size."""
    check_rollout(rollout, policy.device)
    out: List[Sample] = []
    chunk = max(1, rollout.batch_size // k)
    with policy.autocast():  # sampling and learned rewards: forward passes at trainer.precision
        for start in range(0, len(questions), chunk):
            idx = [q for q in questions[start : start + chunk] for _ in range(k)]
            batch, gens = sample_batch(
                policy.model,
                policy.tokenizer,
                [examples[q] for q in idx],
                group=torch.as_tensor(idx),
                generator=generator,
                **rollout_options(rollout),
            )
            rewards = score(batch).tolist()
            out += [
                {
                    "question": q,
                    "prompt": prompt,
                    "answer": examples[q].answer,
                    "completion": g.text,
                    "prompt_ids": g.prompt_ids,
                    "completion_ids": g.completion_ids,
                    "reward": float(r),
                    **({} if g.model_written is None else {"model_written": g.model_written}),
                }
                for q, prompt, g, r in zip(idx, batch.prompts, gens, rewards)
            ]
    return out


def write_samples(samples: List[Sample], path: Path) -> None:
    """Write JSONL atomically: a crash mid-write never leaves a truncated file to be reused."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_samples(path: Path) -> List[Sample]:
    if not path.is_file():
        raise UserError(f"source.samples: no samples file at '{path}'")
    rows = []
    for where, row in read_jsonl(path):
        missing = [k for k in ("question", "prompt_ids", "completion_ids", "reward") if k not in row]
        if missing:
            raise UserError(f"{where}: sample row is missing {missing}")
        rows.append(row)
    return rows


def stored_samples(cfg, own: Optional[Path]) -> Optional[List[Sample]]:
    """``cfg.samples``, else ``<run>/samples.jsonl`` from an earlier attempt, else None."""
    path = Path(cfg.samples) if cfg.samples else own if own is not None and own.is_file() else None
    return read_samples(path) if path is not None else None


def load_or_sample(
    cfg,
    *,
    examples,
    policy,
    rollout,
    score: Optional[Score],
    seed: int,
    run: Optional[Path],
    rank: int = 0,
    world_size: int = 1,
) -> List[Sample]:
    """Stored samples (read by rank 0, sent to every rank), else sample now: each of the ``world_size``
    ranks samples its share of the questions (its own random stream) and every rank gets them all."""
    if score is None:
        raise UserError(
            f"reward: source '{cfg.name}' labels its samples with a reward; set reward=outcome (or another)"
        )
    own = run / "samples.jsonl" if run is not None else None
    stored = on_main(stored_samples, cfg, own)
    if stored is not None:
        return stored
    chosen = choose_questions(examples, policy, rollout.max_new_tokens, cfg.questions, seed)
    generator = torch.Generator(device=policy.device).manual_seed(rank_seed(seed, rank))
    mine = sample_questions(
        policy,
        examples,
        shard(chosen, rank, world_size),
        k=cfg.samples_per_question,
        rollout=rollout,
        score=score,
        generator=generator,
    )
    samples = [s for part in gather_objects(mine) for s in part]  # in the order of ``chosen``
    if own is not None and rank == 0:
        write_samples(samples, own)
    return samples


def choose_questions(examples, policy, max_new_tokens: int, count: int, seed: int) -> List[int]:
    """The first ``count`` (0: all) of a seeded shuffle of the questions whose prompts fit the context."""
    fits = prompts_that_fit(examples, policy, max_new_tokens)
    random.Random(seed).shuffle(fits)
    return fits[:count] if count > 0 else fits


def keep_correct(samples: List[Sample], threshold: float) -> List[Sample]:
    """RFT's filter: samples whose reward exceeds ``threshold``, one per distinct (question, output)."""
    seen, kept = set(), []
    for s in samples:
        key = (s["question"], tuple(s["completion_ids"]))
        if s["reward"] > threshold and key not in seen:
            seen.add(key)
            kept.append(s)
    return kept


def make_pairs(samples: List[Sample], threshold: float, per_question: int) -> List[tuple]:
    """Up to ``per_question`` (correct, incorrect) pairs per question, distinct outputs, each used once."""
    by_question: Dict[int, List[List[Sample]]] = defaultdict(lambda: [[], []])
    seen = set()
    for s in samples:
        key = (s["question"], tuple(s["completion_ids"]))
        if key not in seen:
            seen.add(key)
            by_question[s["question"]][0 if s["reward"] > threshold else 1].append(s)
    pairs = []
    for q in sorted(by_question):
        good, bad = by_question[q]
        pairs += list(zip(good, bad))[:per_question]
    return pairs


def samples_batch(rows: List[Sample], group: torch.Tensor, pad_id: int, examples: Sequence[Example] = ()) -> Batch:
    """Stored samples as a batch; each row's dataset columns come from ``examples`` (by the stored
    question index), so samples.jsonl need not store them and older files work as they are. A
    multi-turn sample's ``model_written`` (stored with tools) keeps its observations out of training."""
    ids, attn, comp = pack([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad_id)
    T = comp.shape[1]
    for b, r in enumerate(rows):
        if r.get("model_written") and r["completion_ids"]:
            comp[b, T - len(r["completion_ids"]) :] = torch.tensor(r["model_written"], dtype=comp.dtype)
    return Batch(
        input_ids=ids,
        attention_mask=attn,
        completion_mask=comp,
        prompts=[r["prompt"] for r in rows],
        completions=[r["completion"] for r in rows],
        answers=[r["answer"] for r in rows],
        group=group,
        rewards=torch.tensor([float(r["reward"]) for r in rows]),
        columns=[columns_of(r, examples) for r in rows],
        questions=[question_of(r, examples) for r in rows],
    )


def example_of(sample: Sample, examples: Sequence[Example]) -> Optional[Example]:
    """The example of a stored sample's question; None when ``source.samples`` came from other data
    (its question index then names another prompt, or none)."""
    q = sample["question"]
    if isinstance(q, int) and 0 <= q < len(examples) and examples[q].prompt == sample.get("prompt"):
        return examples[q]
    return None


def columns_of(sample: Sample, examples: Sequence[Example]) -> Mapping[str, Any]:
    """The dataset columns of a stored sample's question; none when it is not one of ``examples``."""
    example = example_of(sample, examples)
    return example.columns if example is not None else {}


def question_of(sample: Sample, examples: Sequence[Example]) -> str:
    """A stored sample's question as written in the data; its stored prompt when it is not one of
    ``examples``."""
    example = example_of(sample, examples)
    return example.question if example is not None else sample["prompt"]


def split_heldout(samples: List[Sample], share: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """(train, heldout): a seeded ``share`` of the questions, with all their samples, is held out."""
    questions = sorted({s["question"] for s in samples})
    random.Random(seed + 1).shuffle(questions)
    held = set(questions[: int(round(share * len(questions)))])
    return [s for s in samples if s["question"] not in held], [s for s in samples if s["question"] in held]


class OfflineSource(Source):
    """Shared by the offline sources: sample (or load), hold out questions, serve ``units`` in epochs.

    A unit is a list of samples served together (one sample, or an (o+, o-) pair); subclasses say
    how units are made (``make_units``) and grouped (``group_of``).
    """

    unit_name = "samples"

    def __init__(
        self,
        cfg,
        *,
        examples,
        policy,
        batch_size: int,
        rollout,
        seed: int,
        score: Optional[Score] = None,
        run=None,
        rank: int = 0,
        world_size: int = 1,
        **_,  # the sampled outputs end as the model ended them, and ``score`` labels them: no chat
        # setting or answer checker needed
    ):
        check_divisible(batch_size, world_size, "trainer.batch_size")
        samples = load_or_sample(
            cfg,
            examples=examples,
            policy=policy,
            rollout=rollout,
            score=score,
            seed=seed,
            run=run,
            rank=rank,
            world_size=world_size,
        )
        train, held = split_heldout(samples, cfg.heldout, seed)
        self.units, self.heldout = self.make_units(train, cfg), self.make_units(held, cfg)
        if not self.units:
            raise UserError(f"source: no training {self.unit_name} among {len(train)} samples; {self.hint}")
        self.stats = {
            "sampled_accuracy": sum(s["reward"] > cfg.threshold for s in samples) / len(samples),
            f"train_{self.unit_name}": float(len(self.units)),
        }
        self.pad_id, self.batch_size, self.examples = policy.tokenizer.pad_token_id, batch_size, examples
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSampler(len(self.units), seed)  # the same units on every rank; each keeps its slice

    def batch_of(self, units: List[List[Sample]]) -> Batch:
        rows = [s for unit in units for s in unit]
        group = torch.arange(len(units)).repeat_interleave(len(units[0]))
        return samples_batch(rows, group, self.pad_id, self.examples)

    def next_batch(self, policy) -> Batch:
        units = [self.units[i] for i in self.sampler.take(self.batch_size)]
        batch = self.batch_of(shard(units, self.rank, self.world_size))
        batch.stats.update(self.stats)
        return batch

    def heldout_batches(self) -> List[Batch]:
        return [
            self.batch_of(self.heldout[i : i + self.batch_size]) for i in range(0, len(self.heldout), self.batch_size)
        ]

    def state_dict(self) -> Dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        check_state_keys(state, {"sampler"})
        self.sampler.load_state_dict(state["sampler"])


class RFTSource(OfflineSource):
    """The start model's correct samples, deduplicated, in shuffled epochs of ``batch_size``."""

    hint = "none is correct (reward > source.threshold); nothing to fine-tune on"

    def make_units(self, samples, cfg):
        return [[s] for s in keep_correct(samples, cfg.threshold)]


class LabelledSource(OfflineSource):
    """Every distinct sample with its reward (a pointwise reward model's data)."""

    hint = "sample more questions"

    def make_units(self, samples, cfg):
        return [[s] for s in keep_correct(samples, -float("inf"))]


class PairSource(OfflineSource):
    """``batch_size`` pairs per step as 2 x batch_size rows: o+ then o- of each pair, adjacent, one group each."""

    unit_name = "pairs"
    hint = (
        "no question has both a correct and an incorrect sample; "
        "raise source.samples_per_question or rollout.temperature"
    )

    def make_units(self, samples, cfg):
        return [list(p) for p in make_pairs(samples, cfg.threshold, cfg.pairs_per_question)]
