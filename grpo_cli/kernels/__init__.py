"""Fused kernels for the RL hot path: log-probs of the selected tokens without [N, V] logits.

Shapes: N tokens, H hidden size, V vocabulary size.

    selected_logprobs(hidden [N, H], weight [V, H], token_ids [N], ...) -> logprobs [N] fp32
    reference_selected_logprobs(...)  the naive materialising oracle, same arguments

Triton is imported only when the triton backend is used, so this package works without it.
"""

from grpo_cli.kernels.dispatch import selected_logprobs
from grpo_cli.kernels.reference import reference_selected_logprobs

__all__ = ["selected_logprobs", "reference_selected_logprobs"]
