"""``grpo export``: a run's policy as a standard Hugging Face model directory, for vLLM or the hub.

``export.output_dir`` receives what ``AutoModelForCausalLM.from_pretrained`` and ``vllm.LLM`` load with
no grpo_cli import: ``config.json``, safetensors weights in ``export.dtype`` (a LoRA adapter merged
into its base in fp32 first, a full fine-tune's weights as they are), the tokenizer with its chat
template, and ``generation_config.json`` whose ``eos_token_id`` lists the tokens grpo's own sampler
stops at (EOS and a chat template's end of turn, :func:`grpo_cli.data.chat.stop_tokens`), so a server
ends a completion where training and ``grpo eval`` did. ``export.adapter_only`` writes the peft
adapter instead. ``export.json`` records what was exported from where; it also marks the directory as
an export, which a later export may replace (any other non-empty directory is refused).

The directory is written beside its destination and renamed into place when complete; the upload to
``export.push_to_hub`` starts only then, so a failed upload leaves a complete local export.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from grpo_cli.config.schema import ModelConfig
from grpo_cli.data.chat import stop_tokens
from grpo_cli.errors import UserError
from grpo_cli.models.load import DTYPES as LOAD_DTYPES
from grpo_cli.models.load import adapter_base, load_model_and_tokenizer, load_tokenizer, looks_local, resolve_model_dir
from grpo_cli.models.scorer import HEAD_FILE
from grpo_cli.trainer.run import atomic_replace_dir

DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MARKER = "export.json"
"""Written into every export: its source and settings; a directory holding it may be replaced."""


def export_run(cfg: DictConfig) -> str:
    """Write ``cfg.export.run``'s policy to ``cfg.export.output_dir`` (and upload it); what was done, in words."""
    ex = cfg.export
    ckpt = checkpoint_dir(ex.run)
    out = output_dir(ex.output_dir)
    adapter = (ckpt / "adapter_config.json").is_file()
    if ex.adapter_only and not adapter:
        raise UserError(
            f"export.adapter_only=true: {ckpt} is a full fine-tune, it has no LoRA adapter "
            "(export it without adapter_only)"
        )
    tmp = out.with_name(f".tmp-export-{out.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if ex.adapter_only:
            base = write_adapter(ckpt, tmp, DTYPES[ex.dtype])
        else:
            base = write_model(ckpt, tmp, DTYPES[ex.dtype], cfg.model.trust_remote_code)
        record = {"source": str(ckpt), "base_model": base, "lora_merged": adapter and not ex.adapter_only}
        record.update(dtype=ex.dtype, adapter_only=ex.adapter_only, time=datetime.now().isoformat(timespec="seconds"))
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        atomic_replace_dir(tmp, out)
    finally:
        if tmp.exists():  # an error or Ctrl-C while writing: nothing half-written is left behind
            shutil.rmtree(tmp, ignore_errors=True)
    if ex.push_to_hub:
        push(out, ex.push_to_hub, ex.private)
        return f"{out} and uploaded it to https://huggingface.co/{ex.push_to_hub}"
    return str(out)


def checkpoint_dir(run: Optional[str]) -> Path:
    """The absolute, link-free checkpoint directory ``run`` names: a run's final (else newest)
    checkpoint, a checkpoint directory or a ``latest`` link; a one-line error for anything else."""
    if not run:
        raise UserError("export: pass run=<run dir or checkpoint dir> and output_dir=<dir>")
    if not looks_local(run) and not Path(run).exists():
        raise UserError(f"run: '{run}' is not a local run or checkpoint directory (export exports a grpo run)")
    ckpt = Path(resolve_model_dir(run, key="run")).expanduser()
    if not ckpt.is_dir():
        raise UserError(f"run: '{run}' is not a directory (expected a run or checkpoint directory)")
    if not (ckpt / "config.json").is_file() and not (ckpt / "adapter_config.json").is_file():
        raise UserError(f"run: '{run}' holds no checkpoint (config.json or adapter_config.json)")
    if (ckpt / HEAD_FILE).is_file():  # a causal LM export would drop its scoring head silently
        raise UserError(f"run: '{run}' is a reward model (its {HEAD_FILE} head has no place in a causal LM export)")
    return ckpt.resolve()


def output_dir(path: Optional[str]) -> Path:
    """``export.output_dir``, absolute, its parent created: refused when it is a file or a non-empty
    directory that is not an earlier export (it would be replaced whole)."""
    if not path:
        raise UserError("export.output_dir: pass output_dir=<dir> (where the model directory is written)")
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"export.output_dir: '{path}' is a file, expected a directory to write the model to")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(
            f"export.output_dir: '{path}' is a non-empty directory that is not an earlier export "
            f"(no {MARKER}): choose another directory or remove it"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"export.output_dir: cannot create the parent of '{path}': {e.strerror or e}") from None
    return out


def write_model(ckpt: Path, out: Path, dtype: torch.dtype, trust_remote_code: bool) -> Optional[str]:
    """A whole model directory at ``out``: LoRA merged in fp32 (rounding once, at the cast), then cast
    to ``dtype``. Returns the base an adapter was merged into (None for a full fine-tune)."""
    adapter = (ckpt / "adapter_config.json").is_file()
    base = adapter_base(ckpt) if adapter else None  # checked: it exists and has the trained-on weights
    load_dtype = "float32" if adapter else {v: k for k, v in LOAD_DTYPES.items()}[dtype]
    model, tok, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(ckpt), dtype=load_dtype, trust_remote_code=trust_remote_code)
    )
    model = model.to(dtype)
    stops = list(stop_tokens(tok))
    if stops:  # a tokenizer without EOS keeps the base's setting
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    portable_tokenizer(tok).save_pretrained(out)
    return base


def write_adapter(ckpt: Path, out: Path, dtype: torch.dtype) -> str:
    """The peft adapter at ``out``: ``adapter_config.json`` naming its base (the checked, absolute
    path the run trained on, or the hub name), the adapter weights in ``dtype``, the tokenizer."""
    base = adapter_base(ckpt)
    if looks_local(base):
        base = str(Path(base).expanduser().resolve())
    out.mkdir(parents=True)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = load_file(ckpt / "adapter_model.safetensors")
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    if (ckpt / "base_model.json").is_file():  # the base's fingerprint, for grpo_cli's own check
        shutil.copy2(ckpt / "base_model.json", out / "base_model.json")
    portable_tokenizer(load_tokenizer(str(ckpt))).save_pretrained(out)
    return base


def portable_tokenizer(tok):
    """``tok``, or for the embedded character tokenizer (a WordLevel vocabulary of single ASCII
    characters) its byte-level BPE twin: the same ids for every text, but what transformers'
    AutoTokenizer builds for a Qwen2 config (it rebuilds any tokenizer of a Qwen2 model as byte-level
    BPE, which would drop the character vocabulary's spaces and newlines)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # deferred: export only

    if getattr(tok, "backend_tokenizer", None) is None:  # a slow (Python) tokenizer saves as it is
        return tok
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab: Dict[str, int] = state["model"].get("vocab") or {}
    special = set(tok.all_special_tokens)
    plain = [t for t in vocab if t not in special]
    if state["model"]["type"] != "WordLevel" or not all(len(t) == 1 and ord(t) < 128 for t in plain):
        return tok
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    renamed = {(byte_level.pre_tokenize_str(t)[0][0] if t not in special else t): i for t, i in vocab.items()}
    core = Tokenizer(models.BPE(vocab=renamed, merges=[], unk_token=tok.unk_token))
    core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(sorted(special, key=vocab.get))
    from transformers import PreTrainedTokenizerFast  # deferred: export only

    twin = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=tok.pad_token,
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
        padding_side=tok.padding_side,
    )
    twin.chat_template = tok.chat_template
    return twin


def push(out: Path, repo: str, private: bool) -> None:
    """Upload the finished export to the hub repository ``repo`` (created if missing): any failure
    (offline, no token, no access) is one line naming the repository and the cause."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="model", commit_message="grpo export")
    except Exception as e:  # whatever the hub client raises: network, auth, offline mode, a bad name
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"export.push_to_hub: uploading to '{repo}' failed ({type(e).__name__}: {cause}); "
            f"the local export in {out} is complete"
        ) from None
