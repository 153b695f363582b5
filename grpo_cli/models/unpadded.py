"""Hidden states of a padded batch that never run the projections and MLP on padding.

A training batch is left-padded to its longest prompt and right-padded to its longest completion:
in a GRPO batch over a third of the positions are padding. ``model(...)`` runs every position
through every projection and MLP; :func:`unpadded_hidden_states` gathers the N real tokens once
and runs the per-token work (embedding, norms, q/k/v/o projections, MLP) on [N, H] only. Only
attention needs the rows: q, k, v are scattered into a left-aligned [B, heads, L, D] layout (L the
longest row) for the model's own attention function, causal masking alone, and its output is
gathered back (under CPU bf16 autocast :func:`bf16_matmul_attention` instead, faster there). The
submodules are the model's
(LoRA layers injected by peft apply, dropout follows ``train()``), so the result equals
``decoder(...)`` at the real positions up to float rounding; padding positions come back as 0.

Notation: B rows, T positions, N real tokens (attention mask 1), H hidden size, D head size.
"""

from __future__ import annotations

from typing import Optional

import torch

from grpo_cli.models.kv_decoder import (_base, additive, attention_dtype, causal_mask, model_functions, norm,
                                        unsupported_reason)


def unpadded_unsupported(model: torch.nn.Module) -> Optional[str]:
    """Why :func:`unpadded_hidden_states` cannot run ``model`` (then use ``decoder(...)``), or None."""
    reason = unsupported_reason(model)
    if reason:
        return reason
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    decoder = _base(model).model  # FSDP2 wraps the decoder and its blocks (distributed.shard_blocks)
    if isinstance(decoder, FSDPModule) or isinstance(decoder.layers[0], FSDPModule):
        return "FSDP-sharded blocks gather their weights in their own forward"  # never bypass it
    return None


def unpadded_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] last hidden states at real positions, 0 at padding. input_ids, attention_mask [B, T]."""
    from grpo_cli.trainer.batch import position_ids

    base = _base(model)
    decoder = base.model
    B, T = input_ids.shape
    idx = attention_mask.reshape(-1).nonzero().squeeze(-1)  # [N] flat indices of the real tokens
    pos = position_ids(attention_mask).reshape(-1)[idx]  # [N] position of each in its row
    # Attention runs on the rows left-aligned: [B, L] with L the longest row, a row's tokens at its
    # positions 0..len-1 and padding after them. Causal masking alone then hides every padding key
    # from every real query (a padding key sits after the row's last real token), so SDPA needs no
    # mask and skips the masked half; padding queries' outputs are never gathered.
    L = int(attention_mask.sum(-1).max())
    slot = torch.div(idx, T, rounding_mode="floor") * L + pos  # [N] index in the [B * L] layout
    x = decoder.embed_tokens(input_ids.reshape(-1)[idx])  # [N, H]
    cos, sin = decoder.rotary_emb(x, pos[None])  # [1, N, D] each
    rotate, attention, bool_mask = model_functions(base)
    dtype = attention_dtype(decoder.embed_tokens.weight)
    real = torch.ones(1, L, dtype=torch.bool, device=x.device)
    dev = x.device.type
    if dev == "cpu" and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        attention, dtype = bf16_matmul_attention, torch.bfloat16
        mask = additive(causal_mask(real)[0, 0], dtype)  # [L, L]: 0 on and below the diagonal
    else:
        mask = None if bool_mask else additive(causal_mask(real), dtype)  # sdpa: is_causal; eager: [1, 1, L, L]
    # Under autocast every projection casts its input: cast once for q/k/v and once for gate/up, so
    # backward keeps one bf16 copy instead of three and two (the same values).
    compute = (lambda t: t.to(torch.get_autocast_dtype(dev))) if torch.is_autocast_enabled(dev) else (lambda t: t)
    shared = (cos[0], sin[0], slot, B, L, mask, dtype, compute, rotate, attention)
    for layer in decoder.layers:
        # trainer.activation_checkpointing (HF's gradient_checkpointing_enable sets these on each block):
        # keep only the block's input x [N, H] and recompute the block in backward.
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            x = layer._gradient_checkpointing_func(_block, layer, x, *shared)
        else:
            x = _block(layer, x, *shared)
    return Scatter.apply(norm(decoder.norm, x), idx, B * T).view(B, T, -1)


def _block(layer, x, cos, sin, slot, B: int, L: int, mask, dtype, compute, rotate, attention) -> torch.Tensor:
    """One decoder block on the real tokens x [N, H]; attention on the [B, heads, L, D] row layout."""
    attn, N = layer.self_attn, len(x)
    h = compute(norm(layer.input_layernorm, x))
    q = attn.q_proj(h).view(N, -1, attn.head_dim)  # [N, heads, D]
    k = attn.k_proj(h).view(N, -1, attn.head_dim)  # [N, kv heads, D]
    v = attn.v_proj(h).view(N, -1, attn.head_dim)
    q, k = rotate(q, k, cos, sin)  # cos [N, D] broadcasts over heads
    q, k, v = (_pad(t.to(dtype), slot, B, L) for t in (q, k, v))  # [B, heads, L, D]
    with torch.autocast(x.device.type, enabled=False):  # in attention_dtype, as the rollout's
        out, _ = attention(attn, q, k, v, mask, scaling=attn.scaling,
                           dropout=getattr(attn, "attention_dropout", 0.0) if attn.training else 0.0)  # [B, L, heads, D]
    x = x + attn.o_proj(out.reshape(B * L, -1).index_select(0, slot))
    return x + layer.mlp(compute(norm(layer.post_attention_layernorm, x)))


def bf16_matmul_attention(attn, q, k, v, mask, scaling: float, dropout: float = 0.0):
    """Causal attention as two bf16 matmuls and a softmax: ``softmax(q k^T * scaling + mask)`` times
    v. q [B, heads, L, D], k, v [B, kv heads, L, D] (bf16), mask [L, L] additive in q's dtype (0 where
    a query attends, the dtype's lowest value after it: :func:`additive` of the causal mask; an
    in-place add measured 3.6x cheaper than ``masked_fill_`` at [32, 8, 138, 138])
    -> ([B, L, heads, D], None), the attention functions' contract.

    For CPU bf16 autocast: CPU SDPA in fp32 took 19.3 + 43.4 ms forward + backward a layer at
    [32, 8, 138, 64], this 12.8 + 22.4 ms (AVX512-BF16 GEMMs; docs/performance.md). The price is the
    [B, heads, L, L] probabilities kept for backward: one block's worth under activation checkpointing."""
    groups = q.shape[1] // k.shape[1]  # grouped-query attention: each key/value head serves `groups`
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    scores = torch.matmul(q * scaling, k.transpose(-1, -2))  # [B, heads, L, L] in q's dtype
    # Softmax accumulates in fp32 whatever its input's dtype; its output is what the second matmul
    # reads (a bf16 copy of fp32 probabilities would round the same), so no fp32 [B, heads, L, L] exists.
    probs = torch.softmax(scores.add_(mask), dim=-1)
    if dropout:
        probs = torch.nn.functional.dropout(probs, dropout, training=True)
    return torch.matmul(probs.to(v.dtype), v).transpose(1, 2), None


class Scatter(torch.autograd.Function):
    """``rows`` zero rows with ``t`` [N, ...] at ``idx`` [N]. Unlike ``index_copy``, whose backward
    keeps the whole source alive, backward needs only ``idx``."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(idx)
        return t.new_zeros(rows, *t.shape[1:]).index_copy_(0, idx, t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad.index_select(0, idx), None, None


def _pad(t: torch.Tensor, slot: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """[N, heads, D] real tokens -> [B, heads, L, D], token n at flat row ``slot[n]``, zeros elsewhere."""
    return Scatter.apply(t, slot, B * L).view(B, L, *t.shape[1:]).transpose(1, 2)
