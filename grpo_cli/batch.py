"""The batch every stage of the loop passes on: token tensors, texts, rewards, algorithm tensors.

Sequences are left-padded: ``input_ids[b] = [pad.., prompt.., completion.., (eos)]``. Position ids
come from the attention mask, so left padding never shifts a position.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    completion_mask: torch.Tensor  # [B, T] 1 on completion tokens (the ones trained on)
    prompts: List[str]
    completions: List[str]
    answers: List[str]
    group: torch.Tensor  # [B] long: sequences with the same id answer the same prompt
    rewards: Optional[torch.Tensor] = None  # [B] outcome reward of each completion
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-sequence tensors, each with B as its first dimension so they split with the batch. The
    sampler adds ``truncated`` [B] bool (the completion hit ``max_new_tokens`` without a stop token);
    a weighted sum of reward functions adds ``reward/<name>`` [B] (each function's own score, NaN
    where it does not apply); the algorithm's ``prepare`` adds old/ref log-probs, advantages..."""
    totals: Dict[str, float] = field(default_factory=dict)
    """Whole-batch counts (sequences, completion tokens) so a micro-batch loss normalises like the
    full batch: the micro-batch losses then simply add up. Sources may add settings the loss needs
    (``temperature`` of sampling, ``max_tokens`` of a completion). Data parallel, the loop sums every
    total except those settings (``distributed.SETTINGS``) over ranks after ``prepare``: the counts of
    the global batch, so the ranks' losses add up to the global batch's loss."""
    stats: Dict[str, float] = field(default_factory=dict)
    """Batch-level metrics (source: accuracy, lengths; prepare: rewards, advantages) for the log."""
    columns: List[Mapping[str, Any]] = field(default_factory=list)
    """Each row's dataset fields (``Example.columns``), for reward functions that read them; empty
    when the batch's source has none (every row then has no columns)."""
    questions: List[str] = field(default_factory=list)
    """Each row's question as written in the data (``Example.question``), before any prompt template:
    what a reward model with its own chat template reads as the user's turn. Empty when the batch's
    source has none (readers then take ``prompts``)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def target_mask(self) -> torch.Tensor:
        """[B, T-1] mask of the targets of next-token log-probs (position t predicts token t+1)."""
        return self.completion_mask[:, 1:].to(torch.float32)

    @property
    def completion_span(self) -> torch.Tensor:
        """[B, T] bool: each row's whole completion, from its first trained token to the row's end,
        the observations of a multi-turn rollout included (0 in ``completion_mask``: holes); equal
        to ``completion_mask`` where a completion is one run of trained tokens."""
        return self.completion_mask.bool().cummax(dim=1).values

    def completion_token_ids(self) -> List[List[int]]:
        """Each row's completion tokens, in order (the sampled ids, EOS included where drawn; the
        observations of a multi-turn rollout too: the ids whose decoding is ``completions``)."""
        return [row[mask].tolist() for row, mask in zip(self.input_ids, self.completion_span)]

    def select(self, idx: Sequence[int]) -> Batch:
        index = torch.as_tensor(list(idx), dtype=torch.long)
        pick = lambda xs: [xs[i] for i in index.tolist()]  # noqa: E731
        return replace(
            self,
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            completion_mask=self.completion_mask[index],
            prompts=pick(self.prompts),
            completions=pick(self.completions),
            answers=pick(self.answers),
            group=self.group[index],
            columns=pick(self.columns) if self.columns else [],
            questions=pick(self.questions) if self.questions else [],
            rewards=None if self.rewards is None else self.rewards[index],
            tensors={k: v[index] for k, v in self.tensors.items()},
            totals=dict(self.totals),
        )

    def micro_batches(self, n: int) -> List[Batch]:
        """Split into contiguous micro-batches of ceil(B / n) rows: ``n`` of them when B is a multiple of
        ``n`` (groups stay together when it is a multiple of n*G), fewer otherwise (5 rows, n=4: 2+2+1)."""
        size = -(-len(self) // n)
        return [self.select(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]

    def token_micro_batches(self, max_tokens: int, unit: int = 1) -> List[Batch]:
        """Split into contiguous micro-batches of at most ``max_tokens`` real tokens (attention mask
        1) each, by :func:`token_budget_splits` over the rows' lengths; ``unit`` adjacent rows stay
        together (DPO's (o+, o-) pairs: 2)."""
        lengths = self.attention_mask.sum(1).tolist()
        return [self.select(range(a, b)) for a, b in token_budget_splits(lengths, max_tokens, unit)]

    def with_totals(self) -> Batch:
        self.totals.update(sequences=float(len(self)), tokens=float(self.target_mask.sum().clamp(min=1)))
        return self

    def to(self, device: torch.device) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
            group=self.group.to(device),
            rewards=None if self.rewards is None else self.rewards.to(device),
            tensors={k: v.to(device) for k, v in self.tensors.items()},
        )


def token_budget_splits(lengths: Sequence[int], max_tokens: int, unit: int = 1) -> List[Tuple[int, int]]:
    """``[start, end)`` row ranges that cover ``lengths`` in order, each summing to at most ``max_tokens``
    (verl's dynamic batch size, contiguous): greedy, a range closes when the next ``unit`` rows would
    overflow it. A unit longer than the budget alone is a range of its own, over it. In order rather
    than sorted: a group's rows stay adjacent, so a micro-batch still runs their common prompt once
    (``model.share_prefixes``), and the result depends on the lengths alone.

    lengths [3, 4, 2, 9, 1], max_tokens 6: [(0, 1), (1, 3), (3, 4), (4, 5)] (3 | 4+2 | 9 | 1)."""
    if max_tokens < 1 or unit < 1:
        raise ValueError(f"max_tokens and unit must be >= 1, got {max_tokens} and {unit}")
    splits: List[Tuple[int, int]] = []
    start, used = 0, 0
    for i in range(0, len(lengths), unit):
        size = sum(lengths[i : i + unit])
        if i > start and used + size > max_tokens:
            splits.append((start, i))
            start, used = i, 0
        used += size
    if start < len(lengths):
        splits.append((start, len(lengths)))
    return splits


def pack(
    prompt_ids: List[List[int]], completion_ids: List[List[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompt+completion pairs into ``input_ids, attention_mask, completion_mask`` [B, T]."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    T = max(lengths)
    B = len(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    comp = torch.zeros((B, T), dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        start = T - len(p) - len(c)
        ids[b, start:] = torch.tensor(p + c, dtype=torch.long)
        attn[b, start:] = 1
        comp[b, start + len(p) :] = 1
    return ids, attn, comp


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions counted from each row's first real token (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(x: torch.Tensor, T: int, value: int = 0) -> torch.Tensor:
    """[B, t, ...] -> [B, T, ...] with ``value`` prepended on dim 1 (sequences stay right-aligned)."""
    pad = x.new_full((x.shape[0], T - x.shape[1], *x.shape[2:]), value)
    return torch.cat([pad, x], dim=1)


def concat_batches(batches: Sequence[Batch], pad_id: int) -> Batch:
    """The rows of several batches as one: token tensors left-padded to the longest T; group ids
    renumbered 0..K-1 across the batches (each batch's groups stay apart); per-row
    ``tensors`` concatenated, those with a time dimension ([B, T-k, ...]) left-padded with 0 like the
    masks. ``totals`` and ``stats`` are the first batch's: a caller that merges batches recomputes
    what its stats measure. ``rewards`` only when every batch has them."""
    T = max(b.input_ids.shape[1] for b in batches)
    groups, offset = [], 0
    for b in batches:  # each batch's ids renumbered 0..k-1 (in id order), after the previous batches' ones
        ids, dense = torch.unique(b.group, return_inverse=True)
        groups.append(dense + offset)
        offset += len(ids)
    seq = lambda name, v: torch.cat([left_pad(getattr(b, name), T, v) for b in batches])  # noqa: E731
    rows = lambda name: [v for b in batches for v in getattr(b, name)]  # noqa: E731
    return Batch(
        input_ids=seq("input_ids", pad_id),
        attention_mask=seq("attention_mask", 0),
        completion_mask=seq("completion_mask", 0),
        prompts=rows("prompts"),
        completions=rows("completions"),
        answers=rows("answers"),
        group=torch.cat(groups),
        rewards=None if any(b.rewards is None for b in batches) else torch.cat([b.rewards for b in batches]),
        tensors={k: torch.cat([_row_tensor(b, k, T) for b in batches]) for k in batches[0].tensors},
        totals=dict(batches[0].totals),
        stats=dict(batches[0].stats),
        columns=rows("columns") if all(b.columns for b in batches) else [],
        questions=rows("questions") if all(b.questions for b in batches) else [],
    )


def _row_tensor(batch: Batch, key: str, T: int) -> torch.Tensor:
    """``batch.tensors[key]`` ready to concatenate: [B] as is, [B, t-k, ...] (t the batch's own T)
    left-padded with 0 to [B, T-k, ...]."""
    x = batch.tensors[key]
    return x if x.dim() == 1 else left_pad(x, T - (batch.input_ids.shape[1] - x.shape[1]))


def drop_pad_columns(batch: Batch) -> Batch:
    """``batch`` without the leading columns that are padding in every row (rows picked out of a wider
    batch keep its T); token-aligned ``tensors`` ([B, T-k, ...], right-aligned) lose as many columns."""
    first = int(batch.attention_mask.any(0).long().argmax()) if len(batch) else 0
    cut = lambda x: x[:, first:]  # noqa: E731
    return replace(
        batch,
        input_ids=cut(batch.input_ids),
        attention_mask=cut(batch.attention_mask),
        completion_mask=cut(batch.completion_mask),
        tensors={k: v if v.dim() == 1 else cut(v) for k, v in batch.tensors.items()},
    )
