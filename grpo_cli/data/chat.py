"""Prompts as the model expects them: its chat template for a chat model, ``data.prompt_template``
for a base model (and the embedded tiny one, whose tokenizer has no template).

One function, :func:`render_prompt`, renders every prompt of every command (train, eval, sweep,
iterative RL): training and evaluation see the same text. With a template the user turn is
``data.prompt_template`` filled with the question (stripped), after ``data.system_prompt`` when set,
and the template's generation prompt (``<|im_start|>assistant\\n`` in ChatML) ends the prompt.
"""

from __future__ import annotations

from typing import Optional, Tuple

from grpo_cli.errors import UserError

MODES = ("auto", "true", "false")


def chat_enabled(mode: object, tokenizer) -> bool:
    """``data.chat_template``: ``auto`` is on when the tokenizer has a chat template. Booleans written
    in a config arrive as ``True``/``False`` strings; both spellings are accepted."""
    mode = str(mode).lower()
    has = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
    if mode == "true" and not has:
        raise UserError("data.chat_template=true: the tokenizer has no chat template (use false or a chat model)")
    return has if mode == "auto" else mode == "true"


def format_prompt(template: str, question: str) -> str:
    """``template`` with ``{question}`` replaced; other placeholders are a UserError."""
    try:
        return template.format(question=question)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(
            f"data.prompt_template: {template!r} cannot be filled ({type(error).__name__}: {error}); "
            "only {question} is replaced, write other braces doubled: {{ }}"
        ) from None


def render_prompt(cfg, tokenizer, question: str) -> str:
    """The prompt of ``question`` under the data config ``cfg`` for ``tokenizer`` (None: no template)."""
    text = format_prompt(cfg.prompt_template, question)
    if not chat_enabled(getattr(cfg, "chat_template", "auto"), tokenizer):
        return text
    system = getattr(cfg, "system_prompt", None)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text.strip()}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The special token a chat template closes an assistant turn with (``<|im_end|>`` in ChatML,
    ``<|eot_id|>`` in Llama 3), found by rendering one; None without a template or when it closes
    the turn with plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\u2063\u2063"  # invisible separators: no template writes them itself
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation: no end-of-turn token known
        return None
    after = text.split(marker, 1)[-1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else None


def stop_tokens(tokenizer) -> Tuple[int, ...]:
    """The tokens that end generation: EOS and, where it differs, the chat template's end of turn."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn = end_of_turn_id(tokenizer)
    if turn is not None and turn not in stops:
        stops.append(turn)
    return tuple(stops)
