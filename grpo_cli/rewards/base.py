"""The reward function's contract (the paper's pi_rf): a batch in, one reward per completion out.

A reward declares what it needs beyond a batch's texts, answers and token ids, so that no caller
probes it and no data source needs to know which reward a run uses:

* ``per_step``: a process reward. Besides its [B] return value (each output's mean step reward) it
  labels every reasoning step (``batch.tensors["step_rewards"]`` / ``["step_mask"]``,
  rewards/process.py) and reads each completion token's character offset, which
  :func:`grpo_cli.rewards.registry.score_batch` adds first. Rewards stored with offline samples are
  per-output summaries: the trainer scores every batch again with such a reward.
* ``modules``: the torch modules it holds (a learned reward model), moved to the run's device.
* ``bind(tokenizer)``: called with the policy's tokenizer before every call; a reward model with its
  own tokenizer decides there whether it can read the policy's token ids as they are.

The trainer calls a reward through ``score_batch`` only (rewards/registry.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from grpo_cli.batch import Batch


class Reward:
    """``reward(batch) -> [B]`` rewards, with its declarations (see the module docstring)."""

    name: str = ""
    per_step: bool = False
    modules: Sequence[torch.nn.Module] = ()

    def __call__(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, tokenizer) -> None:
        """The policy's tokenizer (see the module docstring); most rewards read text and ignore it."""


class FunctionReward(Reward):
    """A plain function of a batch as a :class:`Reward`."""

    def __init__(
        self,
        fn: Callable[[Batch], object],
        *,
        name: str,
        per_step: bool = False,
        modules: Sequence[torch.nn.Module] = (),
    ):
        self.fn, self.name, self.per_step, self.modules = fn, name, per_step, tuple(modules)

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.fn(batch)
