"""The real-shaped fixture (tests/real_model.py) and the paths a hub model takes through the CLI:
a byte-level BPE tokenizer with Qwen's special tokens, a ChatML template, grouped-query attention,
an untied head, and optionally the real Qwen2.5 vocabulary size."""

import json

import pytest
import torch
from real_model import REAL_VOCAB, build_real_shaped, train_tokenizer

from grpo_cli.cli import main
from grpo_cli.config.schema import ModelConfig
from grpo_cli.errors import UserError
from grpo_cli.models.load import load_model_and_tokenizer

ROWS = [  # GSM8K's format, written for these tests
    ("Tom has 3 boxes of 4 pens. How many pens does he have?", "3*4 = <<3*4=12>>12\n#### 12"),
    ("A shop sold 7 cakes and then 5 more. How many cakes were sold?", "7+5 = <<7+5=12>>12\n#### 12"),
    ("Ann had 20 apples and gave away 8. How many are left?", "20-8 = <<20-8=12>>12\n#### 12"),
    ("Each of 6 kids gets 2 cards. How many cards in all?", "6*2 = <<6*2=12>>12\n#### 12"),
]


def test_the_tokenizer_is_byte_level_bpe_with_qwens_special_tokens_and_chatml():
    tok = train_tokenizer()
    text = "Natalia sold 48/2 = 24 clips in May. ✓ café 中文"  # any byte sequence round-trips
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges learned, bytes covered
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    chat = tok.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True)
    assert chat == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_it_loads_as_a_hub_snapshot_would(real_model):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(real_model)))
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert not cfg.tie_word_embeddings and cfg.vocab_size == len(tok) and tok.chat_template


@pytest.mark.slow
def test_the_real_vocabulary_size(tmp_path):
    path = build_real_shaped(tmp_path / "full", vocab_size=REAL_VOCAB, hidden=32, layers=1)
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(path)))
    assert model.get_output_embeddings().weight.shape == (REAL_VOCAB, 32) and len(tok) < REAL_VOCAB


@pytest.mark.slow
def test_sft_grpo_and_eval_run_through_the_cli(real_model, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    common = [
        f"data.path={data}",
        "data=gsm8k",
        "logging.progress=false",
        "logging.plot=false",
        "rollout.max_new_tokens=8",
        "trainer.warmup_steps=0",
    ]
    main(
        [
            "train",
            "recipe=sft_arithmetic",
            f"model.name_or_path={real_model}",
            "trainer.steps=2",
            "trainer.batch_size=4",
            f"output_dir={tmp_path / 'sft'}",
            *common,
        ]
    )
    main(
        [
            "train",
            "recipe=grpo_arithmetic",
            f"model.name_or_path={tmp_path / 'sft'}",
            "trainer.steps=1",
            "source.prompts_per_step=2",
            "source.group_size=2",
            "lora.enabled=true",
            f"output_dir={tmp_path / 'grpo'}",
            *common,
        ]
    )
    main(["eval", f"run={tmp_path / 'grpo'}", "eval.limit=4"])
    result = json.loads((tmp_path / "grpo" / "eval" / "latest" / "eval.json").read_text())
    assert result["total"] == 4 and result["data"] == "gsm8k"
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "eval" / "latest" / "samples.jsonl").read_text().splitlines()]
    # the chat template is on (auto: the tokenizer has one): the user turn, then the assistant's
    assert rows[0]["prompt"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{ROWS[0][0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert torch.isfinite(
        torch.tensor([json.loads(x)["loss"] for x in (tmp_path / "grpo" / "metrics.jsonl").open()])
    ).all()


def _data(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    return ["data=gsm8k", f"data.path={path}"]


def test_one_rendering_for_chat_and_base_models(real_model, tmp_path):
    from conftest import compose

    from grpo_cli.data import load_examples

    _, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(real_model)))
    chat = compose(
        "sft_arithmetic", *_data(tmp_path), "data.system_prompt=Think.", "data.prompt_template='Q: {question}'"
    )
    assert load_examples(chat.data, "train", tok)[0].prompt == (
        f"<|im_start|>system\nThink.<|im_end|>\n<|im_start|>user\nQ: {ROWS[0][0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    base = compose("sft_arithmetic", *_data(tmp_path), "data.chat_template=false")
    assert load_examples(base.data, "train", tok)[0].prompt == ROWS[0][0] + "\n"  # prompt_template alone
    tiny = compose("sft_arithmetic", "data.chat_template=true")
    _, tiny_tok, _ = load_model_and_tokenizer(tiny.model)
    with pytest.raises(UserError, match="the tokenizer has no chat template"):
        load_examples(tiny.data, "train", tiny_tok)


def test_sft_targets_are_the_assistant_turn_closed_by_its_end_token(real_model, tmp_path):
    from conftest import compose

    from grpo_cli.data import load_examples
    from grpo_cli.models.policy import Policy
    from grpo_cli.trainer.source_registry import build_source

    cfg = compose("sft_arithmetic", *_data(tmp_path), f"model.name_or_path={real_model}")
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    source = build_source(
        cfg.source,
        examples=load_examples(cfg.data, "train", tok),
        policy=Policy(model, tok),
        batch_size=4,
        rollout=cfg.rollout,
        seed=0,
        chat=True,
    )
    batch = source.next_batch(None)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for ids, mask, solution in zip(batch.input_ids, batch.completion_mask, batch.completions):
        target = ids[mask.bool()].tolist()
        assert target[-1] == im_end and tok.decode(target[:-1]) == solution  # only the assistant's tokens


def test_generation_stops_at_eos_or_the_end_of_turn():
    from grpo_cli.data.chat import end_of_turn_id, stop_tokens

    tok = train_tokenizer()
    tok.eos_token = "<|endoftext|>"  # as a Qwen2.5 base model's tokenizer: EOS is not the end of turn
    assert end_of_turn_id(tok) == 2 and stop_tokens(tok) == (0, 2)
    tok.chat_template = None
    assert stop_tokens(tok) == (0,)
