"""``selected_logprobs``: the one entry point the trainer calls; picks a backend and masks rows.

Shapes: N tokens, H hidden size, V vocabulary size.

Backends: ``"torch"`` (tiled autograd.Function, any device), ``"triton"`` (fused CUDA kernels,
imported lazily so the package works without triton), ``"reference"`` (naive [N, V] oracle) and
``"auto"`` (triton on CUDA tensors when triton imports, else torch). Rows whose id equals
``ignore_index`` are dropped before the backend runs, so they cost nothing, and come back as
log-prob 0 / entropy 0 with zero gradient.
"""

from __future__ import annotations

import functools

import torch

from grpo_cli.kernels.fused import torch_selected_logprobs
from grpo_cli.kernels.reference import reference_selected_logprobs

BACKENDS = ("auto", "torch", "triton", "reference")


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when the Triton backend imports, else why not (cached: the import is slow)."""
    try:
        import grpo_cli.kernels.triton_logprob  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``"auto"`` stands for on ``device``; validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_import_error() is None else "torch"
    if backend == "triton" and triton_import_error() is not None:
        raise RuntimeError(f"backend='triton' but triton is unusable: {triton_import_error()}")
    return backend


def _check_inputs(hidden, weight, token_ids, bias, temperature) -> None:
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError("hidden and weight must be floating point tensors")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"need hidden [..., H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if token_ids.shape != hidden.shape[:-1]:
        raise ValueError(
            f"token_ids {tuple(token_ids.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}"
        )
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token_ids must be int64 or int32, got {token_ids.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _run_backend(name, hidden, weight, token_ids, bias, temperature, with_entropy, chunk_size, vocab_tile):
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= weight.shape[0]):
        raise IndexError(f"token ids must lie in [0, {weight.shape[0]}) or equal ignore_index")
    if name == "torch":
        return torch_selected_logprobs(
            hidden, weight, token_ids, bias, temperature, with_entropy, chunk_size, vocab_tile
        )
    from grpo_cli.kernels.triton_logprob import triton_selected_logprobs  # deferred: triton is optional

    return triton_selected_logprobs(hidden, weight, token_ids, bias, temperature, with_entropy, chunk_size)


def selected_logprobs(
    hidden,
    weight,
    token_ids,
    *,
    bias=None,
    temperature=1.0,
    with_entropy=False,
    chunk_size=None,
    backend="auto",
    ignore_index=-100,
    vocab_tile=None,
):
    """log softmax((hidden @ weight.T + bias) / temperature) at ``token_ids``, without [N, V].

    hidden [N, H] (any float dtype; extra leading dims are flattened and restored), weight [V, H]
    (the LM head, may or may not require grad), token_ids [N] long, bias [V] or None.
    ``chunk_size``: tokens per tile (default: sized for ~16 MiB fp32 tiles). ``vocab_tile``: the
    torch backend's vocabulary entries per tile (default: sized with the rows; tests fix it to
    exercise ragged tiles); the other backends ignore it.
    Returns logprobs [N] float32, or (logprobs [N], entropy [N]) when ``with_entropy``; entropy
    is of softmax(logits / temperature) and carries a gradient. backend: "auto" (triton on CUDA
    when importable, else torch), "torch", "triton", "reference".
    """
    _check_inputs(hidden, weight, token_ids, bias, temperature)
    # Under trainer.precision=bf16 the model ran in autocast; the head's logits stay in the weight's
    # dtype (fp32 by default): log-probs are the policy's probabilities, they need the precision.
    with torch.autocast(hidden.device.type, enabled=False):
        return _selected_logprobs(
            hidden, weight, token_ids, bias, temperature, with_entropy, chunk_size, backend, ignore_index, vocab_tile
        )


def _selected_logprobs(
    hidden, weight, token_ids, bias, temperature, with_entropy, chunk_size, backend, ignore_index, vocab_tile
):
    name = resolve_backend(backend, hidden.device)
    lead = hidden.shape[:-1]
    h2, ids = hidden.reshape(-1, hidden.shape[-1]), token_ids.reshape(-1).long()
    if name == "reference":
        out = reference_selected_logprobs(
            h2, weight, ids, bias=bias, temperature=temperature, with_entropy=with_entropy, ignore_index=ignore_index
        )
        logp, entropy = (out[0].float(), out[1].float()) if with_entropy else (out.float(), None)
    else:
        valid = ids != ignore_index
        if bool(valid.all()):
            logp, entropy = _run_backend(name, h2, weight, ids, bias, temperature, with_entropy, chunk_size, vocab_tile)
        else:
            # Drop masked rows before the vocabulary sweep; index_copy keeps the graph intact.
            keep = valid.nonzero().squeeze(1)
            lp_k, ent_k = _run_backend(
                name,
                h2.index_select(0, keep),
                weight,
                ids[keep],
                bias,
                temperature,
                with_entropy,
                chunk_size,
                vocab_tile,
            )
            zeros = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
            logp = zeros.index_copy(0, keep, lp_k)
            entropy = None if ent_k is None else zeros.index_copy(0, keep, ent_k)
    if not with_entropy:
        return logp.reshape(lead)
    return logp.reshape(lead), entropy.reshape(lead)
