"""Selected-token log-probs in plain torch, tiled so the [N, V] logits never exist at once.

Shapes: N tokens, H hidden size, V vocabulary size; a tile is ``rows x cols`` of the logits
(rows <= N tokens, cols <= V vocabulary entries). ``z = (hidden @ weight.T + bias) / temperature``
are the scaled logits, ``p = softmax(z)``, ``lse = logsumexp(z)``, ``logp = z[y] - lse``.

Design (measured on a 2-core AVX-512 CPU, numbers in docs/performance.md):

* Forward: one sweep over vocabulary tiles with an online logsumexp (running max ``m``, running
  ``sum exp(z - m)``), the target logit picked out of the tile that holds it, and the entropy
  from a running ``sum exp(z - m) * (z - m)``. Only [N] vectors survive the sweep.
* Why the backward recomputes the logits: the upstream gradient ``g`` is per row, and
  ``dW = sum_i g_i (onehot_i - p_i)^T h_i`` cannot be precomputed without ``g`` unless all of
  ``p`` ([N, V]) is kept, which is exactly the memory we avoid. The fused-linear-loss trick
  (store dW in the forward) only works for a scalar loss. So with a trainable LM head the cost is
  4 GEMMs (forward logits; backward logits, dH, dW) against the naive 3, and we still win on time
  because the naive path spends more than a GEMM's worth on memory traffic and page faults of its
  several [N, V] fp32 temporaries, while our tiles stay in cache and are reused (``out=``).
* Frozen LM head (LoRA): ``d logp_i / d h_i = (W[y_i] - sum_j p_ij W_j) / temperature`` is per row,
  so the forward accumulates it flash-attention style (rescaled with the running max) and the
  backward is one multiply by ``g``: 2 GEMMs in all, like the naive path but without [N, V].
  An entropy gradient, when it is actually used, is recomputed in the backward.
* Loop order is vocabulary tile outer, row block inner: each weight tile is upcast to fp32 once
  per sweep, and in the backward each dW tile is finished before moving on.
* All maths is fp32 whatever the input dtype (tiles are upcast), grads are cast back at the end.
  The dW accumulator is fp32 [V, H]; for a bf16 head that is twice the gradient's own size.

torch.compile was not used: the eager loop is GEMM-bound and already meets the targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

# One logits tile holds at most this many fp32 elements (16 MiB). Measured on the 2-core CPU:
# large enough that GEMMs run at full speed, small enough to stay far below the naive peak.
TILE_ELEMENTS = 4 * 1024 * 1024
# Preferred vocabulary width of a tile; the rows then fill the element budget.
DEFAULT_COLS = 2048


class Plan(NamedTuple):
    """Tile shape: ``rows`` tokens by ``cols`` vocabulary entries."""

    rows: int
    cols: int


def make_plan(n_rows: int, vocab: int, chunk_size: int | None = None) -> Plan:
    """Tile shape for N=n_rows, V=vocab; ``chunk_size`` (if given) fixes the rows per tile."""
    cols = min(vocab, DEFAULT_COLS)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        rows = chunk_size
    else:
        rows = max(1, TILE_ELEMENTS // cols)
    return Plan(rows=max(1, min(rows, n_rows)), cols=cols)


def _spans(total: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _scaled_hidden(hidden: torch.Tensor, inv_temp: float) -> torch.Tensor:
    # Scaling the [N, H] input instead of the [N, V] logits folds the temperature in for free.
    hs = hidden.float()
    if inv_temp != 1.0:
        hs = hs * inv_temp
    return hs.contiguous()


def _weight_tile(weight, bias, c0: int, c1: int, inv_temp: float):
    w = weight[c0:c1].float()
    b = None if bias is None else bias[c0:c1].float() * inv_temp
    return w, b


def _logits_into(out: torch.Tensor, hs_rows: torch.Tensor, w: torch.Tensor, b) -> torch.Tensor:
    # ``out=`` reuses one buffer: fresh [rows, cols] allocations would page-fault on every tile.
    if b is None:
        return torch.mm(hs_rows, w.T, out=out)
    return torch.addmm(b, hs_rows, w.T, out=out)


def _target_hits(ids_rows: torch.Tensor, c0: int, c1: int):
    """Rows whose target lies in vocabulary columns [c0, c1), and its column inside the tile."""
    hit = ((ids_rows >= c0) & (ids_rows < c1)).nonzero().squeeze(1)
    return hit, ids_rows[hit] - c0


@dataclass
class _Sweep:
    """Running state of the online logsumexp over vocabulary tiles, one entry per token."""

    m: torch.Tensor  # running max of z
    s: torch.Tensor  # sum exp(z - m)
    z_target: torch.Tensor  # z at the selected token
    s2: torch.Tensor | None  # sum exp(z - m) * (z - m), for the entropy
    acc: torch.Tensor | None  # sum exp(z - m) * W_j [N, H], for d logp / d hidden

    @classmethod
    def empty(cls, hs: torch.Tensor, with_entropy: bool, grad_unit: bool) -> "_Sweep":
        n = hs.shape[0]
        new = lambda: hs.new_zeros(n)  # noqa: E731
        acc = hs.new_zeros(hs.shape) if grad_unit else None
        return cls(m=new(), s=new(), z_target=new(), s2=new() if with_entropy else None, acc=acc)


def _online_update(st: _Sweep, r0: int, r1: int, z, tmp, w, first: bool) -> None:
    """Fold one logits tile ``z`` (rows r0:r1) into the running state; clobbers ``z``."""
    m_old = st.m[r0:r1]
    tile_max = z.amax(1)
    m_new = tile_max if first else torch.maximum(m_old, tile_max)
    z.sub_(m_new[:, None])  # z - m <= 0: exp cannot overflow
    if st.s2 is not None or st.acc is not None:
        e = torch.exp(z, out=tmp)  # keep z - m for the entropy term
    else:
        e = z.exp_()
    s_tile = e.sum(1)
    if first:
        st.s[r0:r1] = s_tile
        if st.s2 is not None:
            st.s2[r0:r1] = z.mul_(e).sum(1)
        if st.acc is not None:
            torch.mm(e, w, out=st.acc[r0:r1])
    else:
        scale = torch.exp(m_old - m_new)  # rescale old sums from the old max to the new one
        if st.s2 is not None:
            s2 = (st.s2[r0:r1] + (m_old - m_new) * st.s[r0:r1]) * scale
            st.s2[r0:r1] = s2 + z.mul_(e).sum(1)
        st.s[r0:r1] = st.s[r0:r1] * scale + s_tile
        if st.acc is not None:
            st.acc[r0:r1].mul_(scale[:, None]).addmm_(e, w)
    st.m[r0:r1] = m_new


class ForwardResult(NamedTuple):
    logp: torch.Tensor  # [N] fp32
    lse: torch.Tensor  # [N] fp32
    entropy: torch.Tensor | None  # [N] fp32
    dlogp_dhidden: torch.Tensor | None  # [N, H] fp32, only for the frozen-head path


def tiled_forward(hidden, weight, bias, token_ids, inv_temp, with_entropy, plan, grad_unit=False):
    """One sweep over the vocabulary; no autograd. ``grad_unit`` also returns d logp / d hidden."""
    hs = _scaled_hidden(hidden, inv_temp)
    n, vocab = hs.shape[0], weight.shape[0]
    st = _Sweep.empty(hs, with_entropy, grad_unit)
    buf = hs.new_empty(plan.rows * plan.cols)
    tmp = hs.new_empty(plan.rows * plan.cols) if (with_entropy or grad_unit) else None
    for c0, c1 in _spans(vocab, plan.cols):
        w, b = _weight_tile(weight, bias, c0, c1, inv_temp)
        for r0, r1 in _spans(n, plan.rows):
            shape = (r1 - r0, c1 - c0)
            z = _logits_into(buf[: shape[0] * shape[1]].view(shape), hs[r0:r1], w, b)
            hit, col = _target_hits(token_ids[r0:r1], c0, c1)
            st.z_target[r0 + hit] = z[hit, col]
            t = None if tmp is None else tmp[: shape[0] * shape[1]].view(shape)
            _online_update(st, r0, r1, z, t, w, first=c0 == 0)
    log_s = st.s.log()
    lse = st.m + log_s
    entropy = None if st.s2 is None else log_s - st.s2 / st.s
    dlogp = None
    if grad_unit:
        # d logp_i / d hs_i = W[y_i] - E_p[W]; the chain rule through hs = hidden / T adds 1 / T.
        dlogp = (weight[token_ids].float() - st.acc / st.s[:, None]) * inv_temp
    return ForwardResult(st.z_target - lse, lse, entropy, dlogp)


def _grad_logits(z, tmp, lse, entropy, g_lp, g_ent, hit, col):
    """dL/dz for one tile, in place in ``z`` (which holds the logits on entry).

    d logp / dz = onehot - p;  d entropy / dz = -p * (log p + entropy).
    """
    z.sub_(lse[:, None])  # log p
    if g_ent is not None:
        p = torch.exp(z, out=tmp)
        z.add_(entropy[:, None]).mul_(g_ent[:, None])
        if g_lp is not None:
            z.add_(g_lp[:, None])
        z.mul_(p).neg_()
    else:
        z.exp_().mul_(-g_lp[:, None])
    if g_lp is not None:
        z[hit, col] += g_lp[hit]
    return z


@dataclass
class _Grads:
    hs: torch.Tensor | None  # [N, H] fp32, w.r.t. the temperature-scaled hidden
    weight: torch.Tensor | None  # [V, H] fp32
    bias: torch.Tensor | None  # [V] fp32, w.r.t. bias / T


def tiled_backward(hidden, weight, bias, token_ids, saved, g_lp, g_ent, inv_temp, plan, needs):
    """Recompute each logits tile and push dL/dz into the grads named by ``needs`` (h, w, b)."""
    lse, entropy = saved
    hs = _scaled_hidden(hidden, inv_temp)
    n, vocab = hs.shape[0], weight.shape[0]
    gr = _Grads(
        hs=torch.zeros_like(hs) if needs[0] else None,
        weight=hs.new_zeros(weight.shape) if needs[1] else None,
        bias=hs.new_zeros(vocab) if needs[2] else None,
    )
    buf = hs.new_empty(plan.rows * plan.cols)
    tmp = hs.new_empty(plan.rows * plan.cols) if g_ent is not None else None
    pick = lambda t, r0, r1: None if t is None else t[r0:r1]  # noqa: E731
    for c0, c1 in _spans(vocab, plan.cols):
        w, b = _weight_tile(weight, bias, c0, c1, inv_temp)
        for r0, r1 in _spans(n, plan.rows):
            shape = (r1 - r0, c1 - c0)
            z = _logits_into(buf[: shape[0] * shape[1]].view(shape), hs[r0:r1], w, b)
            hit, col = _target_hits(token_ids[r0:r1], c0, c1)
            t = None if tmp is None else tmp[: shape[0] * shape[1]].view(shape)
            g = _grad_logits(z, t, lse[r0:r1], pick(entropy, r0, r1), pick(g_lp, r0, r1),
                             pick(g_ent, r0, r1), hit, col)
            if gr.hs is not None:
                gr.hs[r0:r1].addmm_(g, w)
            if gr.weight is not None:
                gr.weight[c0:c1].addmm_(g.T, hs[r0:r1])  # hs already carries the 1 / T
            if gr.bias is not None:
                gr.bias[c0:c1] += g.sum(0)
    return gr


class SelectedLogprobsFn(torch.autograd.Function):
    """Autograd wrapper: forward sweep, backward by recompute (or by a stored d logp / d hidden)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, inv_temp, with_entropy, plan, store_grad_h):
        res = tiled_forward(hidden, weight, bias, token_ids, inv_temp, with_entropy, plan,
                            grad_unit=store_grad_h)
        ctx.set_materialize_grads(False)  # unused outputs (e.g. a metric-only entropy) give None
        ctx.save_for_backward(hidden, weight, bias, token_ids, res.lse, res.entropy,
                              res.dlogp_dhidden)
        ctx.inv_temp, ctx.plan, ctx.with_entropy = inv_temp, plan, with_entropy
        entropy = res.entropy if with_entropy else res.logp.new_empty(0)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return res.logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, token_ids, lse, entropy, dlogp_dh = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        g_ent = g_ent if ctx.with_entropy else None
        grad_h = None
        if dlogp_dh is not None and g_lp is not None:
            grad_h = g_lp[:, None] * dlogp_dh  # frozen head: the forward did the work
            g_lp = None
        if g_lp is not None or g_ent is not None:
            gr = tiled_backward(hidden, weight, bias, token_ids, (lse, entropy), g_lp, g_ent,
                                ctx.inv_temp, ctx.plan, needs)
            if gr.hs is not None:
                extra = gr.hs * ctx.inv_temp
                grad_h = extra if grad_h is None else grad_h + extra
            grad_w = None if gr.weight is None else gr.weight.to(weight.dtype)
            grad_b = None if gr.bias is None else (gr.bias * ctx.inv_temp).to(bias.dtype)
        else:
            grad_w = grad_b = None
        if grad_h is not None and needs[0]:
            grad_h = grad_h.to(hidden.dtype)
        else:
            grad_h = None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def torch_selected_logprobs(hidden, weight, token_ids, bias, temperature, with_entropy,
                            chunk_size):
    """Torch backend on already-validated 2-D inputs with no ignored rows. -> (logp, entropy|None)."""
    plan = make_plan(hidden.shape[0], weight.shape[0], chunk_size)
    inv_temp = 1.0 / float(temperature)
    params = [t for t in (hidden, weight, bias) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in params)):
        res = tiled_forward(hidden, weight, bias, token_ids, inv_temp, with_entropy, plan)
        return res.logp, res.entropy
    head_frozen = not weight.requires_grad and not (bias is not None and bias.requires_grad)
    store = hidden.requires_grad and head_frozen
    logp, entropy = SelectedLogprobsFn.apply(hidden, weight, bias, token_ids, inv_temp,
                                             with_entropy, plan, store)
    return logp, (entropy if with_entropy else None)
