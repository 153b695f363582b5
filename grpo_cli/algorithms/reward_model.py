"""Reward-model training: the paper's learned pi_rf, trained by the same loop.

    data source D: outputs sampled once from a policy, labelled by the rule
                   (source=pairs: (o+, o-) of one question; source=labelled: every sample)
    model:         the policy's LM with a scalar head (grpo_cli/models/scorer.py), LoRA or full
    loss:          pairwise Bradley-Terry -log sigmoid(r(o+) - r(o-)), or pointwise binary
                   cross-entropy of r(o) against correct / incorrect

r(o) is the head's score at the last token of the output. The samples are drawn from the start
model before its LM becomes the reward model's trunk (``setup``). Held-out questions
(``source.heldout``) give ``heldout_pair_acc`` / ``heldout_accuracy``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.algorithms.dpo import check_pairs
from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.models.policy import Policy
from grpo_cli.models.scorer import Scorer, load_head, outcome_scores


def scorer_for(lm: torch.nn.Module, kind: str, head_from: Optional[str]) -> Scorer:
    """The LM with a scalar head: zeros, or the head of the ``kind`` reward model at ``head_from``."""
    scorer = Scorer(lm, kind)
    if head_from:
        scorer.head.load_state_dict(load_head(head_from, kind))
    return scorer


@register_algorithm("reward_model")
class RewardModelTraining(Algorithm):
    needs_rewards = True

    def __init__(self, *, objective: str, threshold: float, head_from: Optional[str] = None):
        self.head_from = head_from
        if objective not in ("pairwise", "pointwise"):
            raise UserError(f"algorithm.objective: expected 'pairwise' or 'pointwise', got '{objective}'")
        self.objective, self.threshold = objective, threshold
        self.main_metric = "pair_acc" if objective == "pairwise" else "accuracy"
        self.rows_together = 2 if objective == "pairwise" else 1  # (o+, o-) pairs

    def setup(self, policy: Policy) -> Policy:
        policy.model = scorer_for(policy.model, "outcome", self.head_from)
        return policy

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        scores = outcome_scores(policy.model(batch.input_ids, batch.attention_mask))  # [B]
        if self.objective == "pairwise":
            check_pairs(batch)
            losses = F.bradley_terry_loss(scores[0::2], scores[1::2])  # [P]
            loss = losses.sum() / (batch.totals["sequences"] / 2)
        else:
            labels = (batch.rewards > self.threshold).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels, reduction="sum")
            loss = loss / batch.totals["sequences"]
        return loss, self.score_metrics(scores.detach(), batch)

    @torch.no_grad()
    def evaluate(self, batch: Batch, policy: Policy) -> Dict[str, float]:
        scores = outcome_scores(policy.model(batch.input_ids, batch.attention_mask))
        return self.score_metrics(scores, batch)

    def score_metrics(self, scores: torch.Tensor, batch: Batch) -> Dict[str, float]:
        if self.objective == "pairwise":
            margin = scores[0::2] - scores[1::2]
            return {"pair_acc": float((margin > 0).float().mean()), "margin": float(margin.mean())}
        labels = batch.rewards > self.threshold
        return {"accuracy": float(((scores > 0) == labels).float().mean()), "score_mean": float(scores.mean())}


@register_algorithm("process_reward_model")
class ProcessRewardModelTraining(Algorithm):
    """A process reward model: the scalar head at each step's last token predicts whether the step
    is correct (binary cross-entropy), labelled by a rule process reward (``reward=steps``) on the
    start model's samples (source=labelled). Used as ``reward=process_rm``."""

    needs_rewards = True
    main_metric = "step_acc"

    def __init__(self, *, threshold: float, head_from: Optional[str] = None):
        self.threshold, self.head_from = threshold, head_from

    def setup(self, policy: Policy) -> Policy:
        policy.model = scorer_for(policy.model, "process", self.head_from)
        return policy

    def prepare(self, batch: Batch, policy: Policy) -> Batch:
        if "step_mask" not in batch.tensors:
            raise UserError("algorithm=process_reward_model: needs step labels from a process reward (reward=steps)")
        batch.totals["steps"] = float(batch.tensors["step_mask"].sum().clamp(min=1))
        return batch

    def step_logits(self, batch: Batch, policy: Policy) -> torch.Tensor:
        """[B, T-1]: position p - 1 holds the score read at token p (where a step ending at p sits)."""
        return policy.model(batch.input_ids, batch.attention_mask)[:, 1:]

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        logits, mask = self.step_logits(batch, policy), batch.tensors["step_mask"]
        labels = (batch.tensors["step_rewards"] > self.threshold).float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        loss = (bce * mask).sum() / batch.totals["steps"]
        return loss, step_metrics(logits.detach(), labels, mask)

    @torch.no_grad()
    def evaluate(self, batch: Batch, policy: Policy) -> Dict[str, float]:
        batch = self.prepare(batch, policy)
        labels = (batch.tensors["step_rewards"] > self.threshold).float()
        return step_metrics(self.step_logits(batch, policy), labels, batch.tensors["step_mask"])


def step_metrics(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    n = mask.sum().clamp(min=1)
    right = (((logits > 0).float() == labels).float() * mask).sum() / n
    return {"step_acc": float(right), "step_label_mean": float((labels * mask).sum() / n)}
