"""The unit of every data source: a question with its prompt, reference solution and final answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Example:
    question: str
    """The question as written in the data."""
    prompt: str
    """The text given to the model; the completion starts right after it."""
    solution: Optional[str]
    """Reference completion (SFT target) in its task's format: GSM8K-style ones end with a line
    ``#### <answer>``, MATH ones box their answer (``\\boxed{}``); None if absent."""
    answer: str
    """The final answer, as text (compared numerically by the outcome reward)."""
    columns: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Every field of the data row the example came from (``reward=functions`` hands them to the
    user's reward functions as TRL does); empty for data without rows. Read-only by convention."""
