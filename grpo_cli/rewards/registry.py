"""Reward functions (the paper's pi_rf) chosen by ``reward.name``; each maps a batch to rewards [B]
(the contract: rewards/base.py). The trainer calls them through :func:`score_batch` only.

Every one is built wrapped in :class:`grpo_cli.rewards.guard.GuardedReward` (time limit
``reward.timeout_s``, errors scored ``reward.incorrect`` and counted) unless its factory is
registered with ``guard=False`` (a learned reward model whose calls may be slow and must not fail
silently).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional

import torch

from grpo_cli.batch import Batch
from grpo_cli.errors import UserError, nearest
from grpo_cli.models.scorer import load_scorer, outcome_scores
from grpo_cli.rewards.base import FunctionReward, Reward
from grpo_cli.rewards.checkers import NUMERIC, AnswerChecker
from grpo_cli.rewards.classifier import ClassifierReward, is_classifier, load_classifier
from grpo_cli.rewards.functions import build_functions
from grpo_cli.rewards.guard import GuardedReward, import_function
from grpo_cli.rewards.overlong import OverlongReward
from grpo_cli.rewards.process import CHECKERS, char_ends, learned_process_rewards, rule_process_rewards

REWARDS: Dict[str, Callable[..., Optional[Reward]]] = {}
"""``reward.name`` -> factory ``(RewardConfig) -> Reward or None`` (plus ``checker=`` for those
registered with ``checker=True``)."""


def register_reward(name: str, guard: bool = True, checker: bool = False):
    """``guard``: wrap it in GuardedReward; ``checker``: its factory takes the run's answer checker."""

    def deco(factory):
        factory.guard, factory.takes_checker = guard, checker
        REWARDS[name] = factory
        return factory

    return deco


@register_reward("none")
def _none(cfg) -> Optional[Reward]:
    return None


@register_reward("outcome", checker=True)
def _outcome(cfg, checker: AnswerChecker = NUMERIC) -> Reward:
    """Rule: ``reward.correct`` when the final answer equals the reference by the run's answer checker
    (``data.answer_checker``), else ``reward.incorrect``."""

    def score(batch: Batch) -> torch.Tensor:
        r = [
            cfg.correct if checker.correct(completion, answer) else cfg.incorrect
            for completion, answer in zip(batch.completions, batch.answers, strict=True)
        ]
        return torch.tensor(r, dtype=torch.float32)

    return FunctionReward(score, name=cfg.name)


@register_reward("custom")
def _custom(cfg) -> Reward:
    """``reward.function``: the user's ``f(completions, answers, prompts) -> list[float]`` (trusted code)."""
    fn = import_function(cfg.function)

    def score(batch: Batch) -> List[float]:
        return fn(list(batch.completions), list(batch.answers), list(batch.prompts))

    return FunctionReward(score, name=cfg.name)


# Not guarded as a whole: each of its functions is, so one bad function costs only its own term.
@register_reward("functions", guard=False, checker=True)
def _functions(cfg, checker: AnswerChecker = NUMERIC) -> Reward:
    """``reward.functions``: TRL-style functions, summed with ``reward.weights`` (rewards/functions.py)."""
    return build_functions(cfg, checker)


# Not guarded: the rule is total and bounded (it never raises on model output), and the guard's
# fallbacks (one call per completion, a constant on timeout) would drop the step rewards.
@register_reward("steps", guard=False)
def _steps(cfg) -> Reward:
    """Rule process reward: ``reward.step_correct`` / ``step_incorrect`` for each step by ``reward.checker``
    (sets ``step_rewards`` / ``step_mask``, returns the mean step reward; see rewards/process.py)."""
    if cfg.checker not in CHECKERS:
        raise UserError(f"reward.checker: expected one of {CHECKERS}, got '{cfg.checker}'")
    if not cfg.delimiter:
        raise UserError("reward.delimiter: the step delimiter must be a non-empty string")
    return FunctionReward(
        functools.partial(
            rule_process_rewards,
            delimiter=cfg.delimiter,
            checker=cfg.checker,
            correct=cfg.step_correct,
            incorrect=cfg.step_incorrect,
            last_step_outcome=cfg.last_step_outcome,
        ),
        name=cfg.name,
        per_step=True,
    )


def build_reward(cfg, device: Optional[torch.device] = None, *, checker: AnswerChecker = NUMERIC) -> Optional[Reward]:
    """The reward ``reward.name`` names; the torch modules it holds (a learned reward model) move to
    ``device``, the run's, so they score where the policy runs. ``checker``: the run's answer checker
    (:func:`grpo_cli.rewards.checkers.answer_checker` of ``cfg.data``), which ``outcome`` uses."""
    if cfg.name not in REWARDS:
        raise UserError(f"reward.name: unknown reward '{cfg.name}': {nearest(cfg.name, REWARDS)}")
    factory = REWARDS[cfg.name]
    reward = factory(cfg, checker=checker) if getattr(factory, "takes_checker", False) else factory(cfg)
    if reward is None:
        return None
    if not isinstance(reward, Reward):  # a factory may return a plain function of a batch
        reward = FunctionReward(reward, name=cfg.name)
    for module in reward.modules if device is not None else ():
        module.to(device)
    if getattr(factory, "guard", True):
        reward = GuardedReward(reward, timeout_s=cfg.timeout_s, incorrect=cfg.incorrect)
    if not cfg.overlong_buffer:
        return reward
    if reward.per_step:
        raise UserError(f"reward.overlong_buffer: shapes outcome rewards; reward={cfg.name} gives step rewards")
    return OverlongReward(reward, buffer=cfg.overlong_buffer, penalty=cfg.overlong_penalty)


def score_batch(reward: Reward, batch: Batch, tokenizer) -> torch.Tensor:
    """The one way a reward is called: first what it declares it reads, then ``reward(batch)`` [B]."""
    reward.bind(tokenizer)
    if reward.per_step and "char_ends" not in batch.tensors:
        batch.tensors["char_ends"] = char_ends(
            tokenizer, batch.completion_token_ids(), batch.completions, batch.completion_span
        )
    return reward(batch)


def learned_reward(
    cfg, kind: str, read: Callable[[Batch, torch.Tensor], torch.Tensor], *, per_step: bool = False
) -> Reward:
    """A reward model at ``reward.path`` (frozen, scored without gradient); ``read`` turns its scores
    [B, T] into the rewards of the batch."""
    if not cfg.path:
        raise UserError(f"reward.path: reward={cfg.name} needs the directory of a trained {kind} reward model")
    scorer, _ = load_scorer(cfg.path, kind=kind)
    scorer.eval().requires_grad_(False)

    @torch.no_grad()
    def score(batch: Batch) -> torch.Tensor:
        check_vocab(scorer, batch)
        device = next(scorer.parameters()).device
        return read(batch, scorer(batch.input_ids.to(device), batch.attention_mask.to(device)).cpu())

    return FunctionReward(score, name=cfg.name, per_step=per_step, modules=(scorer,))


@register_reward("outcome_rm", guard=False)  # a model's calls may be slow, and must not fail silently
def _outcome_rm(cfg) -> Reward:
    """A learned outcome reward model (``reward.path``): its score at the last token of each output;
    a transformers sequence-classification model (a hub reward model) scores with its own tokenizer."""
    if is_classifier(cfg.path):
        return ClassifierReward(*load_classifier(cfg.path), name=cfg.name)
    return learned_reward(cfg, "outcome", lambda batch, scores: outcome_scores(scores))


@register_reward("process_rm", guard=False)
def _process_rm(cfg) -> Reward:
    """A learned process reward model (``reward.path``, recipe prm_arithmetic): the probability it gives
    each step (split at ``reward.delimiter``) of being correct, on the step's last token."""
    return learned_reward(
        cfg,
        "process",
        lambda batch, scores: learned_process_rewards(
            batch, scores, delimiter=cfg.delimiter, last_step_outcome=cfg.last_step_outcome
        ),
        per_step=True,
    )


def check_vocab(scorer, batch: Batch) -> None:
    """A learned reward model reads the policy's token ids as they are: the vocabularies must agree."""
    vocab = scorer.config.vocab_size
    if int(batch.input_ids.max()) >= vocab:
        raise UserError(f"reward.path: the reward model's vocabulary ({vocab}) does not cover the policy's tokens")
