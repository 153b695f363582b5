"""``reward=outcome_rm`` on a transformers sequence-classification model (how public reward models are
shipped: ``AutoModelForSequenceClassification``, one label, its own tokenizer and chat template).

The model reads what it was trained on. When its tokenizer is the policy's (same vocabulary) it
scores the batch's token ids as they are; otherwise each row is re-tokenised as text with its own
tokenizer: through its chat template when it has one (the question as written in the data,
``batch.questions``, as the user's turn, before the policy's prompt template or chat rendering; the
completion as the assistant's), else as the policy's prompt + completion (``batch.prompts``).

Either way the rows are right-padded and the model's own forward reads each row's last non-pad token
(``config.pad_token_id``, set from its tokenizer when missing), as it did when it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

from grpo_cli.batch import Batch
from grpo_cli.errors import UserError
from grpo_cli.models.load import load_tokenizer, looks_local
from grpo_cli.rewards.base import Reward


def is_classifier(path: Optional[str]) -> bool:
    """``reward.path`` names a sequence-classification model: a directory whose config.json says so,
    or a hub name (our own reward models are only ever local directories)."""
    if not path:
        return False
    local = Path(path).expanduser()
    if not local.exists():
        return not looks_local(path)
    config = local / "config.json"
    if not config.is_file():
        return False
    return any(
        a.endswith("ForSequenceClassification") for a in json.loads(config.read_text()).get("architectures") or []
    )


def load_classifier(path: str):
    """(model, tokenizer) at ``path``: frozen, in eval mode, its ``pad_token_id`` set; one-line errors."""
    from transformers import AutoConfig, AutoModelForSequenceClassification  # deferred: only this reward

    try:
        # its config first: an unreachable hub fails once (~25 s of retries per file), and a model with
        # several labels before its weights are fetched
        config = AutoConfig.from_pretrained(path)
        if config.num_labels != 1:
            raise UserError(
                f"reward.path: '{path}' has {config.num_labels} labels; an outcome reward model has one (a score)"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype="auto", use_safetensors=True
        )
        tok = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"reward.path: cannot load '{path}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise UserError(f"reward.path: the tokenizer of '{path}' has no pad, end or unknown token to pad with")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.eval().requires_grad_(False), tok


def same_vocab(a, b) -> bool:
    """Two tokenizers map every token to the same id (the reward model can read the policy's ids)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


class ClassifierReward(Reward):
    """The score (logit) of a sequence-classification reward model for each prompt + completion."""

    def __init__(self, model, tokenizer, *, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.modules = (model,)
        self.policy_tokenizer, self.direct = None, False

    def bind(self, tokenizer) -> None:
        """Decide once per policy tokenizer whether its token ids can be read as they are."""
        if tokenizer is not None and tokenizer is not self.policy_tokenizer:
            self.policy_tokenizer, self.direct = tokenizer, same_vocab(tokenizer, self.tokenizer)

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.score_rows(self.policy_rows(batch) if self.direct else self.text_rows(batch))

    def policy_rows(self, batch: Batch) -> List[List[int]]:
        """Each row's real tokens (prompt, completion, EOS where drawn), its left padding dropped."""
        return [row[mask].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask.bool())]

    def text_rows(self, batch: Batch) -> List[List[int]]:
        """Each row re-tokenised by the reward model's tokenizer, in its chat template when it has one."""
        tok = self.tokenizer
        if not tok.chat_template:
            return tok([p + c for p, c in zip(batch.prompts, batch.completions)])["input_ids"]
        questions = batch.questions or batch.prompts
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": c}], tokenize=False
            )
            for q, c in zip(questions, batch.completions)
        ]
        return tok(texts, add_special_tokens=False)["input_ids"]  # the template writes any BOS itself

    @torch.no_grad()
    def score_rows(self, rows: List[List[int]]) -> torch.Tensor:
        """[B] logits of the right-padded rows (the model finds each row's last non-pad token)."""
        device = next(self.model.parameters()).device
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.model.config.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), T), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attn[b, : len(row)] = 1
        logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        return logits[:, 0].float().cpu()
