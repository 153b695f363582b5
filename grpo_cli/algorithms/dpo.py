"""DPO: Direct Preference Optimisation (DeepSeekMath, appendix A.1.4 and section 5.2.1).

    data source D: SFT questions, pairs (o+, o-) sampled from the SFT model (source=pairs)
    reward:        rule (correct or not), which decides o+ and o-
    GC:            o+: sigma(beta log pi_theta(o-)/pi_ref(o-) - beta log pi_theta(o+)/pi_ref(o+));
                   o-: the same with a minus sign

The source serves each pair as two adjacent rows, o+ first. pi_ref is the start model (adapter
disabled with LoRA, a frozen copy without); its log-probs are computed once per batch.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from grpo_cli.algorithms import functional as F
from grpo_cli.algorithms.base import Algorithm, register_algorithm
from grpo_cli.algorithms.sft import sft_loss
from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.models.policy import Policy


@register_algorithm("dpo")
class DPO(Algorithm):
    needs_rewards = True
    needs_reference = True
    main_metric = "dpo_reward_acc"
    rows_together = 2  # (o+, o-) pairs

    def __init__(self, *, beta: float, length_normalise: bool, sft_weight: float):
        if beta <= 0:
            raise UserError(f"algorithm.beta: DPO needs beta > 0, got {beta}")
        self.beta, self.length_normalise, self.sft_weight = beta, length_normalise, sft_weight

    def prepare(self, batch: Batch, policy: Policy) -> Batch:
        with torch.no_grad():
            batch.tensors["ref_logp"] = policy.reference_logprobs(batch)
        batch.totals["chosen_tokens"] = float(batch.target_mask[0::2].sum().clamp(min=1))
        return batch

    def loss(self, batch: Batch, policy: Policy) -> Tuple[torch.Tensor, Dict[str, float]]:
        check_pairs(batch)
        logp, _ = policy.logprobs(batch)
        ratio = F.sequence_log_ratio(
            logp, batch.tensors["ref_logp"], batch.target_mask, length_normalise=self.length_normalise
        )  # [2P]
        losses, parts = F.dpo_pair_loss(ratio[0::2], ratio[1::2], beta=self.beta)  # [P]
        pairs_in_batch = batch.totals["sequences"] / 2
        loss = losses.sum() / pairs_in_batch
        if self.sft_weight:
            loss = loss + self.sft_weight * sft_loss(logp[0::2], batch.target_mask[0::2], batch.totals["chosen_tokens"])
        gc = torch.cat([parts["gc"], -parts["gc"]])  # o+ rows, then o- rows
        metrics = {
            "dpo_reward_acc": float((parts["margin"] > 0).float().mean()),
            "dpo_margin": float(parts["margin"].mean()),
            "gc_mean": float(gc.mean()),
            "gc_std": float(gc.std(unbiased=False)),
            "gc_positive": 0.5,  # every o+ is reinforced, every o- penalised (sigmoid > 0)
            "gc_negative": 0.5,
        }
        return loss, metrics


def check_pairs(batch: Batch) -> None:
    """Rows must come as adjacent (o+, o-) pairs of one question: a micro-batch split keeps them whole."""
    g = batch.group
    if len(batch) % 2 or not bool((g[0::2] == g[1::2]).all()):
        raise UserError(
            "algorithm=dpo: a micro-batch split a (o+, o-) pair; use source=pairs and a trainer.grad_accum "
            "that divides trainer.batch_size"
        )
