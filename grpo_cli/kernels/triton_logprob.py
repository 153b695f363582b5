"""Triton (CUDA) selected-token log-probs: fused GEMM + online logsumexp over vocabulary tiles.

Shapes: N tokens, H hidden size, V vocabulary size; a program owns BLOCK_N tokens and walks
BLOCK_V-wide vocabulary tiles, each built from BLOCK_H-deep slices of the hidden dimension.

Import this module only through ``grpo_cli.kernels.dispatch`` (it imports triton at load time).

* Forward (``_fwd_kernel``): logits tiles are computed in registers with ``tl.dot`` (bf16/fp16/
  fp32 in, fp32 accumulation; fp32 inputs use IEEE fp32 unless
  ``torch.backends.cuda.matmul.allow_tf32`` is set) and folded into a running max, a running
  ``sum exp(z - m)``, the target logit and the entropy sum. The vocabulary is split across a second
  grid axis so small N still fills the GPU; the few [splits, N] partials are merged in torch.
  The [N, V] logits never reach global memory.
* Backward: per chunk of rows, ``_grad_logits_kernel`` recomputes the logits tile by tile and
  writes dL/dz = g_lp * (onehot - p) - g_ent * p * (log p + entropy) in fp32; cuBLAS then does
  dH = dZ @ W and dW += dZ^T @ H with fp32 results (half-precision inputs: dZ split into two
  half-precision terms, see ``triton_backward``). Peak extra memory is one [chunk, V] fp32 block
  and its two half-precision terms. Recompute (rather than storing p) is forced by the per-row upstream gradient;
  see grpo_cli/kernels/fused.py for the argument.

Block sizes are fixed, not autotuned. tests/test_kernels.py runs the kernels under
``TRITON_INTERPRET=1`` (fp32, fp16) and compiles them for sm_90 (bf16) on any machine, and runs them
natively on a CUDA device (they passed on an H100, bf16 included); timings in docs/performance.md.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Bytes of one backward dL/dz chunk [rows, V] on the GPU.
GRAD_CHUNK_BYTES = 256 * 1024 * 1024


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    offs_n,
    mask_n,
    offs_v,
    mask_v,
    H,
    stride_h,
    stride_w,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """z = (h @ W^T + b) / temperature for one [BLOCK_N, BLOCK_V] tile, fp32."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        mask_k = offs_k < H
        h = tl.load(
            h_ptr + offs_n[:, None] * stride_h + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0
        )
        # int64 row offsets: V * H can exceed 2**31 elements for large vocabularies.
        wt = tl.load(
            w_ptr + offs_v[None, :].to(tl.int64) * stride_w + offs_k[:, None],
            mask=mask_v[None, :] & mask_k[:, None],
            other=0.0,
        )
        acc = tl.dot(h, wt, acc, input_precision=DOT_PRECISION)
    acc = acc * inv_temp
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc = acc + b[None, :] * inv_temp
    return acc


@triton.jit
def _fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    ids_ptr,
    m_ptr,
    s_ptr,
    s2_ptr,
    zt_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    inv_temp,
    cols_per_split,
    HAS_BIAS: tl.constexpr,
    WITH_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial online-logsumexp state of rows pid(0) over vocabulary split pid(1)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ids = tl.load(ids_ptr + offs_n, mask=mask_n, other=-1)
    v_start = pid_s * cols_per_split
    v_stop = tl.minimum(v_start + cols_per_split, V)
    # Finite start for the running max: with -inf, (m - m_new) * s would be -inf * 0 = NaN.
    m = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_stop
        # fmt: off
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_v, mask_v, H, stride_h, stride_w,
                         inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        # fmt: on
        z = tl.where(mask_v[None, :], z, float("-inf"))
        zt += tl.sum(tl.where(offs_v[None, :] == ids[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # masked columns: exp(-inf) = 0
        if WITH_ENT:
            t = tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
            s2 = scale * (s2 + (m - m_new) * s) + tl.sum(e * t, axis=1)
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
    out = pid_s * N + offs_n
    tl.store(m_ptr + out, m, mask=mask_n)
    tl.store(s_ptr + out, s, mask=mask_n)
    tl.store(zt_ptr + out, zt, mask=mask_n)
    if WITH_ENT:
        tl.store(s2_ptr + out, s2, mask=mask_n)


@triton.jit
def _grad_logits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    ids_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    out_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_GLP: tl.constexpr,
    HAS_GENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dL/dz for tile (pid(0), pid(1)) of a row chunk, written to out [N, V] in out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    # fmt: off
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_v, mask_v, H, stride_h, stride_w,
                     inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    # fmt: on
    logp = z - tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    p = tl.exp(logp)
    g = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if HAS_GLP:
        g_lp = tl.load(glp_ptr + offs_n, mask=mask_n, other=0.0)
        ids = tl.load(ids_ptr + offs_n, mask=mask_n, other=-1)
        onehot = tl.where(offs_v[None, :] == ids[:, None], 1.0, 0.0)
        g += g_lp[:, None] * (onehot - p)
    if HAS_GENT:
        g_ent = tl.load(gent_ptr + offs_n, mask=mask_n, other=0.0)
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        g -= g_ent[:, None] * p * (logp + ent[:, None])
    ptrs = out_ptr + offs_n[:, None].to(tl.int64) * V + offs_v[None, :]
    tl.store(ptrs, g.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


def _config(device: torch.device, dtype: torch.dtype) -> dict:
    """Block sizes and dot precision; small blocks under the CPU interpreter keep tests fast."""
    if device.type != "cuda":  # TRITON_INTERPRET=1 on CPU tensors
        cfg = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=1)
    else:
        cfg = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    cfg["DOT_PRECISION"] = "tf32" if tf32 or dtype != torch.float32 else "ieee"
    return cfg


def _vocab_splits(n_rows: int, vocab: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(splits, cols_per_split): enough programs to fill the GPU, no empty split."""
    row_blocks = triton.cdiv(max(n_rows, 1), cfg["BLOCK_N"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    max_splits = triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = max(1, min(max_splits, triton.cdiv(4 * sms, row_blocks)))
    cols = triton.cdiv(triton.cdiv(vocab, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    return triton.cdiv(vocab, cols), cols


def _merge_splits(m, s, s2, zt):
    """Combine per-split (max, sum, entropy sum, target) into lse, logp, entropy [N]."""
    m_all = m.max(0).values
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(0)
    lse = m_all + s_all.log()
    logp = zt.sum(0) - lse
    entropy = None
    if s2 is not None:
        s2_all = (scale * (s2 + (m - m_all) * s)).sum(0)
        entropy = s_all.log() - s2_all / s_all
    return logp, lse, entropy


def triton_forward(hidden, weight, bias, token_ids, inv_temp, with_entropy):
    """-> (logp [N], lse [N], entropy [N] or None), all fp32."""
    n, hdim, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
    if n == 0:  # every row masked: nothing to launch
        empty = hidden.new_empty(0, dtype=torch.float32)
        return empty, empty, (empty if with_entropy else None)
    cfg = _config(hidden.device, hidden.dtype)
    splits, cols = _vocab_splits(n, vocab, cfg, hidden.device)
    part = torch.empty((4 if with_entropy else 3, splits, n), device=hidden.device, dtype=torch.float32)
    m, s, zt = part[0], part[1], part[2]
    s2 = part[3] if with_entropy else None
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), splits)
    _fwd_kernel[grid](
        hidden,
        weight,
        bias if bias is not None else weight,
        token_ids,
        m,
        s,
        s2 if s2 is not None else s,
        zt,
        n,
        vocab,
        hdim,
        hidden.stride(0),
        weight.stride(0),
        inv_temp,
        cols,
        HAS_BIAS=bias is not None,
        WITH_ENT=with_entropy,
        **cfg,
    )
    return _merge_splits(m, s, s2, zt)


def _chunk_rows(n: int, vocab: int, elem_bytes: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(n, chunk_size))
    return max(1, min(n, GRAD_CHUNK_BYTES // (vocab * elem_bytes)))


def _grad_logits(hidden, weight, bias, ids, lse, ent, g_lp, g_ent, inv_temp, out):
    """Fill out [rows, V] with dL/dz for the rows of ``hidden`` (a chunk)."""
    rows, vocab = out.shape
    cfg = _config(hidden.device, hidden.dtype)
    grid = (triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    dummy = lse  # any valid pointer for arguments a constexpr flag switches off
    _grad_logits_kernel[grid](
        hidden,
        weight,
        bias if bias is not None else dummy,
        ids,
        lse,
        ent if ent is not None else dummy,
        g_lp if g_lp is not None else dummy,
        g_ent if g_ent is not None else dummy,
        out,
        rows,
        vocab,
        hidden.shape[1],
        hidden.stride(0),
        weight.stride(0),
        inv_temp,
        HAS_BIAS=bias is not None,
        HAS_GLP=g_lp is not None,
        HAS_GENT=g_ent is not None,
        **cfg,
    )
    return out


def triton_backward(hidden, weight, bias, ids, lse, ent, g_lp, g_ent, inv_temp, needs, chunk_size):
    """Chunked recompute: (grad_hidden, grad_weight, grad_bias), None where not needed.

    dL/dz is kept in fp32. For half-precision inputs it is split into ``hi + lo``, both in the
    input dtype (hi + lo equals it to ~2^-16 relatively), and each GEMM runs twice on the tensor
    cores with fp32 accumulation: the gradients are fp32-accurate up to their final rounding,
    where one half-precision GEMM of dL/dz would be off by ~1e-2 relatively (its rows nearly
    cancel: sum_v (onehot - p) = 0).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    half = hidden.dtype != torch.float32
    rows = _chunk_rows(n, vocab, 4 + 2 * hidden.element_size() * half, chunk_size)
    dz = hidden.new_empty(rows * vocab, dtype=torch.float32)
    grad_h = torch.empty_like(hidden) if needs[0] else None
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs[1] else None
    grad_b = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if needs[2] else None
    pick = lambda t, r0, r1: None if t is None else t[r0:r1]  # noqa: E731
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        g = _grad_logits(
            hidden[r0:r1],
            weight,
            bias,
            ids[r0:r1],
            lse[r0:r1],
            pick(ent, r0, r1),
            pick(g_lp, r0, r1),
            pick(g_ent, r0, r1),
            inv_temp,
            dz[: (r1 - r0) * vocab].view(r1 - r0, vocab),
        )
        parts = _split_hi_lo(g, hidden.dtype) if half else (g,)
        if grad_h is not None:
            gh = sum(_mm_fp32(p, weight) for p in parts)
            grad_h[r0:r1] = gh.mul_(inv_temp)
        if grad_w is not None:
            for p in parts:
                grad_w += _mm_fp32(p.T, hidden[r0:r1])
        if grad_b is not None:
            grad_b += g.sum(0)
    if grad_w is not None:  # in place, then one cast: at most the fp32 and the output [V, H] at once
        grad_w = grad_w.mul_(inv_temp).to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.mul_(inv_temp).to(bias.dtype)
    return grad_h, grad_w, grad_b


def _split_hi_lo(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``g`` as ``hi + lo`` in ``dtype``: hi is g rounded, lo the rounding error rounded."""
    hi = g.to(dtype)
    return hi, (g - hi.float()).to(dtype)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation *and* an fp32 result (a half-precision result would be
    rounded again). cuBLAS takes ``out_dtype``; elsewhere (the CPU interpreter tests, or an older
    torch) the operands are widened, which gives the same exact products."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass  # torch without mm's out_dtype
    return a.float() @ b.float()


class TritonSelectedLogprobsFn(torch.autograd.Function):
    """Fused forward kernel; backward recomputes dL/dz chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, inv_temp, with_entropy, chunk_size):
        logp, lse, entropy = triton_forward(hidden, weight, bias, token_ids, inv_temp, with_entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, token_ids, lse, entropy)
        ctx.inv_temp, ctx.with_entropy, ctx.chunk_size = inv_temp, with_entropy, chunk_size
        entropy = entropy if with_entropy else logp.new_empty(0)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, token_ids, lse, entropy = ctx.saved_tensors
        g_ent = g_ent.contiguous().float() if (ctx.with_entropy and g_ent is not None) else None
        g_lp = None if g_lp is None else g_lp.contiguous().float()
        if g_lp is None and g_ent is None:
            return (None,) * 7
        grads = triton_backward(
            hidden,
            weight,
            bias,
            token_ids,
            lse,
            entropy,
            g_lp,
            g_ent,
            ctx.inv_temp,
            ctx.needs_input_grad[:3],
            ctx.chunk_size,
        )
        return (*grads, None, None, None, None)


def triton_selected_logprobs(hidden, weight, token_ids, bias, temperature, with_entropy, chunk_size):
    """Triton backend on validated 2-D inputs with no ignored rows -> (logp, entropy | None).

    hidden and weight are brought to one dtype (the wider of the two) for ``tl.dot``.
    """
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden = hidden.to(dtype).contiguous()
    weight = weight.to(dtype).contiguous()
    bias = None if bias is None else bias.contiguous()
    inv_temp = 1.0 / float(temperature)
    if not math.isfinite(inv_temp):
        raise ValueError(f"temperature too small: {temperature}")
    logp, entropy = TritonSelectedLogprobsFn.apply(
        hidden, weight, bias, token_ids.contiguous(), inv_temp, with_entropy, chunk_size
    )
    return logp, (entropy if with_entropy else None)
