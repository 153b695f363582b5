"""Load a policy from any source (embedded tiny model, hub name, local dir, run dir), apply LoRA, save.

Checkpoint layout (``<run>/checkpoints/<name>/``): a transformers model directory (full fine-tuning)
or a peft adapter directory whose ``adapter_config.json`` names its base model, plus the tokenizer.
An embedded tiny base that LoRA trains on is saved once as ``<run>/base_model`` so adapters reload.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from grpo_cli.config.schema import LoraConfig, ModelConfig
from grpo_cli.errors import UserError
from grpo_cli.models.tiny import build_tiny_model, build_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def looks_local(name_or_path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything with a leading ``/ . ~`` or more parts is a path."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def resolve_model_dir(name_or_path: str, key: str = "model.name_or_path") -> str:
    """A run directory resolves to its final (or latest) checkpoint; anything else is returned as is.
    ``key`` is the setting that named it, for the error."""
    p = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not p.exists():
        from grpo_cli.config.usage import made_by

        command = made_by(name_or_path)  # runs/sft_arithmetic/latest before any SFT run: say what makes it
        hint = f": make it with '{command}' or set {key}=<run or model dir>" if command else ""
        raise UserError(f"{key}: no such directory '{name_or_path}'{hint}")
    if not p.is_dir() or (p / "config.json").exists() or (p / "adapter_config.json").exists():
        return name_or_path
    ckpts = p / "checkpoints"
    if ckpts.is_dir():
        if (ckpts / "final").is_dir():
            return str(ckpts / "final")
        steps = sorted(d for d in ckpts.iterdir() if d.name.startswith("step_") and d.name[5:].isdigit())
        if steps:
            return str(steps[-1])
    raise UserError(f"{key}: '{name_or_path}' is a directory with no model, adapter or checkpoint")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"model.dtype: expected one of {sorted(DTYPES)}, got '{name}'")
    return DTYPES[name]


def load_model_and_tokenizer(cfg: ModelConfig) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase, Optional[str]]:
    """The starting model (adapters of a LoRA checkpoint merged in), its tokenizer, and the path its
    weights can be reloaded from (None when they exist only in memory: the tiny model, a merged adapter)."""
    dtype = _dtype(cfg.dtype)
    if cfg.name_or_path == "tiny":
        tok = build_tokenizer()
        model = build_tiny_model(cfg.tiny, len(tok), tok.pad_token_id, tok.eos_token_id)
        return model.to(dtype), tok, None
    path = resolve_model_dir(cfg.name_or_path)
    adapter = Path(path) / "adapter_config.json"
    base_path = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.exists() else path
    try:
        tok = load_tokenizer(path, cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot load '{cfg.name_or_path}': {str(e).splitlines()[0]}") from None
    if adapter.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok, None if adapter.exists() else path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """AutoTokenizer, except for tokenizers saved as a plain ``tokenizers`` pipeline (the embedded
    character tokenizer): AutoTokenizer would rebuild them as the model type's own class (Qwen2's
    BPE pre-tokenizer drops newlines), so they load as they were saved."""
    config = Path(path) / "tokenizer_config.json"
    if config.exists():
        cls = json.loads(config.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PreTrainedModel:
    """Wrap ``model`` with fresh LoRA adapters (only they train); a no-op when LoRA is off."""
    if not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLora, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in present]
    if not targets:
        raise UserError(f"lora.target_modules: none of {list(cfg.target_modules)} is a module of this model")
    peft_cfg = PeftLora(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Set HF's per-block checkpointing flag (non-reentrant), which HF's forward and the padding-free
    one both read: ``activation_checkpointing_enable`` in transformers 5, ``gradient_checkpointing_enable``
    before it (the same flag; the old name is deprecated)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def save_checkpoint_model(model, tok, out: Path, base_ref: Optional[str], state_dict: Optional[dict] = None) -> None:
    """Write ``model`` (or only its adapter, pointing at ``base_ref``) and the tokenizer to ``out``;
    ``state_dict`` replaces the model's own (the gathered weights of a sharded model)."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_checkpoint"):  # a Scorer (reward model): its LM, then its head
        return model.save_checkpoint(tok, out, base_ref)
    if is_peft(model):
        # peft records this path so the adapter reloads on top of the right base.
        model.peft_config["default"].base_model_name_or_path = base_ref
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(out)
