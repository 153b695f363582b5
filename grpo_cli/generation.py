"""Batched sampling with a KV cache: prefill the prompts once, then one model call per new token.

Prompts are left-padded; positions come from the attention mask so padding never shifts them.
Finished sequences (EOS seen) keep producing pad tokens that are masked out. ``temperature=0``
is greedy decoding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional

import torch

from grpo_cli.trainer.batch import position_ids


@dataclass
class Generation:
    prompt_ids: List[int]
    completion_ids: List[int]  # without padding; ends with EOS when the model stopped by itself
    text: str  # decoded completion, EOS removed
    finished: bool  # EOS was produced before max_new_tokens


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]):
    """Next token [B] from logits [B, V]: greedy at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token when the mass before it is below top_p (the most likely one is always kept).
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x), in and out; use the model's name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _generate_batch(model, prompt_ids, *, pad_id, eos_id, max_new_tokens, temperature, top_p, generator):
    device = next(model.parameters()).device
    T0 = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), T0), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for b, p in enumerate(prompt_ids):
        ids[b, T0 - len(p):] = torch.tensor(p, device=device)
        attn[b, T0 - len(p):] = 1
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=True)
    cache_arg = _cache_kwarg(model)
    past, logits = out[cache_arg], out.logits[:, -1]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    new_tokens = []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new_tokens.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        pos = attn.sum(-1, keepdim=True) - 1  # [B, 1] position of the token fed now
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{cache_arg: past})
        past, logits = out[cache_arg], out.logits[:, -1]
    return torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompt_ids]


def generate(
    model,
    tokenizer,
    prompts: List[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
) -> List[Generation]:
    """Sample one completion per prompt (repeat a prompt G times for a group)."""
    was_training = model.training
    model.eval()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    results: List[Generation] = []
    for i in range(0, len(prompts), batch_size):
        chunk = encoded[i : i + batch_size]
        rows = _generate_batch(
            model, chunk, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, generator=generator,
        )
        for p_ids, row in zip(chunk, rows):
            results.append(_finish(tokenizer, p_ids, row, eos_id))
    model.train(was_training)
    return results


def _finish(tokenizer, prompt_ids: List[int], row: List[int], eos_id: int) -> Generation:
    """Cut a generated row after its first EOS (kept, it is a trained token) and decode it."""
    finished = eos_id in row
    ids = row[: row.index(eos_id) + 1] if finished else row
    text = tokenizer.decode([t for t in ids if t != eos_id], skip_special_tokens=True)
    return Generation(prompt_ids, ids, text, finished)
