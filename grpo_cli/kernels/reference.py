"""The slow, obvious oracle for selected-token log-probs: materialises the full logits.

Shapes: N tokens, H hidden size, V vocabulary size.

``reference_selected_logprobs`` is what every fused path must agree with. It builds the [N, V]
logits in one piece, so it needs O(N * V) memory; use it in tests and for debugging only.
"""

from __future__ import annotations

import torch


def reference_selected_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "reference",
    ignore_index: int = -100,
):
    """log softmax(hidden @ weight.T + bias) / temperature) at ``token_ids``, the naive way.

    hidden [N, H], weight [V, H], token_ids [N] long, bias [V] or None. Computes in float32, or in
    float64 when the inputs are float64 (the tests' tight oracle). Rows whose id is ``ignore_index``
    get log-prob 0 and entropy 0 and no gradient. ``chunk_size`` and ``backend`` are accepted for
    signature parity with ``selected_logprobs`` and ignored.
    Returns logprobs [N], or (logprobs [N], entropy [N]) when ``with_entropy``.
    """
    del chunk_size, backend
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    valid = token_ids != ignore_index
    # Gather with a safe id on masked rows, then zero them: torch.where also zeroes their gradient.
    safe_ids = torch.where(valid, token_ids, torch.zeros_like(token_ids))
    logp = logp_all.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.where(valid, entropy, zero)
