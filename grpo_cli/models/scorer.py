"""Scalar models on a causal LM: a reward model, a process reward model, a value model.

A :class:`Scorer` is the LM's decoder (with LoRA adapters if any) and a linear head H -> 1 that
scores every position: ``scores [B, T]``. How the scores are read is the user's business: an outcome
reward model reads the last token of the completion, a process reward model the step-end tokens, a
value model every completion position. Any causal LM grpo_cli can load can become one.

Saved as the LM's checkpoint (a transformers directory, or a peft adapter pointing at its base) plus
``score_head.safetensors`` and ``scorer.json``; :func:`load_scorer` reloads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from grpo_cli.config.schema import ModelConfig
from grpo_cli.errors import UserError
from grpo_cli.models.load import (
    load_model_and_tokenizer,
    load_weights,
    resolve_model_dir,
    save_checkpoint_model,
    unwrap_peft,
)
from grpo_cli.models.policy import hidden_states

HEAD_FILE, META_FILE = "score_head.safetensors", "scorer.json"


def zero_head(lm: torch.nn.Module) -> torch.nn.Linear:
    """A linear head H -> 1 of zeros for ``lm``: it scores everything 0 at the start, a neutral reward
    or value before training."""
    base = unwrap_peft(lm)
    weight = next(lm.parameters())
    head = torch.nn.Linear(base.config.hidden_size, 1, dtype=weight.dtype, device=weight.device)  # beside the LM
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


class Scorer(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, kind: str, head: Optional[torch.nn.Linear] = None):
        super().__init__()
        self.lm, self.kind = lm, kind
        self.head = head if head is not None else zero_head(lm)

    @property
    def config(self):
        return unwrap_peft(self.lm).config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [B, T]: the head on the last hidden state of every position (left padding aware)."""
        return self.head(hidden_states(self.lm, input_ids, attention_mask)).squeeze(-1).float()

    def save_checkpoint(self, tokenizer, out: Path, base_ref: Optional[str]) -> None:
        save_checkpoint_model(self.lm, tokenizer, out, base_ref)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(out / HEAD_FILE))
        (out / META_FILE).write_text(json.dumps({"kind": self.kind}) + "\n")

    def load_checkpoint(self, ckpt: Path) -> None:
        """Resume: the LM's weights (or adapter) and the head from a checkpoint of this layout."""
        load_weights(self.lm, ckpt)
        self.head.load_state_dict(load_file(str(ckpt / HEAD_FILE)))


def scorer_dir(path: str, kind: Optional[str]) -> Tuple[Path, str]:
    """The checkpoint directory of the reward model at ``path`` (a run or checkpoint dir) and its kind."""
    root = Path(resolve_model_dir(path))
    if not (root / HEAD_FILE).is_file():
        raise UserError(
            f"reward.path: '{path}' is not a reward model (no {HEAD_FILE}); train one with recipe=rm_arithmetic"
        )
    saved = json.loads((root / META_FILE).read_text())["kind"]
    if kind is not None and saved != kind:
        raise UserError(f"reward.path: '{path}' is a {saved} model, expected a {kind} model")
    return root, saved


def load_head(path: str, kind: Optional[str] = None) -> Dict[str, torch.Tensor]:
    return load_file(str(scorer_dir(path, kind)[0] / HEAD_FILE))


def load_scorer(path: str, *, dtype: str = "float32", kind: Optional[str] = None):
    """(Scorer, tokenizer) from a directory written by :meth:`Scorer.save_checkpoint` (or a run dir)."""
    root, saved = scorer_dir(path, kind)
    lm, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(root), dtype=dtype))
    scorer = Scorer(lm, saved)
    scorer.head.load_state_dict(load_file(str(root / HEAD_FILE)))
    return scorer, tok


def outcome_scores(scores: torch.Tensor) -> torch.Tensor:
    """scores [B, T] -> [B]: the score at each row's last token (EOS when the output finished).
    Rows are left-padded, so every row's last token is in the last column."""
    return scores[:, -1]
