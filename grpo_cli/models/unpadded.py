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

Rows that begin with the same tokens (a GRPO group's G completions of one prompt) have the same
hidden states over that common prefix: a causal model's state at position p depends on positions
0..p only. Those tokens run once (:func:`prefix_owner`): the other rows' attention reads their keys
and values, and their hidden states are copied out (backward sums what every row sends them).

Notation: B rows, T positions, N real tokens (attention mask 1), U of them computed (N less those
in a prefix an earlier row shares), L the longest row, H hidden size, D head size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from grpo_cli.batch import position_ids
from grpo_cli.models.kv_decoder import additive, attention_dtype, causal_mask, model_functions, norm, unsupported_reason
from grpo_cli.models.load import unwrap_peft


def unpadded_unsupported(model: torch.nn.Module) -> Optional[str]:
    """Why :func:`unpadded_hidden_states` cannot run ``model`` (then use ``decoder(...)``), or None."""
    reason = unsupported_reason(model)
    if reason:
        return reason
    try:
        from torch.distributed.fsdp import FSDPModule  # deferred: torch.distributed's FSDP, only where it exists
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    decoder = unwrap_peft(model).model  # FSDP2 wraps the decoder and its blocks (distributed.shard_blocks)
    if isinstance(decoder, FSDPModule) or isinstance(decoder.layers[0], FSDPModule):
        return "FSDP-sharded blocks gather their weights in their own forward"  # never bypass it
    return None


def unpadded_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefixes: bool = True
) -> torch.Tensor:
    """[B, T, H] last hidden states at real positions, 0 at padding. input_ids, attention_mask [B, T].
    ``share_prefixes``: run the tokens rows share at their start once (:func:`prefix_owner`; never
    while dropout is active); false computes every row for itself, the same result up to rounding."""
    base = unwrap_peft(model)
    decoder = base.model
    B, T = input_ids.shape
    idx = attention_mask.reshape(-1).nonzero().squeeze(-1)  # [N] flat indices of the real tokens
    layout = RowLayout.of(input_ids, attention_mask, idx, share=share_prefixes and not _dropout_active(model))
    L = layout.L
    computed = idx if layout.real is None else idx[layout.computed]  # [U] flat indices of the tokens computed
    x = decoder.embed_tokens(input_ids.reshape(-1)[computed])  # [U, H]
    cos, sin = decoder.rotary_emb(x, (layout.slot % L)[None])  # [1, U, D] each: a slot's column is its position
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
    shared = (cos[0], sin[0], layout, mask, dtype, compute, rotate, attention)
    for layer in decoder.layers:
        # trainer.activation_checkpointing (HF's gradient_checkpointing_enable sets these on each block):
        # keep only the block's input x [U, H] and recompute the block in backward.
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            x = layer._gradient_checkpointing_func(_block, layer, x, *shared)
        else:
            x = _block(layer, x, *shared)
    return Scatter.apply(layout.real_tokens(norm(decoder.norm, x)), idx, B * T).view(B, T, -1)


def _dropout_active(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` draws dropout noise (then every row must draw its own: no sharing)."""
    if not model.training:
        return False
    for m in model.modules():
        rate = m.p if isinstance(m, torch.nn.Dropout) else getattr(m, "attention_dropout", 0.0)  # HF attention: a float
        if isinstance(rate, (int, float)) and rate > 0:
            return True
    return False


def _block(layer, x, cos, sin, layout: RowLayout, mask, dtype, compute, rotate, attention) -> torch.Tensor:
    """One decoder block on the computed tokens x [U, H]; attention on the [B, heads, L, D] row layout."""
    attn, U = layer.self_attn, len(x)
    h = compute(norm(layer.input_layernorm, x))
    q = attn.q_proj(h).view(U, -1, attn.head_dim)  # [U, heads, D]
    k = attn.k_proj(h).view(U, -1, attn.head_dim)  # [U, kv heads, D]
    v = attn.v_proj(h).view(U, -1, attn.head_dim)
    q, k = rotate(q, k, cos, sin)  # cos [U, D] broadcasts over heads
    q, k, v = (layout.rows(t.to(dtype)) for t in (q, k, v))  # [B, heads, L, D]
    with torch.autocast(x.device.type, enabled=False):  # in attention_dtype, as the rollout's
        out, _ = attention(
            attn,
            q,
            k,
            v,
            mask,
            scaling=attn.scaling,
            dropout=getattr(attn, "attention_dropout", 0.0) if attn.training else 0.0,
        )  # [B, L, heads, D]
    x = x + attn.o_proj(layout.tokens(out))
    return x + layer.mlp(compute(norm(layer.post_attention_layernorm, x)))


COMPARED_AT_ONCE = 2**24
"""Token pairs :func:`prefix_owner` compares at a time (bytes of its largest temporary)."""


def prefix_owner(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, L] long: for each row b and position p < lengths[b], the first row whose tokens 0..p equal
    row b's (b itself when no earlier row shares them); b at p >= lengths[b]. tokens [B, L] left-aligned
    (anything after a row's length), lengths [B].

    Example: rows "abcd", "abxy", "abcz" (length 4 each): the first two agree on "ab", the first and
    the third on "abc", so the owners are [0 0 0 0], [0 0 1 1], [0 0 0 2]."""
    B, L = tokens.shape
    lcp = torch.empty(B, B, dtype=torch.long, device=tokens.device)  # common prefix length of every pair
    chunk = max(1, COMPARED_AT_ONCE // max(1, B * L))  # rows of the [chunk, B, L] comparison at a time
    for c in range(0, B, chunk):
        differ = tokens[c : c + chunk, None, :] != tokens[None, :, :]  # [c, B, L]
        differ = torch.cat([differ, differ.new_ones(*differ.shape[:2], 1)], -1)  # a row always ends
        lcp[c : c + chunk] = differ.to(torch.uint8).argmax(-1)  # first differing position
    lcp = torch.minimum(lcp, torch.minimum(lengths[:, None], lengths[None, :]))  # padding never matches
    # owner(b, p) = the first b' with lcp[b, b'] > p: the number of b' whose running maximum of lcp
    # (non-decreasing along b') is still <= p.
    reach = lcp.cummax(dim=1).values.contiguous()
    pos = torch.arange(L, device=tokens.device).expand(B, L).contiguous()
    owner = torch.searchsorted(reach, pos, right=True)
    return torch.where(pos < lengths[:, None], owner, torch.arange(B, device=tokens.device)[:, None])


@dataclass
class RowLayout:
    """Where the tokens a forward computes sit in the left-aligned [B, L] rows attention runs on.

    Attention runs on the rows left-aligned: [B, L] with L the longest row, a row's tokens at its
    positions 0..len-1 and padding after them. Causal masking alone then hides every padding key
    from every real query (a padding key sits after the row's last real token), so SDPA needs no
    mask and skips the masked half; padding queries' outputs are never read.

    computed [N] bool: which real tokens are computed (U of them; the rest share an earlier row's
    prefix); slot [U]: each computed token's index in [B * L]; source [B * L] or None: the computed
    token each slot reads (a shared prefix's slots read its owner's; padding slots token 0, never
    attended), None when every real token is computed (then slots take them one to one, zeros
    elsewhere); real [N] or None: the computed token holding each real token's hidden state."""

    B: int
    L: int
    computed: torch.Tensor
    slot: torch.Tensor
    source: Optional[torch.Tensor]
    real: Optional[torch.Tensor]

    @staticmethod
    def of(input_ids: torch.Tensor, attention_mask: torch.Tensor, idx: torch.Tensor, share: bool) -> RowLayout:
        """The layout of a [B, T] batch whose real tokens are at flat indices idx [N]."""
        B, T = input_ids.shape
        lengths = attention_mask.sum(-1)
        L = int(lengths.max())
        pos = position_ids(attention_mask).reshape(-1)[idx]  # [N] position of each in its row
        slot = torch.div(idx, T, rounding_mode="floor") * L + pos  # [N] index in the [B * L] layout
        everything = torch.ones_like(slot, dtype=torch.bool)
        if not share or B == 1:
            return RowLayout(B, L, everything, slot, None, None)
        tokens = input_ids.new_full((B * L,), -1).index_copy_(0, slot, input_ids.reshape(-1)[idx]).view(B, L)
        owner = prefix_owner(tokens, lengths)  # [B, L]
        owner_slot = (owner * L + torch.arange(L, device=slot.device)).reshape(-1)  # [B * L]
        computed = owner_slot[slot] == slot  # [N]
        if bool(computed.all()):
            return RowLayout(B, L, everything, slot, None, None)
        kept = slot[computed]  # [U], increasing
        index = torch.zeros(B * L, dtype=torch.long, device=slot.device)
        index[kept] = torch.arange(len(kept), device=slot.device)  # slot -> computed token (0 elsewhere)
        source = index[owner_slot]  # [B * L]
        return RowLayout(B, L, computed, kept, source, source[slot])

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """[U, heads, D] computed tokens -> [B, heads, L, D] rows."""
        if self.source is None:
            flat = Scatter.apply(t, self.slot, self.B * self.L)
        else:
            flat = t.index_select(0, self.source)  # backward sums each shared token's grads over its rows
        return flat.view(self.B, self.L, *t.shape[1:]).transpose(1, 2)

    def tokens(self, out: torch.Tensor) -> torch.Tensor:
        """[B, L, heads, D] attention output -> [U, heads * D] at the computed tokens."""
        return out.reshape(self.B * self.L, -1).index_select(0, self.slot)

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[U, H] computed tokens -> [N, H] every real token's hidden state."""
        return x if self.real is None else x.index_select(0, self.real)


def bf16_matmul_attention(attn, q, k, v, mask, scaling: float, dropout: float = 0.0):
    """Causal attention as two bf16 matmuls and a softmax: ``softmax(q k^T * scaling + mask)`` times
    v. q [B, heads, L, D], k, v [B, kv heads, L, D] (bf16), mask [L, L] additive in q's dtype (0 where
    a query attends, the dtype's lowest value after it: :func:`additive` of the causal mask; added
    in place, cheaper than ``masked_fill_``)
    -> ([B, L, heads, D], None), the attention functions' contract.

    For CPU bf16 autocast: faster than CPU SDPA in fp32, forward and backward, where the CPU has bf16
    GEMMs (AVX512-BF16; docs/performance.md, "bf16 training attention"). The price is the
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
