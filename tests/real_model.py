"""A real-shaped local model for tests: what a user brings from the hub, built here, nothing downloaded.

A Qwen2 causal LM (random weights) with a byte-level BPE tokenizer trained by ``tokenizers`` on text
the project owns (the README, the docs and the embedded task's problems), the special tokens of the
Qwen2.5 instruct models (``<|endoftext|>`` pads and ends text, ``<|im_start|>`` / ``<|im_end|>``
delimit chat turns) and their ChatML chat template, saved with ``save_pretrained`` as a hub snapshot
would be. ``vocab_size=REAL_VOCAB`` gives the embedding and LM head the real Qwen2.5 size (151,936
rows; the tokenizer uses the first few thousand, as Qwen pads its embedding past its tokenizer).

    path = build_real_shaped(tmp_path / "qwen")          # then model.name_or_path=<path>
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

REPO = Path(__file__).resolve().parents[1]
REAL_VOCAB = 151_936
"""Rows of Qwen2.5's embedding and LM head (0.5B to 7B)."""
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen2.5-Instruct's template without tool calls: ChatML, a default system turn."""


def corpus() -> Iterator[str]:
    """Text the project owns: its Markdown, and problems and solutions of the embedded task."""
    for path in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        yield path.read_text()
    from grpo_cli.config.schema import ArithmeticConfig
    from grpo_cli.data.arithmetic import generate

    for example in generate(ArithmeticConfig(num_train=2000), "train"):
        yield example.question + "\n" + (example.solution or "")


def train_tokenizer(vocab: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's pre-tokenizer, as Qwen's) with Qwen's special tokens, left padding."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",  # as Qwen2.5-Instruct's tokenizer_config: generation ends a turn
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="left",
        chat_template=CHATML,
    )


def build_real_shaped(
    out: Path,
    *,
    vocab_size: Optional[int] = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tokenizer: Optional[PreTrainedTokenizerFast] = None,
) -> Path:
    """Save a Qwen2 (grouped-query attention, untied head like Qwen2.5-1.5B+) and its tokenizer to
    ``out``; ``vocab_size`` defaults to the tokenizer's length. Returns ``out``."""
    tok = tokenizer or train_tokenizer()
    config = Qwen2Config(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
