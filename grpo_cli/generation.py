"""Batched sampling with a KV cache: prefill the prompts once, then one model call per new token.

Prompts are left-padded; positions come from the attention mask so padding never shifts them.
Finished sequences (EOS seen) produce pad tokens; the fast engine also drops them from its batch.
``temperature=0`` is greedy decoding. Two engines give the same tokens:

* ``fast`` (the rollout engine): :class:`~grpo_cli.models.kv_decoder.KVDecoder`, a preallocated
  cache written in place and masks and rotary tables built once per batch; a step is one decoder
  call, the sampling rule and a few [B] tensor ops; once a quarter of the rows have finished they
  leave the batch and the cache. Used for the model families it covers.
* ``reference`` (the oracle, and the engine for every other model): ``model(...)`` with the
  DynamicCache that transformers grows by one column per token.

A third, optional engine samples the same distribution with other draws: ``vllm``
(:mod:`grpo_cli.models.vllm_rollout`, on a CUDA GPU with the ``vllm`` package installed).

Multi-turn rollouts (``rollout.tools`` / ``rollout.environment``, :mod:`grpo_cli.tools`) go through
:func:`_turn_loop`, which both of our engines share: a row whose turn ended gets the environment's
observation appended and prefilled into the engine's cache in the call that feeds its sampled token
(ragged rows right-aligned, holes masked), so no prefix is ever recomputed; the tokens equal those of
an oracle that recomputes every prefix (tests/test_multiturn.py). The plain path is untouched.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf

from grpo_cli.batch import Batch, pack, position_ids
from grpo_cli.config.schema import RolloutConfig
from grpo_cli.data.chat import stop_tokens
from grpo_cli.data.types import Example
from grpo_cli.errors import UserError
from grpo_cli.models.kv_decoder import KVDecoder, causal_mask, step_read_mib, unsupported_reason
from grpo_cli.models.vllm_rollout import VLLM_OPTIONS, check_vllm, generate_vllm, generate_vllm_turns
from grpo_cli.rewards.checkers import NUMERIC, AnswerChecker
from grpo_cli.tools.base import Environment, Turns
from grpo_cli.tools.environments import EnvironmentTurns, build_environment

ENGINES = ("auto", "fast", "reference", "vllm")
COMPACT_FRACTION = 0.25
"""The fast engine drops finished rows from its batch and cache once this share of them has
finished: a copy of the filled cache columns, paid back by the steps the finished rows no longer take."""


@dataclass
class Generation:
    prompt_ids: List[int]
    completion_ids: List[int]  # without padding; ends with EOS when the model stopped by itself
    text: str  # decoded completion, EOS removed
    finished: bool  # EOS was produced before max_new_tokens
    logprobs: Optional[List[float]] = None
    """The log-prob of each completion token as the engine sampled it (:func:`sampled_logprob`),
    aligned with ``completion_ids``; None where the engine could not give it (some vLLM settings).
    0.0 on observation tokens (multi-turn rollouts: no model sampled them)."""
    model_written: Optional[List[bool]] = None
    """Multi-turn rollouts: per completion token, whether the model wrote it (False on the
    environment's observations, which are never trained); None: every token is the model's."""
    turns: int = 1
    """The model's turns: observations appended + 1."""


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, uniform: Optional[torch.Tensor]):
    """Next token [B] from logits [B, V]: greedy at temperature 0, else temperature + nucleus sampling.

    ``uniform`` [B] in [0, 1) drives the draw (inverse CDF: the first token whose cumulative
    probability exceeds ``uniform * kept mass``). Drawing it per original row and step, outside this
    function, keeps a row's tokens independent of which other rows are still in the batch."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token when the mass before it is below top_p (the most likely one is always kept).
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    cdf = probs.cumsum(-1)  # [B, V]; the kept mass is cdf[:, -1] (no renormalisation needed)
    nxt = torch.searchsorted(cdf, uniform[:, None].to(cdf.dtype) * cdf[:, -1:], right=True).squeeze(-1)
    return nxt.clamp_(max=probs.shape[-1] - 1)  # u * mass can round up to the mass itself


def sampled_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B] float32 log-prob of ``tokens`` [B] under softmax(logits [B, V] / T') over the whole
    vocabulary, T' = ``temperature`` if > 0 else 1 (greedy): what the trainer's
    ``policy.logprobs(batch, temperature=batch.totals["temperature"])`` computes for the same token.
    Not the top-p-truncated distribution: top-p changes which tokens are drawn, not the log-prob the
    trainer scores them with, so the drift between the two stays comparable whatever ``top_p``.
    One log-softmax over V on the logits already computed (on CPU twice as fast as ``logsumexp``, whose
    kernel is not vectorised the same way) and a gather; no random draw."""
    scaled = logits.float()  # [B, V]
    if temperature > 0 and temperature != 1.0:  # T' = 1 needs no [B, V] copy
        scaled = scaled / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def uniforms(n: int, temperature: float, generator: Optional[torch.Generator], device) -> Optional[torch.Tensor]:
    """[n] uniform draws of one step (None when greedy: greedy decoding draws nothing)."""
    return None if temperature <= 0 else torch.rand(n, generator=generator, device=device)


def _left_pad(prompt_ids: List[List[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, attention mask [B, T0] of left-padded prompts."""
    T0 = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), T0), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, p in enumerate(prompt_ids):
        ids[b, T0 - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[b, T0 - len(p) :] = 1
    return ids.to(device), attn.to(device)


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x), in and out; use the model's name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _generate_reference(model, prompt_ids, *, pad_id, eos_id, max_new_tokens, temperature, top_p, generator):
    """The oracle: ``model(...)`` per token, the attention mask and DynamicCache growing by a column.
    Returns (tokens [B, N] long, pad after the stop; their :func:`sampled_logprob` [B, N], 0 after the stop)."""
    ids, attn = _left_pad(prompt_ids, pad_id, next(model.parameters()).device)
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=True)
    cache_arg = _cache_kwarg(model)
    past, logits = out[cache_arg], out.logits[:, -1]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=ids.device)
    stops = _stop_tensor(eos_id, ids.device)
    new_tokens, new_logp = [], []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, uniforms(len(done), temperature, generator, ids.device))
        new_logp.append(sampled_logprob(logits, nxt, temperature).masked_fill_(done, 0.0))
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new_tokens.append(nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        pos = attn.sum(-1, keepdim=True) - 1  # [B, 1] position of the token fed now
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{cache_arg: past})
        past, logits = out[cache_arg], out.logits[:, -1]
    if not new_tokens:
        return _no_tokens(len(prompt_ids), ids.device)
    return torch.stack(new_tokens, dim=1), torch.stack(new_logp, dim=1)


def _no_tokens(B: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, log-probs) of a rollout of no new tokens: [B, 0] each."""
    return torch.zeros(B, 0, dtype=torch.long, device=device), torch.zeros(B, 0, device=device)


@dataclass
class TurnRollout:
    """What an engine returns for a multi-turn batch (:class:`~grpo_cli.tools.base.Turns`), per row:
    its completion ids (model and observation tokens, no padding), their log-probs (0.0 on
    observations), which tokens the model wrote, and whether the row stopped by itself (a stop token,
    or the environment said done) rather than at ``max_new_tokens``."""

    tokens: List[List[int]]
    logprobs: Optional[List[List[float]]]  # None where the engine could not give them (vLLM)
    model_written: List[List[bool]]
    stopped: List[bool]


def ragged_chunk(chunks: List[List[int]], next_pos: List[int], pad_id: int, device):
    """ids [B, S], real [B, S] bool, positions [B, S] of one call feeding each row its own tokens
    (the sampled token, then any observation), right-aligned so that column S - 1 is each fed row's
    last token (whose logits sample next); the holes in front are masked out as keys and never read
    as queries. A row fed nothing (it ended, not yet dropped) is all holes. ``next_pos``: each row's
    next position, advanced here by its real tokens."""
    B, S = len(chunks), max(1, max(len(c) for c in chunks))
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    real = torch.zeros(B, S, dtype=torch.bool)
    pos = torch.zeros(B, S, dtype=torch.long)
    for b, c in enumerate(chunks):
        if c:
            ids[b, S - len(c) :] = torch.tensor(c, dtype=torch.long)
            real[b, S - len(c) :] = True
            pos[b, S - len(c) :] = torch.arange(next_pos[b], next_pos[b] + len(c))
        pos[b, : S - len(c)] = next_pos[b]  # holes: any position (masked), one in range
        next_pos[b] += len(c)
    return ids.to(device), real.to(device), pos.to(device)


class _RowState:
    """Host-side state of one row of a multi-turn rollout."""

    def __init__(self):
        self.tokens: List[int] = []
        self.logp: List[float] = []
        self.model: List[bool] = []
        self.stopped = False

    def add(self, tokens: List[int], logp: List[float], model: bool) -> None:
        self.tokens += tokens
        self.logp += logp
        self.model += [model] * len(tokens)


def _turn_step(turns, row: int, state: _RowState, token: int, logp: float, stops, max_new_tokens: int):
    """Record a sampled token of ``row``: ``[token]`` to feed next, ``PAUSED`` (its turn ended: the
    environment answers it, :func:`_answer`), or None: the row is done (a stop token, or the budget
    is spent: ``max_new_tokens`` bounds model and observation tokens together)."""
    state.add([token], [logp], True)
    if token in stops:
        state.stopped = True
        return None
    if len(state.tokens) >= max_new_tokens:
        return None
    return PAUSED if turns.pauses(row, state.tokens) else [token]


PAUSED: List[int] = []
""":func:`_turn_step`'s mark of a row whose turn ended (compared by identity)."""


def _answer(turns, paused: List[int], rows: List[int], states: List[_RowState], chunks, max_new_tokens: int) -> None:
    """The observations of the batch rows ``paused`` at this step, asked together
    (``Turns.observe_many``): each row's chunk becomes its token and observation, or None (the
    environment says done, or the budget is spent: an observation that does not fit is cut)."""
    answers = turns.observe_many([rows[j] for j in paused], [states[rows[j]].tokens for j in paused])
    for j, obs in zip(paused, answers):
        state = states[rows[j]]
        if obs is None:
            state.stopped = True
            chunks[j] = None
            continue
        obs = obs[: max_new_tokens - len(state.tokens)]
        state.add(obs, [0.0] * len(obs), False)
        chunks[j] = None if len(state.tokens) >= max_new_tokens else [state.tokens[-len(obs) - 1]] + obs


def _turn_loop(feed, keep, logits, next_pos, turns, *, pad_id, eos_id, max_new_tokens, temperature, top_p, generator):
    """The multi-turn decode loop every engine shares (host side): sample a token for each row still
    going, let the environment answer the rows whose turn ended, and feed each row its token and
    observation in one ragged call (:func:`ragged_chunk`), so a continued turn prefills only the
    appended tokens, never the prefix. ``feed(ids, real, positions)`` -> logits [B', V] of the rows
    still in the batch; ``keep(rows)`` (or None: rows never leave) drops ended rows from the engine.
    The draws are one [B] per step, as the single-turn engines'. Returns a :class:`TurnRollout`."""
    B, device = len(logits), logits.device
    states = [_RowState() for _ in range(B)]
    rows = list(range(B))  # the original row of each batch row
    ended = [False] * B  # per batch row
    for _ in range(max_new_tokens):
        u = uniforms(B, temperature, generator, device)
        index = torch.tensor(rows, device=device)
        nxt = sample_next(logits, temperature, top_p, None if u is None else u[index])
        logp = sampled_logprob(logits, nxt, temperature).tolist()
        chunks = [
            None if ended[j] else _turn_step(turns, r, states[r], token, logp[j], eos_id, max_new_tokens)
            for j, (r, token) in enumerate(zip(rows, nxt.tolist()))
        ]
        _answer(turns, [j for j, c in enumerate(chunks) if c is PAUSED], rows, states, chunks, max_new_tokens)
        ended = [c is None for c in chunks]
        chunks = [c or [] for c in chunks]
        if all(ended):
            break
        if keep is not None and sum(ended) >= COMPACT_FRACTION * len(rows):  # drop ended rows
            live = [j for j, e in enumerate(ended) if not e]
            keep(torch.tensor(live, device=device))
            rows, chunks, next_pos = [rows[j] for j in live], [chunks[j] for j in live], [next_pos[j] for j in live]
            ended = [False] * len(rows)
        logits = feed(*ragged_chunk(chunks, next_pos, pad_id, device))
    return TurnRollout(
        [s.tokens for s in states], [s.logp for s in states], [s.model for s in states], [s.stopped for s in states]
    )


@torch.no_grad()
def _generate_reference_turns(
    model, prompt_ids, turns, *, pad_id, eos_id, max_new_tokens, temperature, top_p, generator
):
    """The reference loop with turns: ``model(...)`` on the HF cache, each call feeding the rows'
    ragged chunks (:func:`ragged_chunk`) with their holes as 0 in the attention mask."""
    ids, attn = _left_pad(prompt_ids, pad_id, next(model.parameters()).device)
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=True)
    cache_arg = _cache_kwarg(model)
    state = {"past": out[cache_arg], "attn": attn}

    def feed(chunk, real, pos):
        state["attn"] = torch.cat([state["attn"], real.long()], dim=1)
        kwargs = {cache_arg: state["past"]}
        out = model(input_ids=chunk, attention_mask=state["attn"], position_ids=pos, use_cache=True, **kwargs)
        state["past"] = out[cache_arg]
        return out.logits[:, -1]

    next_pos = attn.sum(-1).tolist()
    options = dict(pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens, temperature=temperature)
    return _turn_loop(feed, None, out.logits[:, -1], next_pos, turns, top_p=top_p, generator=generator, **options)


class _FastFeed:
    """The fast engine's side of :func:`_turn_loop`: each call writes its S columns of every row at
    the same cache columns (holes masked out of ``keys``), growing the cache when holes fill it."""

    def __init__(self, decoder: KVDecoder, keys: torch.Tensor, filled: int):
        self.decoder, self.keys, self.filled = decoder, keys, filled

    def __call__(self, ids: torch.Tensor, real: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        S, start = ids.shape[1], self.filled
        if start + S > self.keys.shape[1]:
            size = max(start + S, self.keys.shape[1] * 3 // 2)
            self.decoder.grow(size, start)
            self.keys = torch.cat([self.keys, self.keys.new_zeros(len(self.keys), size - self.keys.shape[1])], 1)
        self.keys[:, start : start + S] = real
        columns = torch.arange(start + S, device=ids.device)
        causal = columns[None, :] <= start + torch.arange(S, device=ids.device)[:, None]  # [S, start + S]
        self.filled += S
        return self.decoder(ids, pos, start, self.keys[:, None, None, : start + S] & causal)

    def keep(self, rows: torch.Tensor) -> None:
        self.decoder.keep_rows(rows, self.filled)
        self.keys = self.keys[rows]


FAST_OPTIONS = ("cuda_graphs", "packed_weights", "compile_decode_step", "compile_decode_min_mib")
"""The fast engine's switches: :func:`_generate_fast`'s keyword arguments named as the rollout config's fields."""
FAST_BENCH_OPTIONS = ("whole_step",)
"""The fast engine's keyword arguments that no config field sets: variants benchmarks compare."""


@torch.no_grad()  # not inference_mode: under it autocast re-casts every weight at every step
def _generate_fast(
    model,
    prompt_ids,
    *,
    pad_id,
    eos_id,
    max_new_tokens,
    temperature,
    top_p,
    generator,
    cuda_graphs=True,
    packed_weights=True,
    compile_decode_step=True,
    compile_decode_min_mib=RolloutConfig.compile_decode_min_mib,
    whole_step=True,
    turns=None,
):
    """The rollout engine: prefill and then one KVDecoder call per token over a preallocated cache
    (on a GPU, with ``cuda_graphs``, one CUDA graph replay per token; on a CPU, with
    ``packed_weights``, from fused oneDNN-packed projections, and with ``compile_decode_step`` each
    step compiled, whole or its attention alone, where what a step reads, the batch's cache and the
    weights, reaches ``compile_decode_min_mib``). ``whole_step=False``: attention alone even with packed weights
    (:class:`~grpo_cli.models.kv_decoder.KVDecoder`). Returns (tokens, log-probs) as :func:`_generate_reference`.
    With ``turns`` (multi-turn rollouts) a :class:`TurnRollout` from :func:`_turn_loop`, decoded eagerly
    (CUDA graphs need every step's shapes fixed; an observation's prefill is not)."""
    ids, attn = _left_pad(prompt_ids, pad_id, next(model.parameters()).device)
    (B, T0), device = ids.shape, ids.device
    if max_new_tokens <= 0:
        return _no_tokens(B, device)
    compiled = compile_decode_step and step_read_mib(model, B, T0 + max_new_tokens) >= compile_decode_min_mib
    decoder = KVDecoder(model, B, T0 + max_new_tokens, packed=packed_weights, compiled=compiled, whole_step=whole_step)
    keys = torch.ones(B, T0 + max_new_tokens, dtype=torch.bool, device=device)  # real keys; new ones all are
    keys[:, :T0] = attn.bool()
    pos = position_ids(attn)  # [B, T0]
    logits = _prefill(decoder, ids, attn, pos, prompt_ids)
    if turns is not None:
        fed = _FastFeed(decoder, keys, T0)
        options = dict(pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens, temperature=temperature)
        next_pos = (pos[:, -1] + 1).tolist()
        return _turn_loop(fed, fed.keep, logits, next_pos, turns, top_p=top_p, generator=generator, **options)
    decode = _decode_graphed if cuda_graphs and device.type == "cuda" else _decode_eager
    return decode(
        decoder,
        logits,
        pos[:, -1:] + 1,
        keys,
        T0,
        pad_id=pad_id,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
    )


def _prefill(decoder: KVDecoder, ids, attn, pos, prompt_ids: List[List[int]]) -> torch.Tensor:
    """The prompts into the decoder's cache; the logits [B, V] of each row's last prompt token. A
    group's G copies of a prompt: each distinct prompt is prefilled once, then its cache rows copied."""
    B, T0 = ids.shape
    first, copies = distinct_rows(prompt_ids)
    if len(first) == B:
        return decoder(ids, pos, 0, causal_mask(attn.bool()))
    first, copies = torch.tensor(first, device=ids.device), torch.tensor(copies, device=ids.device)
    decoder.keep_rows(first, 0)
    logits = decoder(ids[first], pos[first], 0, causal_mask(attn[first].bool()))[copies]
    decoder.copy_rows(copies, T0)
    return logits


def distinct_rows(prompt_ids: List[List[int]]) -> tuple[List[int], List[int]]:
    """(first, copies): the index of each distinct prompt's first occurrence, in order, and for every
    prompt the position in ``first`` of its own. [[1], [2], [1]] -> ([0, 1], [0, 1, 0])."""
    seen: dict = {}  # prompt -> its position in first
    first: List[int] = []
    copies: List[int] = []
    for b, prompt in enumerate(prompt_ids):
        if tuple(prompt) not in seen:
            seen[tuple(prompt)] = len(first)
            first.append(b)
        copies.append(seen[tuple(prompt)])
    return first, copies


def _decode_eager(decoder, logits, pos, keys, T0, *, pad_id, eos_id, max_new_tokens, temperature, top_p, generator):
    """([B, <= N] new tokens, their log-probs): one decoder call per token; finished rows leave the
    batch and the cache. logits [B, V] of the prompts' last tokens; pos [B, 1] position of the first
    new token. The log-prob of a step is taken from the logits it samples from, after the decoder
    call (compiled or not): one log-softmax over V."""
    B, device = len(logits), logits.device
    rows = torch.arange(B, device=device)  # the original row of each row still decoded
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros(B, max_new_tokens, device=device)  # float32
    stops = _stop_tensor(eos_id, device)
    check_every = 1 if device.type == "cpu" else 8  # reading `done` is a device sync on GPUs
    for i in range(max_new_tokens):
        u = uniforms(B, temperature, generator, device)  # one draw per original row, as the reference
        nxt = sample_next(logits, temperature, top_p, None if u is None else u[rows]).masked_fill_(done, pad_id)
        out[rows, i] = nxt
        logp[rows, i] = sampled_logprob(logits, nxt, temperature).masked_fill_(done, 0.0)
        done |= torch.isin(nxt, stops)
        if i + 1 == max_new_tokens:
            break
        if (i + 1) % check_every == 0:
            finished = int(done.sum())
            if finished == len(rows):
                break
            if finished >= COMPACT_FRACTION * len(rows):  # drop finished rows: their steps are wasted work
                keep = (~done).nonzero().squeeze(-1)
                rows, nxt, pos, keys, done = rows[keep], nxt[keep], pos[keep], keys[keep], done[keep]
                decoder.keep_rows(keep, T0 + i)
        logits = decoder(nxt[:, None], pos + i, T0 + i, keys[:, None, None, : T0 + i + 1])
    return out[:, : i + 1], logp[:, : i + 1]


GRAPH_WARMUP = 2
"""Eager decode steps (on a side stream) before the step is captured: cuBLAS handles, the allocator
and autocast's weight casts are set up outside the graph."""


def _decode_graphed(
    decoder, logits, pos, keys, T0, *, pad_id, eos_id, max_new_tokens, temperature, top_p, generator, capture=True
):
    """``_decode_eager`` on a GPU as one CUDA graph replayed per token: a decode step is ~15 small
    kernels per layer, so launching them from Python costs more than running them. A graph needs the
    same shapes at every step: every row stays in the batch (a finished one feeds and emits pad), the
    column written is a device tensor and attention spans the whole cache with later columns masked.
    The sampling draws are made outside the graph, one [B] draw per step as in the other engines, so
    the same generator gives the same tokens. Each step also writes its tokens' log-probs into a buffer,
    inside the graph. ``capture=False`` runs the same step eagerly (the CPU
    tests' view of it)."""
    B, device, N = len(logits), logits.device, max_new_tokens
    decoder.zero_after(T0)  # the step reads every column, the unwritten ones masked
    out = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros(B, N, device=device)  # float32
    u = uniforms(B, temperature, generator, device)
    nxt = sample_next(logits, temperature, top_p, u)  # token 0, from the prefill's logits
    out[:, 0] = nxt
    logp[:, 0] = sampled_logprob(logits, nxt, temperature)
    stops = _stop_tensor(eos_id, device)
    done = torch.isin(nxt, stops)
    i = torch.zeros(1, dtype=torch.long, device=device)  # the token fed by the next step
    columns = torch.arange(keys.shape[1], device=device)

    def step():  # feed token i, sample token i + 1; every tensor it reads or writes lives outside
        logits = decoder(nxt[:, None], pos + i, T0 + i, (keys & (columns <= T0 + i))[:, None, None, :])
        i.add_(1)
        new = sample_next(logits, temperature, top_p, u)
        logp.index_copy_(1, i, sampled_logprob(logits, new, temperature).masked_fill_(done, 0.0)[:, None])
        new.masked_fill_(done, pad_id)
        out.index_copy_(1, i, new[:, None])
        done.logical_or_(torch.isin(new, stops))
        nxt.copy_(new)

    def draw():  # this step's uniforms into the buffer the step reads
        if u is not None:
            torch.rand(B, generator=generator, device=device, out=u)

    graphed = capture and N - 1 > GRAPH_WARMUP  # else the warm-up takes every step: nothing to replay
    replay, taken = _graphed(step, draw, GRAPH_WARMUP) if graphed else (step, 1)
    for t in range(taken, N):
        if (t - taken) % 8 == 0 and bool(done.all()):  # a host sync: only every 8 steps
            return out[:, :t], logp[:, :t]
        draw()
        replay()
    return out, logp


def _graphed(step, draw, warmup: int):
    """(replay, tokens so far): ``step`` run ``warmup`` times on a side stream, then captured there."""
    side = side_stream(torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            draw()
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()
    return graph.replay, warmup + 1


@functools.cache
def side_stream(device: int) -> torch.cuda.Stream:
    """The one stream of every rollout's warm-up and capture on a GPU. cuBLAS keeps a workspace for
    each stream it has run on until the process ends: a new stream per rollout (and torch's own
    capture stream beside it) kept a new set of workspaces allocated at every GRPO step
    (docs/performance.md, "a leak of GPU memory at every rollout")."""
    return torch.cuda.Stream(device=device)


def generate_ids(
    model,
    prompt_ids: List[List[int]],
    *,
    pad_id: int,
    eos_id: Union[None, int, Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    engine: str = "auto",
    with_logprobs: bool = False,
    turns: Optional[Turns] = None,
    **engine_options,
) -> Union[List[List[int]], Tuple[List[List[int]], Optional[List[List[float]]]], TurnRollout]:
    """New token ids of one batch of prompts, [B] rows of up to max_new_tokens (pad after the stop).
    ``with_logprobs``: (those rows, each token's :func:`sampled_logprob` in rows of the same
    length, 0.0 on padding), the log-probs None where the engine cannot give them (vLLM:
    :func:`~grpo_cli.models.vllm_rollout.generate_vllm`). The tokens are the same either way.

    ``eos_id``: the token, or tokens, that end a row (EOS and a chat template's end of turn: a row
    stops at whichever comes first, kept as its last token); ``None`` never stops early
    (fixed-length benchmarks). ``engine``: ``auto`` (``fast`` when
    the model is supported, else ``reference``), ``fast``, ``reference`` or ``vllm``.
    ``engine_options``: the switches of the fast engine (:data:`FAST_OPTIONS`) and of vLLM's
    (``VLLM_OPTIONS``), each documented as the ``rollout.`` field of the same name, and the fast
    engine's benchmark variants (:data:`FAST_BENCH_OPTIONS`); an engine ignores the others'
    switches, and the reference loop has none.

    ``turns`` (multi-turn rollouts, :class:`~grpo_cli.tools.base.Turns`): rows pause where a model
    turn ends and continue after the environment's observation, prefilled into the engine's cache
    (the prefix is never recomputed); returns a :class:`TurnRollout` instead. The fast engine then
    decodes eagerly (no CUDA graphs); vLLM takes a new request per turn.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    fast_options = FAST_OPTIONS + FAST_BENCH_OPTIONS
    unknown = sorted(set(engine_options) - set(fast_options) - set(VLLM_OPTIONS))
    if unknown:
        raise TypeError(f"unknown rollout engine options {unknown}; expected some of {fast_options + VLLM_OPTIONS}")
    kwargs = dict(
        pad_id=pad_id,
        eos_id=stop_ids(eos_id),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
    )
    if engine == "vllm":
        vllm = {k: v for k, v in engine_options.items() if k in VLLM_OPTIONS}
        if turns is not None:
            return TurnRollout(*generate_vllm_turns(model, prompt_ids, turns, **vllm, **kwargs))
        rows, logp = generate_vllm(model, prompt_ids, **vllm, **kwargs)
        return (rows, logp) if with_logprobs else rows
    reason = unsupported_reason(model) if engine != "reference" else "reference requested"
    if engine == "fast" and reason:
        raise ValueError(f"the fast rollout engine cannot run this model: {reason}")
    options = {k: v for k, v in engine_options.items() if k in fast_options}
    if turns is not None:
        return _generate_turns(model, prompt_ids, turns, reason, options, kwargs)
    if reason:
        tokens, logp = _generate_reference(model, prompt_ids, **kwargs)
    else:
        tokens, logp = _generate_fast(model, prompt_ids, **options, **kwargs)
    return (tokens.tolist(), logp.tolist()) if with_logprobs else tokens.tolist()


def _generate_turns(model, prompt_ids, turns: Turns, reason: Optional[str], options: dict, kwargs: dict) -> TurnRollout:
    """:func:`generate_ids` with ``turns`` on our engines: the reference loop where the fast engine
    cannot run the model (``reason``), else the fast engine, both continuing after observations."""
    if kwargs["max_new_tokens"] <= 0:
        empty = [[] for _ in prompt_ids]
        return TurnRollout(empty, [[] for _ in prompt_ids], [[] for _ in prompt_ids], [False] * len(prompt_ids))
    if reason:
        return _generate_reference_turns(model, prompt_ids, turns, **kwargs)
    return _generate_fast(model, prompt_ids, **options, **kwargs, turns=turns)


def stop_ids(eos_id: Union[None, int, Sequence[int]]) -> Tuple[int, ...]:
    """The stop tokens as a tuple: () never stops."""
    if eos_id is None:
        return ()
    return (int(eos_id),) if isinstance(eos_id, int) else tuple(int(t) for t in eos_id)


def _stop_tensor(stops: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(stops or (-1,), dtype=torch.long, device=device)  # -1: no token


def check_rollout(rollout, device: torch.device) -> None:
    """A one-line error now, before a run starts, for a ``rollout.engine`` that cannot sample here."""
    if rollout.engine not in ENGINES:
        raise UserError(f"rollout.engine: expected one of {ENGINES}, got '{rollout.engine}'")
    if rollout.engine == "vllm":
        check_vllm(device)
    rollout_environment(rollout)  # a one-line error now for an environment that does not import


def rollout_options(rollout, **overrides) -> dict:
    """:func:`generate`'s keyword arguments from a ``RolloutConfig`` (a recipe's ``rollout:``), with
    ``overrides`` on top: the one place every rollout setting reaches the engine from."""
    kwargs = rollout.vllm_kwargs
    options = dict(
        max_new_tokens=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        batch_size=rollout.batch_size,
        engine=rollout.engine,
        vllm_memory=rollout.vllm_memory,
        vllm_kwargs=OmegaConf.to_container(kwargs) if isinstance(kwargs, DictConfig) else dict(kwargs),
        **{name: getattr(rollout, name) for name in FAST_OPTIONS},
    )
    environment = rollout_environment(rollout)
    if environment is not None:  # multi-turn rollouts; the plain path's options stay as they were
        options.update(environment=environment, max_turns=rollout.max_turns)
    return {**options, **overrides}


def rollout_environment(rollout) -> Optional[Environment]:
    """The environment of ``rollout.tools`` / ``rollout.environment``, or None (single-turn)."""
    return build_environment(rollout.tools, rollout.environment, rollout.tool_timeout_s)


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
    engine: str = "auto",
    **engine_options,
) -> List[Generation]:
    """Sample one completion per prompt (repeat a prompt G times for a group); ``engine`` and
    ``engine_options`` as in :func:`generate_ids`."""
    was_training = model.training
    model.eval()
    try:
        return _generate_batches(
            model,
            tokenizer,
            prompts,
            batch_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            engine=engine,
            **engine_options,
        )
    finally:  # an engine error (or Ctrl-C) must not leave a training model in eval mode
        model.train(was_training)


def _generate_batches(
    model, tokenizer, prompts: List[str], batch_size: int, environment=None, max_turns: int = 1, **options
) -> List[Generation]:
    pad_id, eos_id = tokenizer.pad_token_id, stop_tokens(tokenizer)  # EOS, and a chat model's end of turn
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    results: List[Generation] = []
    for i in range(0, len(prompts), batch_size):
        chunk = encoded[i : i + batch_size]
        if environment is not None:
            turns = EnvironmentTurns(environment, tokenizer, max_turns)
            rollout = generate_ids(model, chunk, pad_id=pad_id, eos_id=eos_id, turns=turns, **options)
            results += [_finish_turns(tokenizer, p_ids, rollout, b, eos_id) for b, p_ids in enumerate(chunk)]
            continue
        rows, logp = generate_ids(model, chunk, pad_id=pad_id, eos_id=eos_id, with_logprobs=True, **options)
        for b, (p_ids, row) in enumerate(zip(chunk, rows)):
            results.append(_finish(tokenizer, p_ids, row, eos_id, None if logp is None else logp[b]))
    return results


def sample_batch(
    model,
    tokenizer,
    examples: List[Example],
    *,
    group: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    checker: AnswerChecker = NUMERIC,
    **options,
) -> tuple[Batch, List[Generation]]:
    """One completion per example (repeat an example G times for a group), as a :class:`Batch`.

    The one sampling path of online sources, offline samples, iterative RL and evaluation: the
    sampled token ids go into the batch as they are (never re-tokenised, so the trained tokens are
    the sampled ones). ``batch.stats`` gets ``accuracy`` (by ``checker``, the run's answer checker,
    whatever the run's reward), ``completion_length`` and ``truncated``. ``options``: :func:`generate`'s.
    ``batch.tensors["rollout_logp"]`` [B, T-1] float32 holds the engine's log-prob of each sampled
    token (:func:`rollout_logp`, aligned with ``batch.target_mask``), for the trainer to measure and
    correct the drift between the rollout engine and its own ``policy.logprobs``; absent where the
    engine could not give them all (some vLLM settings: :func:`~grpo_cli.models.vllm_rollout.generate_vllm`).
    Returns (batch [B rows], the generations in the same order).
    """
    environment = options.get("environment")
    prompts = [e.prompt if environment is None else environment.prompt(e.prompt, e) for e in examples]
    gens = generate(model, tokenizer, prompts, generator=generator, **options)
    ids, attn, comp = pack([g.prompt_ids for g in gens], [g.completion_ids for g in gens], tokenizer.pad_token_id)
    if environment is not None:
        comp = mask_observations(comp, gens)
    batch = Batch(
        input_ids=ids,
        attention_mask=attn,
        completion_mask=comp,
        prompts=prompts,
        completions=[g.text for g in gens],
        answers=[e.answer for e in examples],
        group=group,
        columns=[e.columns for e in examples],
        questions=[e.question for e in examples],
        tensors={"truncated": torch.tensor([not g.finished for g in gens], dtype=torch.bool)},
    )
    if all(g.logprobs is not None for g in gens):
        batch.tensors["rollout_logp"] = rollout_logp(gens, ids.shape[1])
    n = max(1, len(gens))
    batch.stats.update(
        accuracy=sum(checker.correct(g.text, e.answer) for g, e in zip(gens, examples)) / n,
        completion_length=sum(len(g.completion_ids) for g in gens) / n,
        truncated=sum(not g.finished for g in gens) / n,
    )
    return batch, gens


def mask_observations(completion_mask: torch.Tensor, gens: Sequence[Generation]) -> torch.Tensor:
    """[B, T] ``completion_mask`` of a batch packed by :func:`~grpo_cli.batch.pack` with 0 on the
    observation tokens (holes: attended to, never trained), so the loss, KL, advantages' spread and
    entropy, which all read ``batch.target_mask``, see the model's own tokens only."""
    out = completion_mask.clone()
    T = out.shape[1]
    for b, g in enumerate(gens):
        if g.model_written is not None and g.completion_ids:
            out[b, T - len(g.completion_ids) :] = torch.tensor(g.model_written, dtype=out.dtype)
    return out


def _finish(
    tokenizer, prompt_ids: List[int], row: List[int], stops: Sequence[int], logp: Optional[List[float]] = None
) -> Generation:
    """Cut a generated row (and its log-probs) after its first stop token (kept, it is a trained token)
    and decode it."""
    end = next((i for i, t in enumerate(row) if t in stops), None)
    ids = row[: end + 1] if end is not None else row
    text = tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
    return Generation(prompt_ids, ids, text, end is not None, None if logp is None else logp[: len(ids)])


def _finish_turns(tokenizer, prompt_ids: List[int], rollout: TurnRollout, b: int, stops: Sequence[int]) -> Generation:
    """Row ``b`` of a multi-turn rollout as a :class:`Generation` (its text holds the observations)."""
    ids, written = rollout.tokens[b], rollout.model_written[b]
    text = tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
    observations = sum(1 for k, w in enumerate(written) if not w and (k == 0 or written[k - 1]))
    logp = None if rollout.logprobs is None else rollout.logprobs[b]
    return Generation(prompt_ids, ids, text, rollout.stopped[b], logp, written, observations + 1)


def rollout_logp(gens: Sequence[Generation], width: int) -> torch.Tensor:
    """[B, width - 1] float32: each generation's sampled log-probs on the next-token targets of its
    completion in a batch packed to ``width`` tokens (:func:`~grpo_cli.batch.pack`: left-padded, so a
    completion of n tokens is the last n, and position t scores token t + 1), 0 elsewhere. Aligned
    with ``batch.target_mask``: the tensor the trainer compares with ``policy.logprobs(batch)``."""
    out = torch.zeros(len(gens), max(width - 1, 0))
    for b, g in enumerate(gens):
        n = min(len(g.completion_ids), width - 1)  # a completion's first token at position 0 has no target
        if n > 0:
            out[b, width - 1 - n :] = torch.tensor(g.logprobs[len(g.logprobs) - n :], dtype=torch.float32)
    return out
