"""Sampling metrics of ``grpo eval``: pass@k (Chen et al., 2021) and maj@k (majority voting).

Pure functions over counts and extracted answers, so they are tested on hand-computed values:

    pass@k = E_questions[ 1 - C(n - c, k) / C(n, k) ]   n samples per question, c of them correct
    maj@k  = E_questions[ the most frequent answer among k samples equals the reference ]
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Union

from grpo_cli.rewards.answer import answers_match, parse_number


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the probability that at least one of k samples is correct, from n >= k
    samples of which c are correct: ``1 - C(n-c, k) / C(n, k)``.

    The binomials overflow floats for large n, so the ratio is taken as the product
    ``prod_{i=n-c+1}^{n} (1 - k / i)`` (Chen et al.'s numerically stable form).
    """
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    ratio = 1.0
    for i in range(n - c + 1, n + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


AnswerKey = Union[Fraction, str]


def answer_key(answer: str) -> AnswerKey:
    """What two answers share when they agree: their exact value if numeric ("72.0" and "72"), else
    their text without case, surrounding spaces or a final period."""
    number = parse_number(answer)
    if number is not None:
        return number
    return " ".join(answer.strip().rstrip(".").lower().split())


Match = Callable[[Optional[str], str], bool]


def _vote_keys(answers: Sequence[Optional[str]], match: Optional[Match]) -> List[Optional[AnswerKey]]:
    """Each answer's ballot: its :func:`answer_key`, or with ``match`` the first earlier spelling it
    matches (itself if none); None for no answer."""
    if match is None:
        return [answer_key(a) if a is not None else None for a in answers]
    firsts: List[str] = []
    keys: List[Optional[AnswerKey]] = []
    for a in answers:
        same = None if a is None else next((f for f in firsts if match(a, f)), None)
        if a is not None and same is None:
            firsts.append(a)
            same = a
        keys.append(same)
    return keys


def majority_vote(answers: Sequence[Optional[str]], match: Optional[Match] = None) -> Optional[str]:
    """The most frequent answer (None, no answer, does not vote); a tie goes to the answer seen
    first, so the vote is deterministic. Returns the first spelling of the winner, or None.

    Answers agree by :func:`answer_key`, or, given ``match`` (an answer checker's), when ``match``
    says an answer equals the first spelling of an earlier one (``\\frac12`` votes with ``0.5``)."""
    keys = _vote_keys(answers, match)
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    for answer, key in zip(answers, keys):  # first occurrence among the most frequent
        if key is not None and counts[key] == best:
            return answer
    return None  # unreachable: some key has the best count


def sampling_metrics(
    answers: Sequence[Sequence[Optional[str]]],
    references: Sequence[str],
    ks: Sequence[int],
    match: Optional[Match] = None,
) -> Dict[str, float]:
    """``maj@K`` and ``pass@K`` for each K, averaged over questions.

    ``answers[q]`` are the n extracted answers sampled for question q. pass@K uses all n samples
    (the unbiased estimator); maj@K votes over the first K of them, which are K i.i.d. samples.
    ``match``: the answer checker's comparison (default: the numeric rule), also used for the vote.
    """
    vote = majority_vote if match is None else lambda row: majority_vote(row, match)
    match = match or answers_match
    if not answers:
        raise ValueError("no questions")
    n = len(answers[0])
    correct: List[int] = [sum(match(a, ref) for a in row) for row, ref in zip(answers, references)]
    out: Dict[str, float] = {}
    for k in ks:
        votes = [match(vote(row[:k]), ref) for row, ref in zip(answers, references)]
        out[f"maj@{k}"] = sum(votes) / len(votes)
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
    return out
