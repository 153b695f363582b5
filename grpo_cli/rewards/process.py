"""Process rewards: a reward for every reasoning step, placed on the token where the step ends.

The loop-facing convention, shared by every process reward (a rule here, a learned PRM later): the
reward function is called like any other, ``batch.rewards = reward(batch)``, and besides its [B]
return value it sets

    batch.tensors["step_rewards"]  [B, T-1]  r_i^index(j) at the target position of step j's last token
    batch.tensors["step_mask"]     [B, T-1]  1 at those positions, 0 elsewhere

Target position t scores token t+1 of ``input_ids`` (``Batch.target_mask``), so a step ending at
token p sits at position p - 1. The [B] return value is each output's mean step reward, for the
log (``reward_mean``) and for algorithms that only read outcome rewards.

Step ends are found on the tokens that were sampled: a process reward declares ``per_step`` and
``score_batch`` (rewards/registry.py) adds ``batch.tensors["char_ends"]`` [B, T], the number of
completion characters decoded up to and including each completion token (0 elsewhere).
"""

from __future__ import annotations

from itertools import groupby
from typing import List, Sequence, Tuple

import torch

from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.rewards.answer import answers_match, extract_answer
from grpo_cli.rewards.steps import (
    Span,
    check_arithmetic_steps,
    check_calculator_annotations,
    split_steps,
    step_end_token_indices,
    token_char_offsets,
)

CHECKERS = ("arithmetic", "calculator", "auto")


def char_ends(
    tokenizer, completion_ids: Sequence[Sequence[int]], texts: Sequence[str], completion_mask: torch.Tensor
) -> torch.Tensor:
    """[B, T] long: characters of ``texts[b]`` decoded through each completion token (0 elsewhere).

    ``completion_mask`` [B, T] marks each row's completion tokens, in order (as ``pack`` lays them out;
    ``Batch.completion_span``: a multi-turn completion's observations included).
    """
    out = torch.zeros_like(completion_mask, dtype=torch.long)
    for b, (ids, text) in enumerate(zip(completion_ids, texts)):
        positions = completion_mask[b].nonzero().flatten()
        ends = [end for _, end in token_char_offsets(tokenizer, ids, text)]
        out[b, positions] = torch.tensor(ends, dtype=torch.long)
    return out


def completion_offsets(batch: Batch, b: int) -> Tuple[List[int], List[Span]]:
    """Row ``b``'s completion token positions in ``input_ids`` and their character spans."""
    if "char_ends" not in batch.tensors:
        raise UserError("a process reward needs the token offsets of sampled completions: use source=online")
    positions = batch.completion_span[b].nonzero().flatten().tolist()  # observations included: texts hold them
    ends = batch.tensors["char_ends"][b, positions].tolist()
    return positions, list(zip([0] + ends[:-1], ends))


def rule_step_verdicts(
    prompt: str, completion: str, answer: str, *, delimiter: str, checker: str, last_step_outcome: bool
) -> List[bool]:
    """One verdict per step (``split_steps(completion, delimiter)``) by a rule checker.

    ``arithmetic``: the embedded task's checker (the prompt is the question); ``calculator``: GSM8K's
    ``<<48/2=24>>`` annotations; ``auto``: arithmetic when the prompt is an arithmetic chain, else
    calculator. ``last_step_outcome``: the last step's verdict is the outcome rule instead (the
    output's final answer equals ``answer``), so an output that stops early is charged at its end.

    >>> rule_step_verdicts("2+3*4\\n", "2+3=5\\n5*4=21\\n#### 21", "20", delimiter="\\n", checker="auto",
    ...                    last_step_outcome=True)
    [True, False, False]
    """
    if checker == "auto":
        try:
            return rule_step_verdicts(
                prompt,
                completion,
                answer,
                delimiter=delimiter,
                checker="arithmetic",
                last_step_outcome=last_step_outcome,
            )
        except ValueError:
            checker = "calculator"
    if checker == "arithmetic":
        verdicts = check_arithmetic_steps(prompt, completion, delimiter=delimiter)  # ValueError: not a chain
    else:
        verdicts = check_calculator_annotations(completion, delimiter=delimiter)
    if verdicts and last_step_outcome:
        verdicts[-1] = answers_match(extract_answer(completion), answer)
    return verdicts


def step_ends(
    spans: Sequence[Span], verdicts: Sequence[bool], positions: Sequence[int], offsets: Sequence[Span]
) -> List[Tuple[int, bool]]:
    """``(input position of the step's last token, verdict)`` per step of one completion.

    An output with no step at all (blank, or EOS alone) is one incorrect step ending at its last
    token; one with no completion token has no step (its advantages are then 0). Steps whose last
    characters share a token (a token spanning a delimiter) are one step there, correct when all are.
    """
    if not positions:
        return []
    if not spans:
        return [(positions[-1], False)]
    ends = [positions[i] for i in step_end_token_indices(spans, offsets)]
    return [(p, all(v for _, v in same)) for p, same in groupby(zip(ends, verdicts), key=lambda x: x[0])]


def _model_position(completion_mask: torch.Tensor, p: int) -> int:
    """``p``, or the last position before it that the model wrote where ``p`` is an observation's."""
    while p > 0 and not completion_mask[p]:
        p -= 1
    return p


def place_steps(batch: Batch, steps: Sequence[Sequence[Tuple[int, float]]]) -> torch.Tensor:
    """Write ``step_rewards`` and ``step_mask`` [B, T-1] from each row's ``(input position, reward)``
    steps; return each row's mean step reward [B] (0 for a row without steps). A step that ends in a
    multi-turn completion's observation (never trained) is charged at the model's last token before it."""
    B, T = batch.input_ids.shape
    rewards, mask, summary = torch.zeros(B, T - 1), torch.zeros(B, T - 1), torch.zeros(B)
    for b, row in enumerate(steps):
        row = [(_model_position(batch.completion_mask[b], p), r) for p, r in row]
        row = [(p, r) for p, r in row if p >= 1]  # position 0 is no target (an empty prompt)
        for p, r in row:
            rewards[b, p - 1], mask[b, p - 1] = r, 1.0
        summary[b] = sum(r for _, r in row) / len(row) if row else 0.0
    batch.tensors.update(step_rewards=rewards, step_mask=mask)
    return summary


def rule_process_rewards(
    batch: Batch, *, delimiter: str, checker: str, correct: float, incorrect: float, last_step_outcome: bool
) -> torch.Tensor:
    """The rule process reward: ``correct`` / ``incorrect`` per step (see ``rule_step_verdicts``);
    sets ``step_rewards`` / ``step_mask``, returns the mean step reward per output [B]."""
    steps, verdict_count, right = [], 0, 0
    for b, (prompt, completion, answer) in enumerate(zip(batch.prompts, batch.completions, batch.answers)):
        try:
            verdicts = rule_step_verdicts(
                prompt, completion, answer, delimiter=delimiter, checker=checker, last_step_outcome=last_step_outcome
            )
        except ValueError as e:
            raise UserError(f"reward.checker=arithmetic: {e}; use reward.checker=calculator or auto") from None
        positions, offsets = completion_offsets(batch, b)
        ends = step_ends(split_steps(completion, delimiter), verdicts, positions, offsets)
        steps.append([(p, correct if ok else incorrect) for p, ok in ends])
        verdict_count, right = verdict_count + len(ends), right + sum(ok for _, ok in ends)
    batch.stats.update(steps_per_output=verdict_count / max(len(batch), 1), step_accuracy=right / max(verdict_count, 1))
    return place_steps(batch, steps)


def step_positions(batch: Batch, delimiter: str) -> List[List[int]]:
    """Per row, the input positions of its steps' last tokens (the same segmentation as the rule)."""
    out = []
    for b, completion in enumerate(batch.completions):
        positions, offsets = completion_offsets(batch, b)
        spans = split_steps(completion, delimiter)
        out.append([p for p, _ in step_ends(spans, [True] * len(spans), positions, offsets)])
    return out


def learned_process_rewards(
    batch: Batch, scores: torch.Tensor, *, delimiter: str, last_step_outcome: bool
) -> torch.Tensor:
    """A process reward model's step rewards: sigmoid of its score [B, T] at each step's last token
    (the probability the step is correct); sets ``step_rewards`` / ``step_mask`` like the rule.
    ``last_step_outcome``: the last step gets the answer rule's 1 or 0 instead, so an output that
    stops without a right final answer cannot collect the model's praise for its first steps."""
    probs = torch.sigmoid(scores.float().cpu())
    steps = [[(p, float(probs[b, p])) for p in row] for b, row in enumerate(step_positions(batch, delimiter))]
    if last_step_outcome:
        for row, completion, answer in zip(steps, batch.completions, batch.answers):
            if row:
                row[-1] = (row[-1][0], float(answers_match(extract_answer(completion), answer)))
    return place_steps(batch, steps)
