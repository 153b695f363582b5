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

import functools
import platform
import sys
import warnings
from typing import Optional

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grpo_cli.models.load import unwrap_peft

MODEL_TYPES = ("qwen2", "llama")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only
ATTENTION = ("sdpa", "eager")  # implementations whose mask is a plain [B, 1, S, T] tensor


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why :class:`KVDecoder` cannot run ``model`` (then use ``model(...)``), or None."""
    base = unwrap_peft(model)
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


def model_functions(base: torch.nn.Module):
    """(apply_rotary_pos_emb, attention function, whether its mask is bool) from the model's module."""
    module = sys.modules[type(base.model.layers[0].self_attn).__module__]
    if base.config._attn_implementation == "sdpa":
        return module.apply_rotary_pos_emb, ALL_ATTENTION_FUNCTIONS["sdpa"], True
    return module.apply_rotary_pos_emb, module.eager_attention_forward, False


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: attend) as the additive one eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


FUSED_NORMS = ("Qwen2RMSNorm", "LlamaRMSNorm")
"""``weight * (x * rsqrt(mean(x^2) + eps))`` in fp32: the formula ``F.rms_norm`` computes in one kernel."""


def norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; for the RMSNorms of :data:`FUSED_NORMS` on fp32 the fused ``F.rms_norm`` instead,
    bit-identical there (tests/test_unpadded.py): one op instead of five, forward and backward."""
    if type(module).__name__ in FUSED_NORMS and x.dtype == module.weight.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)
    return module(x)


def attention_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype attention (and the KV cache) runs in. Under autocast on a GPU, autocast's (what its
    flash kernels take); on CPU the weights': CPU SDPA is slower in bf16 than in fp32
    (docs/performance.md, "Rollout engine"), so CPU autocast speeds up the projections and MLP only."""
    dev = weight.device.type
    if dev != "cpu" and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def decode_attention(
    rotate,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """One decode step's attention for one layer: rotary, the cache write, softmax attention of the
    single new query over the filled columns, written as the sums it is so that ``torch.compile``
    makes it one pass over the cache (:func:`compiled_decode_attention`).

    q [B, 1, H*D], k, v [B, 1, Hkv*D] the projections of the new token; cos, sin [B, 1, D]; keys,
    values [B, Hkv, T_max, D] the layer's cache, column ``L - 1`` written here; mask [B, L] bool
    (True: attend; the new column always is). Returns [B, 1, H*D] in q's dtype. Scores, softmax and
    the weighted sum run in fp32 whatever the cache's dtype; G = H / Hkv queries share a key head."""
    B, _, _ = q.shape
    L, D = mask.shape[1], keys.shape[-1]
    out_dtype = q.dtype
    q, k, v = (t.view(B, 1, -1, D).transpose(1, 2) for t in (q, k, v))  # [B, H or Hkv, 1, D]
    q, k = rotate(q, k, cos, sin)  # the model's own rotary function
    keys[:, :, L - 1 : L] = k  # a slice, not an index: the column stays symbolic when compiled
    values[:, :, L - 1 : L] = v
    K, V = keys[:, :, :L].float(), values[:, :, :L].float()  # [B, Hkv, L, D]
    q = q.float().reshape(B, K.shape[1], -1, D)  # [B, Hkv, G, D]
    scores = (q[:, :, :, None, :] * K[:, :, None]).sum(-1) * scaling  # [B, Hkv, G, L]
    probs = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    out = (probs[..., None] * V[:, :, None]).sum(-2)  # [B, Hkv, G, D]
    return out.reshape(B, 1, -1).to(out_dtype)


def cache_mib(model: torch.nn.Module, batch_size: int, max_len: int) -> float:
    """MiB of an fp32 KV cache for ``batch_size`` rows of ``max_len`` tokens: k and v, every layer."""
    base = unwrap_peft(model)
    head_dim = base.model.layers[0].self_attn.head_dim
    elements = 2 * len(base.model.layers) * batch_size * base.config.num_key_value_heads * max_len * head_dim
    return 4 * elements / 2**20


def step_read_mib(model: torch.nn.Module, batch_size: int, max_len: int) -> float:
    """MiB a decode step reads, at fp32 sizes: the :func:`cache_mib` cache and every weight (LoRA
    adapters included). What compiling the step saves grows with both: the fused attention with the
    cache, the small operator calls around the GEMMs it removes with the model's depth and width."""
    return cache_mib(model, batch_size, max_len) + 4 * sum(p.numel() for p in model.parameters()) / 2**20


class CompileFailures:
    """The errors of compiling decode steps that decoders sharing this record have met. After the
    first, they decode uncompiled without trying again (compiling would fail the same way, slowly),
    and only the first is warned about. Compiled functions are cached per process, so by default
    every decoder shares the process's record, :data:`PROCESS_COMPILE_FAILURES`; tests give a decoder
    a fresh one."""

    def __init__(self):
        self.errors: list = []

    def __bool__(self) -> bool:
        return bool(self.errors)

    def __len__(self) -> int:
        return len(self.errors)

    def record(self, err: Exception) -> None:
        """Keep ``err``; warn if it is the first (decoding goes on with SDPA)."""
        if not self.errors:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(
                f"rollout.compile_decode_step: torch.compile failed ({first}); decoding with SDPA instead",
                RuntimeWarning,
                stacklevel=4,
            )
        self.errors.append(err)


PROCESS_COMPILE_FAILURES = CompileFailures()
"""Every decoder's record unless it is given another: a failed compile stops this process's later ones."""


@functools.cache
def compiled_decode_attention():
    """:func:`decode_attention` compiled by Inductor with dynamic shapes (one compile per process,
    dtype and attention layout, cached on disk; batches of one row take SDPA instead, which a size-1
    dimension would compile again). It reads each layer's cache in one pass, in bf16 under
    autocast, where SDPA's per-(row, head) kernel calls read the fp32 one far below the memory's
    bandwidth (docs/performance.md, "Rollout engine")."""
    return torch.compile(decode_attention, dynamic=True)


def cache_buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A KV cache buffer, uninitialised: a step reads only the columns written before it (the
    fixed-shape step, which reads them all, zeroes the rest first: :meth:`KVDecoder.zero_after`).
    Zeroing it all would be a write of the whole cache at every rollout (docs/performance.md,
    "Another CPU host")."""
    return torch.empty(shape, dtype=dtype, device=device)


def causal_mask(real: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool from real [B, T]: causal over real keys; a padding query sees itself only
    (never a fully masked row, whose softmax would be NaN; its output is never used)."""
    T = real.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    return ((causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=real.device))[:, None]


def _adapters(module: torch.nn.Module) -> list:
    """The active LoRA adapters of a peft layer."""
    return [a for a in module.active_adapters if a in module.lora_A]


def is_affine(module: torch.nn.Module) -> bool:
    """Whether ``module(x)`` in eval mode is ``x @ W.T + b`` for :func:`linear_weights` to give: an
    ``nn.Linear``, or a peft LoRA layer over one with plain adapters (not DoRA or other variants, no
    bias on B, and not merged-then-disabled, whose forward would unmerge first)."""
    if type(module) is torch.nn.Linear:
        return True
    from peft.tuners.lora.layer import Linear as LoraLinear  # deferred: peft loads only for LoRA runs

    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        return False
    if module.merged and module.disable_adapters:
        return False
    return not any(a in module.lora_variant or module.lora_bias[a] for a in _adapters(module))


def linear_weights(module: torch.nn.Module):
    """(weight, bias) of an :func:`is_affine` module: an ``nn.Linear``'s own, or for a peft LoRA layer its
    base weight plus every active adapter's ``scaling * B @ A`` (peft's ``get_delta_weight``; merging
    changes only the rounding)."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias
    weight = module.base_layer.weight
    if not (module.merged or module.disable_adapters):
        for a in _adapters(module):
            weight = weight + module.get_delta_weight(a).to(weight.dtype)
    return weight, module.base_layer.bias


def packed_linear(weight: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``weight`` [N, K] as oneDNN's blocked layout for ``torch.ops.mkldnn._linear_pointwise``: the
    layout the GEMM kernel reads, so it is not re-packed at every call (a large share of a call at
    decode's M = B rows on CPU; docs/performance.md). Where that is not measured (not x86-64, no oneDNN, no
    native bf16), the plain tensor: ``F.linear`` then still gets the fused, pre-cast weights."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return weight
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)


def _packed_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """oneDNN's GEMM on a :func:`packed_linear` weight as one op opaque to ``torch.compile``
    (``torch.ops.grpo_cli.packed_gemm``): Inductor cannot lower ``mkldnn._linear_pointwise`` on a weight
    that is an input rather than a frozen constant, but compiles the code around an opaque call
    (:func:`decode_layers`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _packed_gemm_shape(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])  # a packed weight keeps its logical [N, K] shape


# A plain Library op, not torch.library.custom_op: that wrapper costs more a call, and a decode step
# makes 32 calls (docs/performance.md, "What is left of the CPU decode step").
LIBRARY = torch.library.Library("grpo_cli", "FRAGMENT")
LIBRARY.define("packed_gemm(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
LIBRARY.impl("packed_gemm", _packed_gemm, "CompositeExplicitAutograd")  # every backend, the packed one included
torch.library.register_fake("grpo_cli::packed_gemm", _packed_gemm_shape, lib=LIBRARY)
packed_gemm = torch.ops.grpo_cli.packed_gemm


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T + bias`` in the weight's dtype, weight plain or :func:`packed_linear`."""
    x = x.to(weight.dtype)
    if weight.layout == torch._mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def pack_linears(pairs, dtype: torch.dtype, batch_size: int):
    """[(weight [N_i, K], bias [N_i] or None)] -> (one packed weight [sum N_i, K] in ``dtype``, the
    fused bias or None): several projections of the same input as one GEMM. Each weight is cast
    straight into its rows (one pass, not a concatenation and then a cast: at a real vocabulary this
    copying is a large share of a rollout's fixed cost); a lone weight already in ``dtype`` is not copied."""
    if len(pairs) == 1 and pairs[0][0].dtype == dtype and pairs[0][0].is_contiguous():
        weight = pairs[0][0].detach()
    else:
        first = pairs[0][0]
        weight = first.new_empty((sum(w.shape[0] for w, _ in pairs), first.shape[1]), dtype=dtype)
        torch.cat([w.detach() for w, _ in pairs], out=weight)  # cat casts into out's dtype
    biases = [b for _, b in pairs if b is not None]
    bias = (
        None
        if not biases
        else torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in pairs]).to(dtype)
    )
    return packed_linear(weight, batch_size), bias


class PackedLayer:
    """One decoder layer's projections as three GEMMs, q|k|v and gate|up fused, cast once to the
    compute dtype and packed for oneDNN: the CPU decode step's GEMMs at M = B rows are not re-blocked
    at every call (docs/performance.md), and 7 projections (each an autocast cast, a module call and
    peft's hooks) become 4 calls."""

    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype, batch_size: int):
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o = (linear_weights(getattr(attn, f"{n}_proj")) for n in "qkvo")
        gate, up, down = (linear_weights(getattr(mlp, f"{n}_proj")) for n in ("gate", "up", "down"))
        self.sizes = [q[0].shape[0], k[0].shape[0], v[0].shape[0]]

        def pack(*pairs):
            return pack_linears(pairs, dtype, batch_size)

        self.qkv, self.o, self.gate_up, self.down = pack(q, k, v), pack(o), pack(gate, up), pack(down)
        self.act = mlp.act_fn

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = apply_linear(x, *self.gate_up).chunk(2, dim=-1)
        return apply_linear(self.act(gate) * up, *self.down)


def packing_unsupported(model: torch.nn.Module) -> Optional[str]:
    """Why :class:`KVDecoder` cannot pack ``model``'s projections (then its modules run), or None."""
    base = unwrap_peft(model)
    weight = base.model.embed_tokens.weight
    if weight.device.type != "cpu":
        return "packed weights are for CPUs (on a GPU, CUDA graphs cut the per-call costs)"
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return "sharded (FSDP) parameters"
    for layer in base.model.layers:
        if not all(hasattr(layer.mlp, f) for f in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "unexpected MLP layout"
        projections = [getattr(layer.self_attn, f"{n}_proj") for n in "qkvo"]
        projections += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if not all(is_affine(m) for m in projections):
            return "a projection that is neither nn.Linear nor a plain LoRA layer"
    return None


def decode_layers(
    layers,
    packed: list,
    rotate,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: list,
    values: list,
    mask: torch.Tensor,
) -> torch.Tensor:
    """A decode step (S = 1) through every layer from :class:`PackedLayer` weights, written to be compiled
    whole (:func:`compiled_decode_layers`): the norms, rotary, cache writes, attention, residual adds and
    the MLP's activation fuse into a few loops around the GEMMs, and the step is one compiled call
    instead of one per layer (each costs dynamo's guards and wrapper) plus ~10 operator calls
    per layer.

    layers: the decoder's layers (their norms and attention scalings); x [B, 1, H] the embedded new
    tokens; cos, sin [B, 1, D]; keys, values: per layer [B, Hkv, T_max, D], column ``L - 1`` written;
    mask [B, L] bool (True: attend). Returns the last layer's output [B, 1, H]."""

    def gemm(x, weight_bias):  # traced, a packed weight looks strided: apply_linear's test would miss it
        return packed_gemm(x.to(weight_bias[0].dtype), *weight_bias)

    for i, layer in enumerate(layers):
        p = packed[i]
        q, k, v = gemm(norm(layer.input_layernorm, x), p.qkv).split(p.sizes, dim=-1)
        out = decode_attention(rotate, q, k, v, cos, sin, keys[i], values[i], mask, layer.self_attn.scaling)
        x = x + gemm(out, p.o)
        gate, up = gemm(norm(layer.post_attention_layernorm, x), p.gate_up).chunk(2, dim=-1)
        x = x + gemm(p.act(gate) * up, p.down)
    return x


@functools.cache
def compiled_decode_layers():
    """:func:`decode_layers` compiled by Inductor, the GEMMs left to oneDNN (:func:`packed_gemm`).
    Faster than the per-layer compiled attention (one compiled call a step, the work between the
    GEMMs fused), for a longer first compile (docs/performance.md, "The whole decode step compiled").
    Only rows, cache length and filled columns are dynamic (marked by
    :meth:`KVDecoder._compiled_layers`): with every size symbolic, tracing it spent far longer in
    sympy than the compile itself takes."""
    return torch.compile(decode_layers)  # dynamic only in the sizes KVDecoder._compiled_layers marks


class KVDecoder:
    """``decoder(ids, positions, start, mask)`` -> logits of each row's last token [B, V].

    ``packed``: on CPU, run each layer from :class:`PackedLayer` weights (taken from the model once,
    at construction: the model must not change while this decoder is used). ``compiled``: on CPU,
    run each decode step as :func:`compiled_decode_layers` where every weight is packed for oneDNN,
    else its attention as :func:`compiled_decode_attention`, over a cache in
    autocast's dtype when autocast is on (SDPA, prefill's too, still computes in fp32 there); where
    compiling fails, warn once and go on with SDPA over an fp32 cache. ``whole_step=False`` compiles
    each layer's attention alone even where the weights are packed: the step as it was before it
    was compiled whole, for benchmarks to compare. ``failures``: the record of failed compiles this
    decoder reads and adds to (:class:`CompileFailures`; by default the process's)."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        max_len: int,
        packed: bool = False,
        compiled: bool = False,
        whole_step: bool = True,
        failures: Optional[CompileFailures] = None,
    ):
        base = unwrap_peft(model)
        self.decoder, self.head = base.model, base.get_output_embeddings()
        weight = self.decoder.embed_tokens.weight
        attn = self.decoder.layers[0].self_attn
        kv_heads = base.config.num_key_value_heads
        shape = (len(self.decoder.layers), batch_size, kv_heads, max_len, attn.head_dim)
        self.attn_dtype = attention_dtype(weight)
        self.failures = PROCESS_COMPILE_FAILURES if failures is None else failures
        self.compiled = compiled and weight.device.type == "cpu" and not self.failures
        cache_dtype = self.attn_dtype
        if self.compiled and torch.is_autocast_enabled("cpu"):
            cache_dtype = torch.get_autocast_dtype("cpu")  # half the bytes each step reads
        self.full = {name: cache_buffer(shape, cache_dtype, weight.device) for name in "kv"}  # every row built for
        self.k, self.v = self.full["k"], self.full["v"]  # views of the rows still in the batch
        positions = torch.arange(max_len, device=weight.device)[None]  # [1, T_max]
        cos, sin = self.decoder.rotary_emb(weight, positions)  # [1, T_max, D] each, in the weights' dtype
        self.cos, self.sin = cos[0], sin[0]
        self.rotate, self.attention, self.bool_mask = model_functions(base)
        self.packed = None
        if packed and packing_unsupported(model) is None:
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
            self.packed = [PackedLayer(layer, dtype, batch_size) for layer in self.decoder.layers]
        self.packed_head = None  # the head's GEMM is the step's largest at a real vocabulary (V x H)
        if self.packed and is_affine(self.head):
            self.packed_head = pack_linears([linear_weights(self.head)], dtype, batch_size)
        # compile the whole step (decode_layers) where every GEMM is oneDNN's on a packed weight
        self.whole_step = (
            self.compiled and whole_step and bool(self.packed) and self.packed[0].qkv[0].layout == torch._mkldnn
        )
        for layer in self.packed if self.whole_step else ():
            for t in (*layer.qkv, *layer.o, *layer.gate_up, *layer.down):  # else symbolic sizes: a slow trace
                if t is not None:
                    torch._dynamo.mark_static(t)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, start, mask: torch.Tensor) -> torch.Tensor:
        """ids, positions [B, S]; mask [B, 1, S, start + S] bool (True: attend). Fills columns start.. of the cache.

        ``start`` may also be a [1] long tensor (S = 1): the column is then read on the device and the
        call attends over all T_max columns, so mask is [B, 1, 1, T_max]. Every shape is then the same
        at every step and nothing is read back to the host: what a CUDA graph needs."""
        if not (self.bool_mask or self._compiles(ids, start)):  # the compiled attention takes the bool mask
            mask = additive(mask, self.attn_dtype)
        cos, sin = self.cos[positions], self.sin[positions]  # [B, S, D]
        x = self.decoder.embed_tokens(ids)  # [B, S, H]
        if self.whole_step and self._compiles(ids, start):
            out = self._compiled_layers(x, cos, sin, mask)
            if out is not None:
                return self._head(out)
        for i, layer in enumerate(self.decoder.layers):
            packed = self.packed[i] if self.packed else None
            x = x + self._attention(layer.self_attn, norm(layer.input_layernorm, x), i, cos, sin, start, mask, packed)
            h = norm(layer.post_attention_layernorm, x)
            x = x + (packed.mlp(h) if packed else layer.mlp(h))
        return self._head(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """[B, V] fp32 logits of the last token of x [B, S, H], the last layer's output. Packed, the head
        runs in the compute dtype as the blocks do (bf16 under autocast, as HF ``generate`` and vLLM
        sample), with fp32 logits out; otherwise in its own dtype, as the trainer's log-prob head."""
        with torch.autocast(x.device.type, enabled=False):
            h = norm(self.decoder.norm, x[:, -1])
            if self.packed_head is not None:
                return apply_linear(h, *self.packed_head).float()
            return self.head(h)

    def keep_rows(self, rows: torch.Tensor, filled: int) -> None:
        """Keep only ``rows`` [B'] (increasing) of the batch: their first ``filled`` columns move to the
        front rows of the same buffers (later columns are written before read). Layer by layer, so the
        copy in flight is one layer's, not the whole cache's."""
        for name in ("k", "v"):
            cache = getattr(self, name)
            for layer in cache:  # [B, Hkv, T_max, D] views
                layer[: len(rows), :, :filled] = layer[:, :, :filled].index_select(0, rows)
            setattr(self, name, cache[:, : len(rows)])

    def copy_rows(self, source: torch.Tensor, filled: int) -> None:
        """Make the batch ``len(source)`` rows (at most the rows it was built for), row r a copy of
        the current row ``source[r]``'s first ``filled`` columns (after :meth:`keep_rows` made it
        fewer): a prompt prefilled once serves each of its copies."""
        for name in ("k", "v"):
            cache, full = getattr(self, name), self.full[name]
            for i, layer in enumerate(cache):
                full[i, : len(source), :, :filled] = layer[:, :, :filled].index_select(0, source)
            setattr(self, name, full[:, : len(source)])

    def grow(self, max_len: int, filled: int) -> None:
        """Make the cache ``max_len`` columns long, keeping the rows' first ``filled`` columns: a
        multi-turn batch's holes (generation.ragged_chunk) can take more columns than prompt + new
        tokens. Positions never pass prompt + new tokens, so the rotary tables stay as they are."""
        for name in ("k", "v"):
            cache = getattr(self, name)  # [L, B', Hkv, T, D]
            full = cache_buffer((*cache.shape[:3], max_len, cache.shape[4]), cache.dtype, cache.device)
            full[:, :, :, :filled] = cache[:, :, :, :filled]
            self.full[name] = full
            setattr(self, name, full)

    def zero_after(self, filled: int) -> None:
        """Zero every column from ``filled`` on: a fixed-shape step attends over all of them (masked),
        and a masked column must hold numbers, not garbage (0 x NaN is NaN)."""
        self.k[:, :, :, filled:].zero_()
        self.v[:, :, :, filled:].zero_()

    def _write(self, i: int, k: torch.Tensor, v: torch.Tensor, start):
        """Write k, v [B, Hkv, S, D] of layer i at columns start..; the cache columns to attend over."""
        if isinstance(start, torch.Tensor):  # a column held on the device: attend over every column
            self.k[i].index_copy_(2, start, k.to(self.k.dtype))
            self.v[i].index_copy_(2, start, v.to(self.v.dtype))
            return self.k[i], self.v[i]
        end = start + k.shape[2]
        self.k[i, :, :, start:end] = k
        self.v[i, :, :, start:end] = v
        return self.k[i, :, :, :end], self.v[i, :, :, :end]

    def _attention(self, attn, x, i: int, cos, sin, start: int, mask, packed: Optional[PackedLayer]) -> torch.Tensor:
        if packed:
            q, k, v = apply_linear(x, *packed.qkv).split(packed.sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        out = None
        if self._compiles(x, start):  # then __call__ kept the bool mask
            out = self._compiled_attention(attn, q, k, v, i, cos, sin, mask)
        if out is None:
            out = self._sdpa(attn, q, k, v, i, cos, sin, start, mask)
        return apply_linear(out, *packed.o) if packed else attn.o_proj(out)

    def _compiles(self, x: torch.Tensor, start) -> bool:
        """Whether a call on x [B, S, ...] runs the compiled attention: decode steps (S = 1) at a host
        column, of more than one row (one row takes SDPA: cheap, and no second compile for B = 1)."""
        return self.compiled and x.shape[1] == 1 and x.shape[0] > 1 and isinstance(start, int)

    def _sdpa(self, attn, q, k, v, i: int, cos, sin, start, mask) -> torch.Tensor:
        """[B, S, H*D]: the model's attention function over the cache, in :func:`attention_dtype`."""
        B, S, _ = q.shape
        q, k, v = (t.view(B, S, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, H or Hkv, S, D]
        q, k = self.rotate(q, k, cos, sin)
        keys, values = self._write(i, k, v, start)
        if not self.bool_mask and mask.dtype == torch.bool:  # a compiled step fell back
            mask = additive(mask, self.attn_dtype)
        with torch.autocast(q.device.type, enabled=False):
            dtype = self.attn_dtype
            out, _ = self.attention(
                attn, q.to(dtype), keys.to(dtype), values.to(dtype), mask, dropout=0.0, scaling=attn.scaling
            )  # [B, S, H, D]
        return out.reshape(B, S, -1)

    def _compiled_layers(self, x, cos, sin, mask) -> Optional[torch.Tensor]:
        """[B, 1, H] from :func:`compiled_decode_layers`, or None where compiling failed (as
        :meth:`_compiled_attention`). Autocast is off inside: the packed weights are already in its
        dtype and :func:`decode_layers` casts each GEMM's input to them."""
        keys, values, mask = list(self.k), list(self.v), mask[:, 0, 0]
        for t in (x, cos, sin, mask, *keys, *values):  # rows
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for t in (*keys, *values):  # the batch's cache length
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(mask, 1)  # filled columns
        try:
            with torch.autocast(x.device.type, enabled=False):
                return compiled_decode_layers()(
                    self.decoder.layers, self.packed, self.rotate, x, cos, sin, keys, values, mask
                )
        except Exception as err:
            self._compile_failed(err)
            return None

    def _compiled_attention(self, attn, q, k, v, i: int, cos, sin, mask) -> Optional[torch.Tensor]:
        """[B, 1, H*D] from :func:`compiled_decode_attention`, or None where compiling failed: then this
        decoder goes on with SDPA over an fp32 cache, and so do later ones (warned once)."""
        try:
            with torch.autocast(q.device.type, enabled=False):
                return compiled_decode_attention()(
                    self.rotate, q, k, v, cos, sin, self.k[i], self.v[i], mask[:, 0, 0], attn.scaling
                )
        except Exception as err:
            self._compile_failed(err)
            return None

    def _compile_failed(self, err: Exception) -> None:
        """Record ``err`` (warned once per record) and go on uncompiled, with SDPA over a cache in the
        attention dtype. Compiling is an optimisation only: it fails without a C++ compiler or on
        unsupported platforms."""
        self.failures.record(err)
        self.compiled = False
        rows = self.k.shape[1]  # the batch's rows are the buffers' first rows (keep_rows, copy_rows)
        self.full = {name: cache.to(self.attn_dtype) for name, cache in self.full.items()}
        self.k, self.v = self.full["k"][:, :rows], self.full["v"][:, :rows]
