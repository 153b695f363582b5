"""The embedded default model: a randomly initialised Qwen2 with a character-level tokenizer.

It is a real transformers architecture saved and loaded with ``save_pretrained`` /
``from_pretrained``, so every code path that serves it serves a hub model too. Nothing is downloaded:
the tokenizer is built here with ``tokenizers`` and the weights are drawn from a seed.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from grpo_cli.config.schema import TinyModelConfig

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Printable ASCII and newline: enough for the arithmetic task and for GSM8K's text.
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; unknown characters map to <unk>."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK] + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split every character (newline included) into its own pre-token; Fuse joins them back
    # without the spaces WordLevel's default decoder would insert.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_tiny_model(cfg: TinyModelConfig, vocab_size: int, pad_id: int, eos_id: int) -> Qwen2ForCausalLM:
    """A Qwen2 causal LM drawn from ``cfg.seed`` (the same weights on every machine)."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
    )
    devnull = torch.random.fork_rng(devices=[])  # leave the caller's RNG stream untouched
    with devnull:
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    return model
