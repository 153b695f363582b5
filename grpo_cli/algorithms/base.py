"""The algorithm interface and its registry.

An algorithm is the third part of a method's (data source, reward, algorithm) triple: it turns a
batch, its rewards and its log-probs into a loss whose gradient is the paper's unified form

    grad J_A = E[(q, o) ~ D] [ 1/|o| sum_t GC_A(q, o, t, pi_rf) * grad log pi_theta(o_t | q, o_<t) ]

The trainer calls ``prepare`` once per batch (no gradient: old/reference log-probs, advantages),
then ``loss`` on each micro-batch, ``updates_per_batch`` times (GRPO's mu). It never names a method.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

import torch
from omegaconf import DictConfig, OmegaConf

from grpo_cli.batch import Batch
from grpo_cli.errors import UserError, nearest
from grpo_cli.models.policy import Policy

ALGORITHMS: Dict[str, Type[Algorithm]] = {}


def register_algorithm(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return deco


class Algorithm:
    name: str = ""
    needs_rewards: bool = False
    """The data source must come with rewards (a reward function is configured)."""
    needs_reference: bool = False
    """Keep pi_ref (adapter disabled with LoRA, a frozen copy without)."""
    updates_per_batch: int = 1
    """Optimiser steps on each batch (GRPO's mu)."""
    main_metric: str = "loss"
    """Metric drawn beside the loss in curves.png."""
    rows_together: int = 1
    """Adjacent rows a token-budget micro-batch never splits (``trainer.max_tokens_per_microbatch``):
    2 where a loss reads (o+, o-) pairs."""

    def setup(self, policy: Policy) -> Policy:
        """Called once, after the data source is built and before the optimiser: an algorithm may
        add trainable modules (PPO's value model) or change what is trained (a reward model's head)."""
        return policy

    def evaluate(self, batch: Batch, policy: Policy) -> Dict[str, float]:
        """Metrics on a held-out batch (no gradient); logged as ``heldout_<name>``. Default: none."""
        return {}

    def prepare(self, batch: Batch, policy: Policy) -> Batch:
        """Everything computed once per batch, without gradient. Default: nothing."""
        return batch

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss of one micro-batch, normalised by ``batch.totals`` so micro-batch losses add up."""
        raise NotImplementedError

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """State the algorithm carries from step to step (tensors and plain containers), saved in every
        checkpoint so a resumed run continues exactly; None: it carries none (the default)."""
        return None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError(f"algorithm '{self.name}' saved state but cannot load it")


def build_algorithm(cfg: Any) -> Algorithm:
    """Instantiate the registered algorithm with its hyperparameters passed explicitly by name."""
    params: Mapping[str, Any] = (
        OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, DictConfig)
        else asdict(cfg)
        if is_dataclass(cfg)
        else dict(cfg)
    )
    name = params.get("name")
    if name not in ALGORITHMS:
        raise UserError(f"algorithm.name: unknown algorithm '{name}': {nearest(str(name), ALGORITHMS)}")
    kwargs = {k: v for k, v in params.items() if k != "name"}
    return ALGORITHMS[name](**kwargs)
