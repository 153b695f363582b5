"""Scalar heads on a causal LM (grpo_cli/models/scorer.py) and PPO's value models (grpo_cli/models/value.py)
on a tiny Qwen2: shapes, which hidden state the head reads, where gradients go, save and reload."""

import pytest
import torch

from grpo_cli.batch import pack
from grpo_cli.config.schema import LoraConfig, TinyModelConfig
from grpo_cli.errors import UserError
from grpo_cli.models.load import apply_lora
from grpo_cli.models.policy import padded_hidden_states
from grpo_cli.models.scorer import Scorer, load_head, load_scorer, outcome_scores, zero_head
from grpo_cli.models.tiny import build_tiny_model, build_tokenizer
from grpo_cli.models.value import VALUE_ADAPTER, LoraValueModel, build_value_model, separate_value_model

TOK = build_tokenizer()
TEXTS = ["3+4\n#### 7", "12*3-5\n#### 31", "1\n#### 1"]  # lengths 8, 14, 6: rows 0 and 2 are left-padded


def tiny_lm():
    cfg = TinyModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    return build_tiny_model(cfg, len(TOK), TOK.pad_token_id, TOK.eos_token_id)


def encode(texts=TEXTS):
    ids = [TOK(t, add_special_tokens=False)["input_ids"] for t in texts]
    input_ids, attn, _ = pack([[]] * len(ids), ids, TOK.pad_token_id)
    return input_ids, attn


def random_head(scorer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scorer.head.weight.copy_(torch.randn(scorer.head.weight.shape, generator=g))
        scorer.head.bias.fill_(0.25)
    return scorer


def with_trained_adapter(model, adapter="default", seed=1):
    """lora_B of ``adapter`` drawn non-zero (fresh adapters are zero: they would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and f".{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


# ----------------------------------------------------------------------------- Scorer


def test_a_fresh_scorer_has_a_zero_head_and_scores_every_position_zero():
    lm = tiny_lm()
    scorer = Scorer(lm, "outcome")
    ids, attn = encode()
    scores = scorer(ids, attn)
    assert scores.shape == ids.shape == (3, 14) and scores.dtype == torch.float32
    assert not scores.any()
    assert scorer.head.in_features == lm.config.hidden_size == 16 and scorer.head.out_features == 1
    assert scorer.config is lm.config


def test_the_head_reads_the_last_hidden_state_of_each_real_token():
    lm = tiny_lm()
    scorer = random_head(Scorer(lm, "outcome"))
    ids, attn = encode()
    scores = scorer(ids, attn)
    with torch.no_grad():
        hidden = padded_hidden_states(lm, ids, attn)  # the reference forward, positions from the mask
    expected = hidden @ scorer.head.weight[0] + 0.25  # [B, T]: the head at position t, not t - 1 or t + 1
    real = attn.bool()
    torch.testing.assert_close(scores[real], expected[real], rtol=1e-3, atol=1e-4)
    # left padding moves nothing: each row alone, unpadded, gets the same scores on its tokens
    for b, text in enumerate(TEXTS):
        alone_ids, alone_attn = encode([text])
        torch.testing.assert_close(scores[b][real[b]], scorer(alone_ids, alone_attn)[0], rtol=1e-3, atol=1e-4)
    # causal: a changed last token changes the last column only
    changed = ids.clone()
    changed[:, -1] = TOK.convert_tokens_to_ids("9")
    after = scorer(changed, attn)
    torch.testing.assert_close(after[:, :-1], scores[:, :-1])
    assert (after[:, -1] != scores[:, -1]).all()


def test_outcome_scores_are_the_last_columns_which_is_every_rows_last_token():
    scores = torch.tensor([[9.0, 9.0, 1.0], [9.0, 2.0, 3.0]])
    assert outcome_scores(scores).tolist() == [1.0, 3.0]
    scorer = random_head(Scorer(tiny_lm(), "outcome"))
    ids, attn = encode()
    last = outcome_scores(scorer(ids, attn))
    for b, text in enumerate(TEXTS):  # the score of the row's last token, read alone
        alone = scorer(*encode([text]))[0, -1]
        torch.testing.assert_close(last[b], alone, rtol=1e-3, atol=1e-4)


def test_scorer_gradients_reach_the_head_and_the_trunk_and_with_lora_only_the_adapters():
    lm = tiny_lm()
    scorer = random_head(Scorer(lm, "outcome"))
    ids, attn = encode()
    outcome_scores(scorer(ids, attn)).sum().backward()
    assert scorer.head.weight.grad.abs().sum() > 0 and scorer.head.bias.grad.item() == 3.0  # d/db of 3 rows' s + b
    assert lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # full fine-tuning of the trunk
    # LoRA: the base is frozen; the adapters and the head learn
    peft_lm = with_trained_adapter(apply_lora(tiny_lm(), LoraConfig(enabled=True, r=2)))
    scorer = random_head(Scorer(peft_lm, "outcome"))
    outcome_scores(scorer(ids, attn)).sum().backward()
    grads = {n: p.grad for n, p in scorer.named_parameters()}
    assert all(grads[n] is None for n in grads if "lora_" not in n and not n.startswith("head."))
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "lora_A" in n)
    assert scorer.head.weight.grad.abs().sum() > 0


def test_zero_head_sits_beside_the_lm_in_its_dtype():
    lm = tiny_lm().to(torch.bfloat16)
    head = zero_head(lm)
    assert head.weight.dtype == torch.bfloat16 and head.weight.shape == (1, 16)
    assert not head.weight.any() and not head.bias.any()
    assert zero_head(apply_lora(tiny_lm(), LoraConfig(enabled=True, r=2))).in_features == 16  # the base's config


def test_scorer_save_and_load_round_trip(tmp_path):
    scorer = random_head(Scorer(tiny_lm(), "process"), seed=3)
    out = tmp_path / "rm"
    scorer.save_checkpoint(TOK, out, None)
    assert (out / "score_head.safetensors").is_file() and (out / "scorer.json").is_file()
    ids, attn = encode()
    expected = scorer(ids, attn)
    again, tok = load_scorer(str(out))
    assert again.kind == "process" and tok.get_vocab() == TOK.get_vocab()
    torch.testing.assert_close(again(ids, attn), expected)
    torch.testing.assert_close(load_head(str(out), "process")["weight"], scorer.head.weight.detach())
    # resume: a fresh scorer takes the LM's weights and the head from the checkpoint
    fresh = Scorer(
        build_tiny_model(
            TinyModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, seed=7),
            len(TOK),
            TOK.pad_token_id,
            TOK.eos_token_id,
        ),
        "process",
    )
    assert not torch.allclose(fresh(ids, attn), expected)
    fresh.load_checkpoint(out)
    torch.testing.assert_close(fresh(ids, attn), expected)
    with pytest.raises(UserError, match="is a process model, expected a outcome model"):
        load_scorer(str(out), kind="outcome")
    tiny_lm().save_pretrained(tmp_path / "lm")  # a plain LM: no head
    with pytest.raises(UserError, match="is not a reward model"):
        load_scorer(str(tmp_path / "lm"))


def test_lora_scorer_saves_its_adapter_and_reloads_merged(tmp_path):
    base = tiny_lm()
    base.save_pretrained(tmp_path / "base")
    TOK.save_pretrained(tmp_path / "base")
    scorer = random_head(Scorer(with_trained_adapter(apply_lora(base, LoraConfig(enabled=True, r=2))), "outcome"))
    scorer.save_checkpoint(TOK, tmp_path / "rm", str(tmp_path / "base"))
    assert (tmp_path / "rm" / "adapter_config.json").is_file() and not (tmp_path / "rm" / "model.safetensors").exists()
    ids, attn = encode()
    again, _ = load_scorer(str(tmp_path / "rm"))
    torch.testing.assert_close(again(ids, attn), scorer(ids, attn), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- value models


def test_separate_value_model_is_a_trainable_copy_of_the_start_model_with_a_zero_head():
    lm = tiny_lm().requires_grad_(False)  # a frozen policy trunk must not freeze the value model's
    value = separate_value_model(lm, lr_scale=2.5)
    assert isinstance(value, Scorer) and value.kind == "value" and value.lr_scale == 2.5
    assert value.lm is not lm and all(p.requires_grad for p in value.parameters())
    assert not {p.data_ptr() for p in value.lm.parameters()} & {p.data_ptr() for p in lm.parameters()}
    ids, attn = encode()
    assert not value(ids, attn).any()  # V = 0 everywhere before training
    random_head(value)
    value(ids, attn).sum().backward()
    assert value.lm.model.embed_tokens.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())  # the policy's weights get nothing
    # the copy has the start model's weights: the same hidden states
    with torch.no_grad():
        torch.testing.assert_close(padded_hidden_states(value.lm, ids, attn), padded_hidden_states(lm, ids, attn))


def test_separate_value_model_of_a_lora_policy_merges_the_adapter_away():
    policy = with_trained_adapter(apply_lora(tiny_lm(), LoraConfig(enabled=True, r=2)))
    value = separate_value_model(policy, lr_scale=1.0)
    assert not any("lora_" in n for n, _ in value.named_parameters())
    ids, attn = encode()
    with torch.no_grad():
        merged, adapted = padded_hidden_states(value.lm, ids, attn), padded_hidden_states(policy, ids, attn)
        with policy.disable_adapter():
            base = padded_hidden_states(policy, ids, attn)
    # merged: the policy's function, adapter included, in plain weights (W + BA summed in another order:
    # ~4e-5 apart), far from the base without the adapter
    torch.testing.assert_close(merged, adapted, rtol=1e-3, atol=1e-4)
    assert (merged - base).abs().max() > 0.1
    assert any("lora_" in n for n, _ in policy.named_parameters())  # the policy keeps its adapter


def test_lora_value_model_is_a_second_adapter_the_policy_forward_never_uses():
    policy = with_trained_adapter(apply_lora(tiny_lm(), LoraConfig(enabled=True, r=2)))
    ids, attn = encode()
    with torch.no_grad():
        before = padded_hidden_states(policy, ids, attn)
    value = LoraValueModel(policy, lr_scale=0.5)
    adapter_names = {n for n, _ in policy.named_parameters() if f".{VALUE_ADAPTER}." in n}
    assert adapter_names and {id(p) for p in value.adapter} == {
        id(p) for n, p in policy.named_parameters() if n in adapter_names
    }
    # its parameters are the value adapter and the head: the policy's own weights stay the policy's
    assert {id(p) for p in value.parameters()} == {id(p) for p in value.adapter} | {
        id(p) for p in value.head.parameters()
    }
    assert value.lr_scale == 0.5 and not value(ids, attn).any()  # zero head: V = 0
    with_trained_adapter(policy, VALUE_ADAPTER, seed=5)
    random_head(value)
    values = value(ids, attn)
    assert values.shape == ids.shape and values.dtype == torch.float32
    # the value forward runs the "value" adapter: on real tokens, not the head on the policy's hidden states
    real = attn.bool()
    policy_values = (before @ value.head.weight[0] + 0.25).detach()
    assert (values[real] - policy_values[real]).abs().min() > 1e-4
    # afterwards the policy is back on "default" and computes exactly what it did before
    assert policy.active_adapter == "default"
    with torch.no_grad():
        torch.testing.assert_close(padded_hidden_states(policy, ids, attn), before)
    # gradients: the value adapter and the head; not the policy's adapter, not the frozen base
    values.sum().backward()
    grads = dict(policy.named_parameters())
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in adapter_names if "lora_A" in n)
    assert all(p.grad is None for n, p in grads.items() if ".default." in n or "lora_" not in n)
    assert value.head.weight.grad.abs().sum() > 0
    # both adapters stay trainable (peft's set_adapter would have frozen the inactive one)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_lora_value_model_needs_a_lora_policy_and_unknown_kinds_are_refused():
    with pytest.raises(UserError, match="algorithm.value_model=lora: needs lora.enabled=true"):
        LoraValueModel(tiny_lm(), 1.0)
    with pytest.raises(UserError, match="algorithm.value_model: expected 'separate' or 'lora', got 'shared'"):
        build_value_model("shared", tiny_lm(), 1.0)
    assert isinstance(build_value_model("separate", tiny_lm(), 1.0), Scorer)
    assert isinstance(
        build_value_model("lora", apply_lora(tiny_lm(), LoraConfig(enabled=True, r=2)), 1.0), LoraValueModel
    )
