"""PPO's value model V_psi, in the two shapes the paper's memory argument is about.

``separate``: a full copy of the start model with a scalar head, every weight trained: as large as
the policy, and its optimiser state too (the paper's setting, and PPO's memory cost).
``lora``: a second LoRA adapter ("value") on the policy's own frozen base, plus a head: the value
model costs an adapter and H + 1 numbers. The policy's forward uses the "default" adapter, the
value forward switches to "value"; pi_ref (all adapters disabled) is unchanged.

Both map a batch to values [B, T] aligned with the next-token targets (position t: the state after
token t, before output token t + 1 is produced).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from grpo_cli.errors import UserError
from grpo_cli.models.load import is_peft
from grpo_cli.models.policy import hidden_states
from grpo_cli.models.scorer import Scorer, zero_head

VALUE_ADAPTER = "value"


def separate_value_model(lm: torch.nn.Module, lr_scale: float) -> Scorer:
    """A trainable copy of the start model (LoRA merged away) with a zero-initialised head."""
    copy_ = copy.deepcopy(lm)
    if is_peft(copy_):
        copy_ = copy_.merge_and_unload()  # fresh adapters are zero: this is the start model
    copy_.requires_grad_(True)
    value = Scorer(copy_, "value")
    value.lr_scale = lr_scale
    return value


@contextlib.contextmanager
def active_adapter(model, name: str) -> Iterator[None]:
    """Run with adapter ``name`` active. peft's set_adapter also freezes the other adapters; both are
    trainable again afterwards."""
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)


class LoraValueModel(torch.nn.Module):
    """A "value" adapter on the policy's peft model and a head; holds the adapter's parameters (so
    the optimiser gives them the value learning rate) without owning the policy."""

    def __init__(self, policy_model, lr_scale: float):
        super().__init__()
        if not is_peft(policy_model):
            raise UserError(
                "algorithm.value_model=lora: needs lora.enabled=true (the value adapter shares the policy's base)"
            )
        config = copy.deepcopy(policy_model.peft_config["default"])
        policy_model.add_adapter(VALUE_ADAPTER, config)
        with active_adapter(policy_model, "default"):
            pass  # re-marks both adapters trainable
        object.__setattr__(self, "policy_model", policy_model)  # not a submodule: the policy owns it
        self.adapter = torch.nn.ParameterList(
            [p for n, p in policy_model.named_parameters() if f".{VALUE_ADAPTER}." in n]
        )
        self.head = zero_head(policy_model)
        self.lr_scale = lr_scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with active_adapter(self.policy_model, VALUE_ADAPTER):
            hidden = hidden_states(self.policy_model, input_ids, attention_mask)
        return self.head(hidden).squeeze(-1).float()


def build_value_model(kind: str, policy_model, lr_scale: float) -> torch.nn.Module:
    if kind == "separate":
        return separate_value_model(policy_model, lr_scale)
    if kind == "lora":
        return LoraValueModel(policy_model, lr_scale)
    raise UserError(f"algorithm.value_model: expected 'separate' or 'lora', got '{kind}'")
