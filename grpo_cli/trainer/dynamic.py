"""Dynamic sampling (DAPO, Yu et al., 2025): the online source drops groups whose G rewards are all
equal and samples more questions until the step's P groups are full.

A group with equal rewards has zero advantage for every output under GRPO (the loss is only the KL
term), so it carries no signal and only dilutes the batch. With ``source.dynamic_sampling=true`` the
online source (trainer/sources.py) samples P questions x G, scores them with the run's reward, keeps
the groups with signal, and draws further rounds of P questions until P groups are kept or
``source.max_sample_rounds`` rounds are done.

When the rounds run out, the batch is filled up with flat groups, earliest drawn first, so every step
trains on exactly P groups (plain GRPO on those rows; ``groups_short`` counts them). verl's DAPO recipe
raises instead once ``max_num_gen_batches`` is reached; filling keeps a run going on a hard (or
saturated) data set, keeps every step's batch the same size (the same memory, the same loss scale as
without filtering) and every data-parallel rank's row count equal, which FSDP's collective forward
passes need. When more than P groups have signal, the surplus of the last round is dropped (verl too
trims the batch to its size).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from grpo_cli.batch import Batch
from grpo_cli.rewards.checkers import AnswerChecker


def flat_groups(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """[groups] bool, in the order of ``torch.unique(group)``: True where the group's rewards are all
    equal (std below 1e-6, the tolerance of ``zero_std_groups`` in the algorithms' reward stats)."""
    ids = torch.unique(group)
    return torch.stack([rewards[group == g].float().std(unbiased=False) < 1e-6 for g in ids])


def choose_groups(flat: Sequence[torch.Tensor], target: int) -> List[List[int]]:
    """Per round, the indices of the groups trained on: the groups with signal in the order drawn, up
    to ``target``; if fewer, filled up to ``target`` with flat groups, earliest drawn first."""
    chosen: List[List[int]] = [[] for _ in flat]
    for want_flat in (False, True):
        for r, f in enumerate(flat):
            for i, is_flat in enumerate(f.tolist()):
                if is_flat == want_flat and sum(map(len, chosen)) < target:
                    chosen[r].append(i)
    return [sorted(c) for c in chosen]


def rows_of_groups(group: torch.Tensor, chosen: Sequence[int]) -> List[int]:
    """The rows (in order) of the groups at positions ``chosen`` of ``torch.unique(group)``."""
    ids = torch.unique(group)[list(chosen)]
    return torch.nonzero(torch.isin(group, ids)).flatten().tolist()


def sample_stats(batch: Batch, checker: AnswerChecker) -> Dict[str, float]:
    """The sampler's stats (generation.sample_batch) over the rows of ``batch``: accuracy by the run's
    answer rule, mean completion length in tokens, share truncated at ``max_new_tokens``."""
    n = max(1, len(batch))
    return {
        "accuracy": sum(checker.correct(c, a) for c, a in zip(batch.completions, batch.answers)) / n,
        "completion_length": float(batch.completion_span.sum()) / n,
        "truncated": float(batch.tensors["truncated"].float().sum()) / n,
    }


ROUND_TENSORS = ("rollout_logp",)
"""Token-aligned tensors of a sampled round that the kept batch keeps (left-padded by ``concat_batches``):
the engine's log-probs, for the trainer's drift metrics and ``algorithm.tis_cap``."""

COUNTS = ("reward_errors", "reward_timeouts")


def reward_round_stats(stats: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """What the reward wrote into each round's ``stats`` (``reward_<name>``, ``overlong_penalty``,
    error counts), over the step's rounds: counts summed, the other values averaged (each round has
    the same number of rows). The sampler's own stats are left out: :func:`sample_stats` recomputes
    them over the kept rows."""
    keys = {k for s in stats for k in s} - {"accuracy", "completion_length", "truncated"}
    out = {}
    for k in sorted(keys):
        values = [s[k] for s in stats if k in s]
        out[k] = float(sum(values)) if k in COUNTS else sum(values) / len(values)
    return out


def round_stats(flat: Sequence[torch.Tensor], samples: int, target: int) -> Dict[str, float]:
    """The step's dynamic-sampling metrics: ``zero_std_groups`` over every group sampled (before the
    filter), ``sample_rounds``, ``samples_per_kept_group`` (outputs drawn per group with signal
    trained on; the outputs drawn when none) and ``groups_short`` (flat groups filled in)."""
    kept = min(target, sum(int((~f).sum()) for f in flat))
    total = sum(len(f) for f in flat)
    return {
        "zero_std_groups": sum(int(f.sum()) for f in flat) / max(1, total),
        "sample_rounds": float(len(flat)),
        "samples_per_kept_group": samples / max(1, kept),
        "groups_short": float(target - kept),
    }
