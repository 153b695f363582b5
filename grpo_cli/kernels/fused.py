"""Selected-token log-probs in plain torch, tiled so the [N, V] logits never exist at once.

Shapes: N tokens, H hidden size, V vocabulary size; a tile is ``rows x cols`` of the logits
(rows <= N tokens, cols <= V vocabulary entries). ``z = (hidden @ weight.T + bias) / temperature``
are the scaled logits, ``p = softmax(z)``, ``lse = logsumexp(z)``, ``logp = z[y] - lse``.

Design (time and peak memory against the naive path: docs/performance.md, "Fused log-probs"):

* GEMM count. The upstream gradient ``g`` is per row (a policy-gradient loss, not a scalar
  cross-entropy), and ``dW = sum_i g_i (onehot_i - p_i)^T h_i`` cannot be formed before ``g`` is
  known without keeping all of ``p`` ([N, V]; even in bf16 that alone is 0.5 GB against a
  0.4 GB budget at N, V = 8192, 32000). The fused-linear-loss trick (finish dW in the forward) only
  works for a scalar loss. So a trainable LM head costs 4 GEMMs (forward logits; backward
  logits, dH, dW) against the naive 3. It still wins on time: the naive path spends more than a
  GEMM's worth on memory traffic and page faults of its four [N, V] fp32 temporaries, while each
  of our tiles is one reused buffer (``out=``; fresh per-chunk allocations page-fault every
  time) and sees one ``exp``.
* Frozen LM head (LoRA): ``d logp_i / d h_i = (W[y_i] - E_p[W]) / temperature`` is per row, so the
  forward accumulates ``E_p[W]`` flash-attention style and the backward is one multiply by ``g``:
  2 GEMMs in all, like the naive path, without [N, V]. An entropy gradient, when one actually
  arrives (not for a detached metric), is recomputed in the backward.
* Few passes per tile. The per-row shift rides in the GEMM as trailing columns
  (``[h, 1, -m, -d] @ [W, b, 1, 1]^T = z - m - d``), so a tile comes out of the GEMM already
  shifted and needs one in-place ``exp``. In the backward the factor ``-g`` is folded into the
  [N, H] operands instead of the [rows, cols] tile, and the one-hot part of ``onehot - p`` is a
  gather / index_add on [N, H] after the sweep. Fewer big elementwise ops also means fewer
  OpenMP regions, which matters on a loaded machine (each region waits for a preempted thread).
* Online logsumexp with a shift that may lag the true max: the first tile is shifted by its exact
  max ``m``, later ones by the running logsumexp ``m + d``; a row whose tile overflows ``exp``
  (a logit ~88 above everything before it) is redone exactly. Keeping ``m`` (a logit value) and
  ``d`` (small) apart makes ``z - m`` cancel exactly, as accurate as naive ``z - max - log sum``.
* Tiles of 1M fp32 elements (up to 1,024 rows x ~1k columns). The forward runs rows outer: one
  block's operands and running state at a time, the weight tiles copied once per block (a few
  per cent of a GEMM's traffic). The trainable head's backward runs vocabulary outer, each dW
  tile finished before the next: the [V, H] dW dominates its memory anyway. Tile sizes from 1M
  to 16M elements took the same time at the 0.5B shape (docs/performance.md, "Fused log-probs").
* All maths is fp32 whatever the input dtype; grads are cast back at the end. The dW accumulator
  is fp32 [V, H]: for a bf16 head that is twice the gradient's own size.

torch.compile was not used: the eager loop is GEMM-bound (one exp per element besides the GEMMs)
and meets the targets; compiling would add a C-compiler dependency on CPU for little gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

# Tile budget: TILE_ELEMENTS fp32 elements (4 MiB), at most MAX_ROWS tokens by COL_MULTIPLE-aligned
# vocabulary columns. Small tiles cost no time against 16M-element ones at real shapes (the tile
# sweep in docs/performance.md, "Fused log-probs") and keep the pass's own memory to a few tiles
# plus one block's [MAX_ROWS, H] operands: with a frozen head, less than the d logp / d hidden
# output itself.
TILE_ELEMENTS = 1024 * 1024
MAX_ROWS = 1024
COL_MULTIPLE = 64  # vocabulary tile widths are multiples of this (aligned GEMM panels)


class Plan(NamedTuple):
    """Tile shape: ``rows`` tokens by ``cols`` vocabulary entries."""

    rows: int
    cols: int


def make_plan(n_rows: int, vocab: int, chunk_size: int | None = None, vocab_tile: int | None = None) -> Plan:
    """Tile shape for N=n_rows, V=vocab; ``chunk_size`` (if given) fixes the rows per tile and
    ``vocab_tile`` (if given) the vocabulary entries per tile, overriding the budget (tests use it
    to make the last tile ragged)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = max(1, min(n_rows, chunk_size or MAX_ROWS))
    cols = vocab_tile or max(COL_MULTIPLE, TILE_ELEMENTS // rows // COL_MULTIPLE * COL_MULTIPLE)
    return Plan(rows=rows, cols=max(1, min(vocab, cols)))


def _spans(total: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, step):
        yield start, min(start + step, total)


class _Operands:
    """fp32 GEMM operands with the bias and the per-row shift riding as trailing columns.

    ``hs_aug = [hidden / T, 1 (if bias), -m, -d]`` [rows, H+k] for the rows :meth:`load` put there
    and, per vocabulary tile, ``w_aug = [W, bias / T (if bias), 1, 1]`` [cols, H+k], so
    ``hs_aug @ w_aug.T = z - m - d``. The shift is kept in two parts, ``m`` (a max, a logit value
    itself) and ``d`` (small), so ``z - m`` cancels exactly and ``- d`` is added at small scale: as
    accurate as naive ``z - max - log(sum)``. The columns trail because the GEMM sums along H first.
    ``rows``: the most rows loaded at once (default: all of ``hidden``, which are then loaded).
    """

    def __init__(self, hidden, weight, bias, inv_temp: float, cols: int, rows: int | None = None):
        n, h = hidden.shape
        k = 2 + (bias is not None)
        self._hs_buf = hidden.new_empty((n if rows is None else rows, h + k), dtype=torch.float32)
        self.weight, self.bias, self.inv_temp, self.h = weight, bias, inv_temp, h
        self._w_buf = hidden.new_empty((min(cols, weight.shape[0]), h + k), dtype=torch.float32)
        if rows is None:
            self.load(hidden)

    def load(self, hidden: torch.Tensor) -> None:
        """Make ``hidden`` [rows, H] the rows of ``hs_aug`` (and of its views ``hs``, ``neg_m``, ``neg_d``)."""
        self.hs_aug = self._hs_buf[: hidden.shape[0]]
        # Widen first, then scale: a bf16/fp16 product would be rounded before it reaches fp32.
        self.hs_aug[:, : self.h].copy_(hidden).mul_(self.inv_temp)  # temperature folded in for free
        if self.bias is not None:
            self.hs_aug[:, self.h] = 1.0
        self.hs = self.hs_aug[:, : self.h]
        self.neg_m, self.neg_d = self.hs_aug[:, -2], self.hs_aug[:, -1]

    def weight_tile(self, c0: int, c1: int):
        """(w_aug [cols, H+k], w [cols, H] view) for vocabulary entries [c0, c1)."""
        w_aug = self._w_buf[: c1 - c0]
        w_aug[:, : self.h].copy_(self.weight[c0:c1])
        if self.bias is not None:
            w_aug[:, self.h].copy_(self.bias[c0:c1]).mul_(self.inv_temp)  # widened, then scaled
        w_aug[:, -2:] = 1.0
        return w_aug, w_aug[:, : self.h]


def _tile_view(buf: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    return buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)


@dataclass
class _Sweep:
    """Online-logsumexp state per token, relative to the shift ``m + d``."""

    m: torch.Tensor  # max of the first tile (exact)
    d: torch.Tensor  # small correction: the running logsumexp is m + d + log(s)
    s: torch.Tensor  # sum exp(z - m - d)
    z_target: torch.Tensor  # z - m at the selected token
    s2: torch.Tensor | None  # sum exp(z - m - d) * (z - m - d), for the entropy
    acc: torch.Tensor | None  # sum exp(z - m - d) * W_j [N, H], for d logp / d hidden

    @classmethod
    def empty(cls, n: int, like: torch.Tensor, with_entropy: bool, acc: torch.Tensor | None):
        """Fresh state for n rows; ``acc`` (zeroed by this) is where E_p[W] accumulates, or None."""
        new = lambda *shape: like.new_zeros(shape, dtype=torch.float32)  # noqa: E731
        return cls(
            m=new(n),
            d=new(n),
            s=new(n),
            z_target=new(n),
            s2=new(n) if with_entropy else None,
            acc=None if acc is None else acc.zero_(),
        )

    def rebase(self, rows, new_d: torch.Tensor, raise_m: torch.Tensor | None = None) -> None:
        """Re-express the sums of ``rows`` relative to the shift ``m + raise_m + new_d``."""
        delta = self.d[rows] - new_d
        if raise_m is not None:  # the big part of a shift goes to m, keeping d small
            delta = delta - raise_m
            self.m[rows] = self.m[rows] + raise_m
            self.z_target[rows] = self.z_target[rows] - raise_m
        f = torch.exp(delta)
        if self.s2 is not None:
            self.s2[rows] = f * (self.s2[rows] + delta * self.s[rows])
        if self.acc is not None:
            self.acc[rows] = self.acc[rows] * f[:, None]
        self.s[rows] = self.s[rows] * f
        self.d[rows] = new_d


def _exp_tile(t: torch.Tensor, tmp: torch.Tensor | None) -> torch.Tensor:
    """exp(t): into ``tmp`` when t must survive (the entropy sum reads it), else in place."""
    return t.exp_() if tmp is None else torch.exp(t, out=tmp)


def _redo_overflow(st, ops, w_aug, t, e, s_tile, r0, bad) -> None:
    """Rows ``bad`` (tile-local) overflowed exp: redo their tile shifted by its exact max."""
    rows = r0 + bad
    t_bad = ops.hs_aug[rows] @ w_aug.T  # still z - m - d
    top = t_bad.amax(1)
    st.rebase(rows, st.d[rows], raise_m=top)
    t_bad.sub_(top[:, None])
    e_bad = torch.exp(t_bad)
    if e is not t:
        t[bad] = t_bad
    e[bad] = e_bad
    s_tile[bad] = e_bad.sum(1)


def _fold_tile(st: _Sweep, ops: _Operands, w_aug, w, token_ids, t, tmp, r0, r1, c0, c1):
    """Fold logits tile (rows r0:r1, vocab c0:c1) into the running state; ``t`` is scratch."""
    rows = slice(r0, r1)
    ops.neg_m[rows], ops.neg_d[rows] = -st.m[rows], -st.d[rows]
    torch.mm(ops.hs_aug[rows], w_aug.T, out=t)  # t = z - m - d
    if c0 == 0:  # first tile: m is its exact max, so nothing here can overflow
        st.m[rows] = t.amax(1)
        t.sub_(st.m[rows, None])
    hit = ((token_ids[rows] >= c0) & (token_ids[rows] < c1)).nonzero().squeeze(1)
    st.z_target[r0 + hit] = t[hit, token_ids[r0 + hit] - c0] + st.d[r0 + hit]
    e = _exp_tile(t, tmp)
    s_tile = e.sum(1)
    bad = (~torch.isfinite(s_tile)).nonzero().squeeze(1)
    if bad.numel():
        _redo_overflow(st, ops, w_aug, t, e, s_tile, r0, bad)
    st.s[rows] += s_tile
    if st.acc is not None:
        st.acc[rows].addmm_(e, w)
    if st.s2 is not None:
        st.s2[rows] += t.mul_(e).sum(1)  # t is not needed any more
    st.rebase(rows, st.d[rows] + st.s[rows].log())  # s -> 1: later tiles rarely overflow


class ForwardResult(NamedTuple):
    logp: torch.Tensor  # [N] fp32
    shift: tuple[torch.Tensor, torch.Tensor]  # (m, r): logsumexp = m + r, kept in two parts
    entropy: torch.Tensor | None  # [N] fp32
    dlogp_dhidden: torch.Tensor | None  # [N, H] fp32, only for the frozen-head path


def tiled_forward(hidden, weight, bias, token_ids, inv_temp, with_entropy, plan, grad_unit=False):
    """No autograd: one sweep over the vocabulary per block of ``plan.rows`` tokens, rows outer, so
    only one block's operands and running state exist at a time (the weight tiles are copied once
    per block instead). ``grad_unit`` also returns d logp / d hidden, accumulated in place in its
    [N, H] output: with a frozen head that output is the pass's only memory beyond the tiles."""
    (n, h), vocab = hidden.shape, weight.shape[0]
    new = lambda *shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    res = ForwardResult(new(n), (new(n), new(n)), new(n) if with_entropy else None, new(n, h) if grad_unit else None)
    ops = _Operands(hidden, weight, bias, inv_temp, plan.cols, rows=min(plan.rows, n))
    size = min(plan.rows, n) * min(plan.cols, vocab)
    buf = hidden.new_empty(size, dtype=torch.float32)
    tmp = hidden.new_empty(size, dtype=torch.float32) if with_entropy else None  # t outlives exp for s2
    for r0, r1 in _spans(n, plan.rows):
        ops.load(hidden[r0:r1])
        acc = None if res.dlogp_dhidden is None else res.dlogp_dhidden[r0:r1]
        st = _Sweep.empty(r1 - r0, buf, with_entropy, acc)
        ids = token_ids[r0:r1]
        for c0, c1 in _spans(vocab, plan.cols):
            w_aug, w = ops.weight_tile(c0, c1)
            e_buf = None if tmp is None else _tile_view(tmp, 0, r1 - r0, c0, c1)
            _fold_tile(st, ops, w_aug, w, ids, _tile_view(buf, 0, r1 - r0, c0, c1), e_buf, 0, r1 - r0, c0, c1)
        _finish_block(st, res, slice(r0, r1), weight, ids, inv_temp)
    return res


def _finish_block(st: _Sweep, res: ForwardResult, rows: slice, weight, token_ids, inv_temp: float) -> None:
    """Write one block's log-probs, shift, entropy and (frozen head) d logp / d hidden into ``res``."""
    log_s = st.s.log()
    r = st.d + log_s
    torch.sub(st.z_target, r, out=res.logp[rows])
    res.shift[0][rows], res.shift[1][rows] = st.m, r
    if res.entropy is not None:
        torch.sub(log_s, st.s2 / st.s, out=res.entropy[rows])
    if st.acc is not None:
        # d logp_i / d hs_i = W[y_i] - E_p[W]; the chain rule through hs = hidden / T adds 1 / T.
        st.acc.div_(st.s[:, None]).neg_().add_(weight[token_ids]).mul_(inv_temp)


def _entropy_grad_logits(t, tmp, entropy, g_lp, g_ent):
    """dL/dz without its one-hot part, in place in ``t`` (= log p on entry).

    d logp / dz = onehot - p;  d entropy / dz = -p * (log p + entropy).
    """
    p = torch.exp(t, out=tmp)
    t.add_(entropy[:, None]).mul_(g_ent[:, None])
    if g_lp is not None:
        t.add_(g_lp[:, None])
    return t.mul_(p).neg_()


@dataclass
class _Grads:
    hs: torch.Tensor | None  # [N, H] fp32, w.r.t. the temperature-scaled hidden
    weight: torch.Tensor | None  # [V, H] fp32
    bias: torch.Tensor | None  # [V] fp32, w.r.t. bias / T


def _sweep_grads(ops, gr, rhs, g_lp, entropy, g_ent, plan):
    """Accumulate q @ W and q^T @ rhs over all tiles, q = p (fast path) or the full dL/dz."""
    (n, _), vocab = ops.hs.shape, ops.weight.shape[0]
    size = min(plan.rows, n) * min(plan.cols, vocab)
    buf = ops.hs_aug.new_empty(size)
    tmp = None if g_ent is None else ops.hs_aug.new_empty(size)
    neg_g = None if g_lp is None else -g_lp
    for c0, c1 in _spans(vocab, plan.cols):
        w_aug, w = ops.weight_tile(c0, c1)
        for r0, r1 in _spans(n, plan.rows):
            t = torch.mm(ops.hs_aug[r0:r1], w_aug.T, out=_tile_view(buf, r0, r1, c0, c1))
            if g_ent is None:
                q = t.exp_()  # p; the -g factor lives in rhs and in the final row scaling
            else:
                q = _entropy_grad_logits(
                    t,
                    _tile_view(tmp, r0, r1, c0, c1),
                    entropy[r0:r1],
                    None if g_lp is None else g_lp[r0:r1],
                    g_ent[r0:r1],
                )
            if gr.hs is not None:
                gr.hs[r0:r1].addmm_(q, w)
            if gr.weight is not None:
                gr.weight[c0:c1].addmm_(q.T, rhs[r0:r1])
            if gr.bias is not None:
                gr.bias[c0:c1] += q.sum(0) if g_ent is not None else q.T @ neg_g[r0:r1]


def tiled_backward(hidden, weight, bias, token_ids, saved, g_lp, g_ent, inv_temp, plan, needs):
    """Recompute the logits tile by tile and return the grads named by ``needs`` (h, w, b).

    ``saved`` = (m, r, entropy) from the forward, logsumexp = m + r.
    """
    m, r, entropy = saved
    ops = _Operands(hidden, weight, bias, inv_temp, plan.cols)
    torch.neg(m, out=ops.neg_m)  # tiles come out as z - m - r = log p
    torch.neg(r, out=ops.neg_d)
    vocab = weight.shape[0]
    new = lambda *shape: ops.hs.new_zeros(shape)  # noqa: E731
    gr = _Grads(
        hs=new(*ops.hs.shape) if needs[0] else None,
        weight=new(*weight.shape) if needs[1] else None,
        bias=new(vocab) if needs[2] else None,
    )
    fast = g_ent is None  # dL/dz = g * (onehot - p): -g goes on the [N, H] side
    rhs = ops.hs * -g_lp[:, None] if (fast and gr.weight is not None) else ops.hs
    _sweep_grads(ops, gr, rhs, g_lp, entropy, g_ent, plan)
    if fast and gr.hs is not None:
        gr.hs.mul_(-g_lp[:, None])
    if g_lp is not None:  # the one-hot part: +g_i at (i, y_i)
        if gr.hs is not None:
            gr.hs.addcmul_(weight[token_ids].float(), g_lp[:, None])
        if gr.weight is not None:
            gr.weight.index_add_(0, token_ids, ops.hs * g_lp[:, None])
        if gr.bias is not None:
            gr.bias.index_add_(0, token_ids, g_lp)
    return gr


class SelectedLogprobsFn(torch.autograd.Function):
    """Autograd wrapper: forward sweep, backward by recompute (or by a stored d logp / d hidden)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, inv_temp, with_entropy, plan, store_grad_h):
        res = tiled_forward(hidden, weight, bias, token_ids, inv_temp, with_entropy, plan, grad_unit=store_grad_h)
        ctx.set_materialize_grads(False)  # unused outputs (e.g. a metric-only entropy) give None
        ctx.save_for_backward(hidden, weight, bias, token_ids, *res.shift, res.entropy)
        ctx.inv_temp, ctx.plan, ctx.with_entropy = inv_temp, plan, with_entropy
        # Held outside save_for_backward: the backward scales it in place into d hidden, so the
        # frozen-head pass never holds two [N, H] fp32 tensors at once.
        ctx.dlogp_dh = res.dlogp_dhidden
        entropy = res.entropy if with_entropy else res.logp.new_empty(0)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return res.logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, token_ids, m, r, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        # Upstream grads may be expanded views (e.g. from .sum()): make them plain fp32 vectors.
        g_lp = None if g_lp is None else g_lp.float().contiguous()
        g_ent = g_ent.float().contiguous() if (ctx.with_entropy and g_ent is not None) else None
        grad_h = None
        # Used up here: a second backward through a retained graph finds None and recomputes.
        dlogp_dh, ctx.dlogp_dh = ctx.dlogp_dh, None
        if dlogp_dh is not None and g_lp is not None:
            grad_h = dlogp_dh.mul_(g_lp[:, None])  # frozen head: the forward did the work
            g_lp = None
        if g_lp is not None or g_ent is not None:
            gr = tiled_backward(
                hidden, weight, bias, token_ids, (m, r, entropy), g_lp, g_ent, ctx.inv_temp, ctx.plan, needs
            )
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


def torch_selected_logprobs(hidden, weight, token_ids, bias, temperature, with_entropy, chunk_size, vocab_tile=None):
    """Torch backend on validated 2-D inputs with no ignored rows -> (logp, entropy | None)."""
    plan = make_plan(hidden.shape[0], weight.shape[0], chunk_size, vocab_tile)
    inv_temp = 1.0 / float(temperature)
    params = [t for t in (hidden, weight, bias) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in params)):
        res = tiled_forward(hidden, weight, bias, token_ids, inv_temp, with_entropy, plan)
        return res.logp, res.entropy
    head_frozen = not weight.requires_grad and not (bias is not None and bias.requires_grad)
    store = hidden.requires_grad and head_frozen
    logp, entropy = SelectedLogprobsFn.apply(hidden, weight, bias, token_ids, inv_temp, with_entropy, plan, store)
    return logp, (entropy if with_entropy else None)
