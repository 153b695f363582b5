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

from typing import Dict, Tuple

import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.algorithms.dpo import check_pairs
from grpo_cli.errors import UserError
from grpo_cli.models.policy import Policy
from grpo_cli.models.scorer import Scorer, outcome_scores
from grpo_cli.trainer.batch import Batch


@register_algorithm("reward_model")
class RewardModelTraining(Algorithm):
    needs_rewards = True

    def __init__(self, *, objective: str, threshold: float):
        if objective not in ("pairwise", "pointwise"):
            raise UserError(f"algorithm.objective: expected 'pairwise' or 'pointwise', got '{objective}'")
        self.objective, self.threshold = objective, threshold
        self.main_metric = "pair_acc" if objective == "pairwise" else "accuracy"

    def setup(self, policy: Policy) -> Policy:
        policy.model = Scorer(policy.model, "outcome")
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
