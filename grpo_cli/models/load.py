"""Load a policy from any source (embedded tiny model, hub name, local dir, run dir), apply LoRA, save.

Checkpoint layout (``<run>/checkpoints/<name>/``): a transformers model directory (full fine-tuning)
or a peft adapter directory whose ``adapter_config.json`` names its base model, plus the tokenizer.
An embedded tiny base that LoRA trains on is saved once as ``<run>/base_model`` so adapters reload.

An adapter's base is named by its absolute, link-free path (a run started from
``runs/<recipe>/latest`` keeps its base when the link moves, and loads from any directory), and
``base_model.json`` beside the adapter keeps a fingerprint of the base's weights: an adapter whose
base is gone or was overwritten fails to load with one line instead of silently loading on the wrong
weights. Adapters saved before the fingerprint existed load unchecked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from grpo_cli.config.schema import LoraConfig, ModelConfig
from grpo_cli.config.usage import made_by
from grpo_cli.errors import UserError
from grpo_cli.models.tiny import build_tiny_model, build_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASE_FILE = "base_model.json"
"""Written beside an adapter: ``{"base_model_name_or_path": ..., "fingerprint": ...}``."""
WHOLE_FILE, SAMPLES, CHUNK = 16 << 20, 64, 64 << 10
"""Weight files up to WHOLE_FILE bytes are hashed whole; larger ones by SAMPLES chunks of CHUNK bytes."""


def looks_local(name_or_path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything with a leading ``/ . ~`` or more parts is a path,
    and so is ``a/b`` where ``a`` is a local directory (``runs/x``: a typo is named, not looked up on the hub)."""
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        return True
    return "/" in name_or_path and Path(name_or_path.split("/", 1)[0]).is_dir()


def resolve_model_dir(name_or_path: str, key: str = "model.name_or_path") -> str:
    """A run directory resolves to its final (or latest) checkpoint; anything else is returned as is.
    ``key`` is the setting that named it, for the error."""
    p = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not p.exists():
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


def resolve_start(name_or_path: str) -> str:
    """The absolute, link-free checkpoint directory a local ``name_or_path`` names (a run dir's
    final checkpoint, ``latest`` followed): what a run records as its start, so that moving a link or
    changing directory later cannot change it. A hub name (or ``tiny``) is returned as is."""
    if name_or_path == "tiny":
        return name_or_path
    path = resolve_model_dir(name_or_path)
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def base_fingerprint(path: Optional[str]) -> Optional[str]:
    """A sha256 of a local model's weight files (names, sizes and content; big files by evenly spread
    samples, which any retraining changes): cheap enough for every save of a 7B base, and equal for a
    copy of the same weights. None for a hub name or a directory without safetensors files."""
    files = sorted(Path(path).glob("*.safetensors")) if path and Path(path).is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}\n".encode())
        with f.open("rb") as fh:
            if size <= WHOLE_FILE:
                digest.update(fh.read())
                continue
            for i in range(SAMPLES):  # the first sample holds the safetensors header (names, shapes)
                fh.seek(i * (size - CHUNK) // (SAMPLES - 1))
                digest.update(fh.read(CHUNK))
    return digest.hexdigest()


def write_base_record(adapter_dir: Path, base_ref: Optional[str], fingerprint: Optional[str]) -> None:
    """Record beside an adapter which base it was trained on and that base's fingerprint."""
    record = {"base_model_name_or_path": base_ref, "fingerprint": fingerprint}
    (adapter_dir / BASE_FILE).write_text(json.dumps(record, indent=1) + "\n")


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter loads on, checked: it still exists and its weights are the ones the
    adapter was trained on (when a fingerprint was recorded). Either failure is one line: an
    adapter on other weights gives wrong results without any other sign."""
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"the LoRA adapter in {adapter_dir} names no base model (base_model_name_or_path)")
    own = adapter_dir.resolve().parent.parent / "base_model"  # a run's own saved base moves with the run
    if looks_local(base) and not Path(base).expanduser().exists():
        if Path(base).name != "base_model" or not own.is_dir():
            where = "" if Path(base).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
            raise UserError(
                f"the LoRA adapter in {adapter_dir} was trained on the base model {base}, which no longer exists{where}"
            )
        base = str(own)
    record = adapter_dir / BASE_FILE
    saved = json.loads(record.read_text()).get("fingerprint") if record.is_file() else None
    if saved and base_fingerprint(base) != saved:
        raise UserError(
            f"the base model {base} changed since the LoRA adapter in {adapter_dir} was trained on it "
            "(its weights differ): restore that base or train the adapter again"
        )
    return base


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"model.dtype: expected one of {sorted(DTYPES)}, got '{name}'")
    return DTYPES[name]


def load_model_and_tokenizer(cfg: ModelConfig) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase, Optional[str]]:
    """The starting model (adapters of a LoRA checkpoint merged in), its tokenizer, and the path its
    weights can be reloaded from (None when they exist only in memory: the tiny model, a merged adapter).
    A local path is loaded and returned resolved (absolute, links followed; ``cfg.resolved_path``
    when set): adapters trained on it name that base, not a link that may move."""
    dtype = _dtype(cfg.dtype)
    if cfg.name_or_path == "tiny":
        tok = build_tokenizer()
        model = build_tiny_model(cfg.tiny, len(tok), tok.pad_token_id, tok.eos_token_id)
        return model.to(dtype), tok, None
    path = getattr(cfg, "resolved_path", None) or resolve_start(cfg.name_or_path)
    adapter = Path(path) / "adapter_config.json"
    base_path = adapter_base(Path(path)) if adapter.exists() else path
    try:
        tok = load_tokenizer(path, cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot load '{cfg.name_or_path}': {str(e).splitlines()[0]}") from None
    if adapter.exists():
        from peft import PeftModel  # deferred: peft loads only for LoRA runs

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
    # deferred: peft loads only for LoRA runs
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

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


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it), else ``model``."""
    return model.get_base_model() if is_peft(model) else model


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


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Copy a checkpoint's weights (full model, possibly sharded) or LoRA adapter into ``model``."""
    if callable(getattr(model, "load_checkpoint", None)):  # a model with its own layout (e.g. a scorer)
        model.load_checkpoint(ckpt)
        return
    if is_peft(model):
        adapter = ckpt / "adapter_model.safetensors"
        if not adapter.exists():
            raise UserError(
                f"resume: {ckpt} holds no LoRA adapter, but lora.enabled=true: resume with the run's lora settings"
            )
        from peft import set_peft_model_state_dict  # deferred: peft loads only for LoRA runs

        result = set_peft_model_state_dict(model, load_file(adapter))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise UserError(
                f"resume: the adapter in {ckpt} does not fit this model (e.g. {(missing or result.unexpected_keys)[0]})"
            )
        return
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise UserError(f"resume: {ckpt} holds no full model weights (a LoRA adapter?), but lora.enabled=false")
    weights: Dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in weights if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]  # tied copies are fine
    if untied or unexpected:
        example = (untied or unexpected)[0]
        raise UserError(
            f"resume: the weights in {ckpt} do not fit this model (e.g. {example}): "
            "resume with the run's model settings"
        )
