"""Rewards (the paper's pi_rf): rule-based outcome and step checks here; the contract every reward
follows is rewards/base.py, the ones ``reward.name`` picks (rules, custom functions, learned reward
models) are in rewards/registry.py."""

from grpo_cli.rewards.answer import answers_match, extract_answer, outcome_rewards, parse_number
from grpo_cli.rewards.steps import (
    check_arithmetic_steps,
    check_calculator_annotations,
    split_steps,
    step_end_token_indices,
)

__all__ = [
    "answers_match",
    "check_arithmetic_steps",
    "check_calculator_annotations",
    "extract_answer",
    "outcome_rewards",
    "parse_number",
    "split_steps",
    "step_end_token_indices",
]
