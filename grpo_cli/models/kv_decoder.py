"""A lean forward for Llama-family decoders (Qwen2, Llama) over a preallocated KV cache.

``model(...)`` in transformers is general: every call builds attention masks, grows a DynamicCache by
concatenation (copying the whole cache at every new token), recomputes the rotary tables and routes
keyword arguments through several decorators. :class:`KVDecoder` calls the same submodules (norms,
projections, MLP) and the model's own rotary and attention functions, so LoRA layers injected by
peft still apply and the arithmetic is the model's, and does everything else once per batch:

    cache   k, v: L x [B, Hkv, T_max, D], allocated once; a call writes its columns in place
    rotary  cos, sin: [T_max, D], from the model's rotary module
    masks   slices of one [B, T_max] key mask, built by the caller

Notation: B rows, S tokens fed in this call, L layers, Hkv key/value heads, D head size, T_max =
prompt + new tokens. Rows move in lockstep (prompts are left-padded), so the tokens of a call go to
the same columns ``start .. start + S - 1`` of every row; positions are per row.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from grpo_cli.models.load import is_peft

MODEL_TYPES = ("qwen2", "llama")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only
ATTENTION = ("sdpa", "eager")  # implementations whose mask is a plain [B, 1, S, T] tensor


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if is_peft(model) else model


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why :class:`KVDecoder` cannot run ``model`` (then use ``model(...)``), or None."""
    base = _base(model)
    cfg = getattr(base, "config", None)
    if getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    decoder = getattr(base, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")):
        return "unexpected module layout"
    if getattr(decoder.rotary_emb, "rope_type", None) not in STATIC_ROPE:
        return f"rope type {getattr(decoder.rotary_emb, 'rope_type', None)!r} is not one of {STATIC_ROPE}"
    if cfg._attn_implementation not in ATTENTION:
        return f"attention implementation {cfg._attn_implementation!r} is not one of {ATTENTION}"
    attn = decoder.layers[0].self_attn
    if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return "unexpected attention module layout (transformers too old?)"
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in decoder.layers):
        return "sliding-window attention"
    module = sys.modules[type(attn).__module__]
    if not all(hasattr(module, f) for f in ("apply_rotary_pos_emb", "eager_attention_forward")):
        return "no apply_rotary_pos_emb / eager_attention_forward in the model's module"
    return None


class KVDecoder:
    """``decoder(ids, positions, start, mask)`` -> logits of each row's last token [B, V]."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_len: int):
        base = _base(model)
        self.decoder, self.head = base.model, base.get_output_embeddings()
        weight = self.decoder.embed_tokens.weight
        attn = self.decoder.layers[0].self_attn
        kv_heads = base.config.num_key_value_heads
        shape = (len(self.decoder.layers), batch_size, kv_heads, max_len, attn.head_dim)
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v = torch.zeros_like(self.k)
        positions = torch.arange(max_len, device=weight.device)[None]  # [1, T_max]
        cos, sin = self.decoder.rotary_emb(self.k[0, :1, 0], positions)  # [1, T_max, D] each
        self.cos, self.sin = cos[0], sin[0]
        module = sys.modules[type(attn).__module__]
        self.rotate = module.apply_rotary_pos_emb
        impl = base.config._attn_implementation
        if impl == "sdpa":
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            self.attention, self.bool_mask = ALL_ATTENTION_FUNCTIONS["sdpa"], True
        else:
            self.attention, self.bool_mask = module.eager_attention_forward, False

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        """ids, positions [B, S]; mask [B, 1, S, start + S] bool (True: attend). Fills columns start.. of the cache."""
        if not self.bool_mask:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.k.dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(self.k.dtype).min)
        cos, sin = self.cos[positions], self.sin[positions]  # [B, S, D]
        x = self.decoder.embed_tokens(ids)  # [B, S, H]
        for i, layer in enumerate(self.decoder.layers):
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x), i, cos, sin, start, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.head(self.decoder.norm(x[:, -1]))  # [B, V]

    def _attention(self, attn, x, i: int, cos, sin, start: int, mask) -> torch.Tensor:
        B, S, _ = x.shape
        split = (B, S, -1, attn.head_dim)
        q = attn.q_proj(x).view(split).transpose(1, 2)  # [B, H, S, D]
        k = attn.k_proj(x).view(split).transpose(1, 2)  # [B, Hkv, S, D]
        v = attn.v_proj(x).view(split).transpose(1, 2)
        q, k = self.rotate(q, k, cos, sin)
        end = start + S
        self.k[i, :, :, start:end] = k
        self.v[i, :, :, start:end] = v
        out, _ = self.attention(attn, q, self.k[i, :, :, :end], self.v[i, :, :, :end], mask,
                                dropout=0.0, scaling=attn.scaling)  # [B, S, H, D]
        return attn.o_proj(out.reshape(B, S, -1))
