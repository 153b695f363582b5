"""The policy and its reference, and per-token log-probs of a batch.

Log-probs run the model without its output projection (the decoder gives hidden states [B, T, H])
and hand the projection to the fused kernel, so the [N, V] logits are never materialised.
The reference policy pi_ref is the same network with the LoRA adapter disabled (no second copy in
memory) or, for full fine-tuning, a frozen copy.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch

from grpo_cli.batch import Batch, position_ids
from grpo_cli.errors import UserError
from grpo_cli.kernels import selected_logprobs
from grpo_cli.models.load import is_peft, unwrap_peft
from grpo_cli.models.unpadded import unpadded_hidden_states, unpadded_unsupported

IGNORE = -100
"""Target id the fused kernel skips."""
PRECISIONS = ("fp32", "bf16")


def cpu_has_bf16() -> Optional[bool]:
    """Whether this CPU computes bf16 products in hardware (x86 AVX512-BF16 or AMX-BF16, Arm BF16),
    from /proc/cpuinfo's flags; None where it does not say (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {
                flag for line in f if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()
            }
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) if flags else None


def bf16_warning(precision: str, device: torch.device) -> Optional[str]:
    """The warning for bf16 autocast on a CPU without bf16 instructions, or None."""
    if precision != "bf16" or device.type != "cpu" or cpu_has_bf16() is not False:
        return None
    return (
        "trainer.precision=bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX, Arm BF16): its bf16 "
        "matrix products are emulated (a third of the fp32 rate on one such CPU); trainer.precision=fp32 is faster here"
    )


def autocast(precision: str, device: torch.device):
    """The context of forward passes at ``trainer.precision``: bf16 autocast, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"trainer.precision: expected one of {PRECISIONS}, got '{precision}'")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefixes: bool = True
) -> torch.Tensor:
    """[B, T, H] last hidden states (LoRA layers, if any, are injected in place and apply).

    Models the unpadded forward covers (Qwen2, Llama) skip padding in every projection and MLP and
    return 0 at padding positions (and with ``share_prefixes`` run rows' common first tokens once:
    ``model.share_prefixes``); others run ``decoder(...)`` (:func:`padded_hidden_states`)."""
    if unpadded_unsupported(model) is None:
        return unpadded_hidden_states(model, input_ids, attention_mask, share_prefixes)
    return padded_hidden_states(model, input_ids, attention_mask)


def padded_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reference: ``decoder(...)`` over every position, padding included."""
    decoder = unwrap_peft(model).get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.last_hidden_state


def token_logprobs(
    model: torch.nn.Module,
    batch: Batch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    backend: str = "fused",
    share_prefixes: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(o_t | q, o_<t) for every next-token target: logp [B, T-1] (and entropy [B, T-1]).

    Position t of the result scores token t+1 of ``batch.input_ids``; only completion targets are
    meaningful (``batch.target_mask``): the fused backend returns 0 elsewhere. ``share_prefixes``:
    as :func:`hidden_states`.
    """
    B, T = batch.input_ids.shape
    hidden = hidden_states(model, batch.input_ids, batch.attention_mask, share_prefixes)[:, :-1]  # [B, T-1, H]
    head = unwrap_peft(model).get_output_embeddings()
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # [N, H], N = B * (T-1)
    targets = batch.input_ids[:, 1:].reshape(-1)  # [N]
    # Prompt and padding targets are never trained on: the kernel skips them (log-prob 0). ``naive``
    # is the kernels' own oracle (full [N, V] logits), ``fused`` the tiled kernels.
    targets = torch.where(batch.completion_mask[:, 1:].reshape(-1).bool(), targets, IGNORE)
    out = selected_logprobs(
        flat_h,
        head.weight,
        targets,
        bias=head.bias,
        temperature=temperature,
        with_entropy=with_entropy,
        ignore_index=IGNORE,
        backend="reference" if backend == "naive" else "auto",
    )
    logp, ent = out if with_entropy else (out, None)
    logp = logp.view(B, T - 1)
    return logp, None if ent is None else ent.view(B, T - 1)


def store_projections(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep the decoder blocks' ``nn.Linear`` weights and biases in ``dtype``: for a frozen model only
    ever run under autocast to ``dtype``, which casts them to exactly these values at every forward.
    Half the memory in bf16 and no casts per forward, with bit-identical outputs (tested); the
    embedding, norms and LM head keep their dtype (they run outside autocast's casts)."""
    base = unwrap_peft(model)
    blocks = getattr(getattr(base, "model", None), "layers", None)
    for module in blocks.modules() if blocks is not None else ():
        if type(module) is torch.nn.Linear:
            module.to(dtype)


@dataclass
class Policy:
    """The model being trained, its tokenizer and its reference."""

    model: torch.nn.Module
    tokenizer: object
    frozen_reference: Optional[torch.nn.Module] = None
    logprob_backend: str = "fused"
    base_ref: Optional[str] = None
    """Where the base weights can be reloaded from (adapters of LoRA checkpoints point at it)."""
    extra: List[torch.nn.Module] = field(default_factory=list)
    """Modules an algorithm trains beside the model (PPO's value model), added by its ``setup``."""
    precision: str = "fp32"
    """``trainer.precision``: the forward passes of :meth:`autocast`."""
    share_prefixes: bool = True
    """``model.share_prefixes``: log-prob forwards run rows' common first tokens once."""

    def trainable(self) -> torch.nn.ModuleList:
        """Everything the optimiser updates (the parameters with requires_grad)."""
        return torch.nn.ModuleList([self.model, *self.extra])

    @classmethod
    def create(
        cls,
        model,
        tokenizer,
        *,
        keep_reference: bool,
        logprob_backend: str,
        base_ref=None,
        precision: str = "fp32",
        compact_reference: bool = True,
        share_prefixes: bool = True,
    ) -> Policy:
        """With LoRA the reference is free (adapter disabled); without, keep a frozen copy if asked.
        ``compact_reference``: under bf16 precision that copy keeps its blocks' projections in bf16."""
        ref = None
        if keep_reference and not is_peft(model):
            ref = copy.deepcopy(model).eval()
            ref.requires_grad_(False)
            if precision == "bf16" and compact_reference:
                store_projections(ref, torch.bfloat16)
        return cls(model, tokenizer, ref, logprob_backend, base_ref, precision=precision, share_prefixes=share_prefixes)

    def autocast(self):
        """Wrap forward passes (sampling, log-probs, losses; never ``backward``) in this."""
        return autocast(self.precision, self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logprobs(self, batch: Batch, *, temperature: float = 1.0, with_entropy: bool = False):
        return token_logprobs(
            self.model,
            batch,
            temperature=temperature,
            with_entropy=with_entropy,
            backend=self.logprob_backend,
            share_prefixes=self.share_prefixes,
        )

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """Yields the module that computes pi_ref: the adapter-disabled policy or the frozen copy."""
        if is_peft(self.model):
            with self.model.disable_adapter():
                yield self.model
        elif self.frozen_reference is not None:
            yield self.frozen_reference
        else:
            raise RuntimeError("this algorithm needs a reference model, but none was kept")

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch, *, temperature: float = 1.0) -> torch.Tensor:
        with self.reference() as ref:
            return token_logprobs(
                ref, batch, temperature=temperature, backend=self.logprob_backend, share_prefixes=self.share_prefixes
            )[0]
