"""The padding-free forward (grpo_cli.models.unpadded) against ``decoder(...)``, and bf16 autocast."""

import copy
import os

import pytest
import torch
from conftest import compose
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from grpo_cli.config.schema import LoraConfig
from grpo_cli.errors import UserError
from grpo_cli.models.load import apply_lora, enable_activation_checkpointing
from grpo_cli.models.policy import autocast, hidden_states, padded_hidden_states
from grpo_cli.models.unpadded import unpadded_hidden_states, unpadded_unsupported


def model_and_batch(cls=Qwen2ForCausalLM, config=Qwen2Config, attn="sdpa"):
    """A GQA model (4 query heads, 2 key/value heads) and a batch with left and right padding."""
    torch.manual_seed(0)
    cfg = config(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        attn_implementation=attn,
    )
    model = cls(cfg)
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding (a short prompt)
    mask[1, 7:] = 0  # right padding (a short completion)
    mask[2, :2] = 0
    mask[2, 8:] = 0
    return model, ids, mask


@pytest.mark.parametrize("cls,config", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unpadded_forward_equals_the_padded_one_at_real_positions(cls, config, attn):
    model, ids, mask = model_and_batch(cls, config, attn)
    assert unpadded_unsupported(model) is None
    assert_follows_the_padded_forward(model, ids, mask, unpadded_hidden_states(model, ids, mask))


def assert_follows_the_padded_forward(model, ids, mask, ours):
    """``ours`` [B, T, H] equals ``decoder(...)`` at the real positions and is 0 at padding, and so do
    the gradients of every decoder weight from a loss on the real positions only."""
    real = mask.bool()
    padded = padded_hidden_states(model, ids, mask)
    assert torch.allclose(ours[real], padded[real], atol=1e-5)
    assert torch.equal(ours[~real], torch.zeros_like(ours[~real]))  # padding is never computed
    weights = torch.randn_like(padded) * real[..., None]
    params = list(model.model.parameters())
    g_padded = torch.autograd.grad((padded * weights).sum(), params)
    g_ours = torch.autograd.grad((ours * weights).sum(), params)
    for a, b in zip(g_padded, g_ours):
        assert torch.allclose(a, b, atol=1e-4)


def test_unpadded_forward_applies_lora_adapters_and_the_trainer_uses_it(monkeypatch):
    model, ids, mask = model_and_batch()
    model = apply_lora(model, LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (fresh ones are zero)
    real = mask.bool()
    adapted = unpadded_hidden_states(model, ids, mask)
    assert torch.allclose(adapted[real], padded_hidden_states(model, ids, mask)[real], atol=1e-5)
    with model.disable_adapter():
        base = unpadded_hidden_states(model, ids, mask)
    assert not torch.allclose(adapted[real], base[real], atol=1e-3)
    import grpo_cli.models.policy as policy

    calls = []
    monkeypatch.setattr(policy, "unpadded_hidden_states", lambda *a: calls.append(1) or adapted)
    hidden_states(model, ids, mask)
    assert calls  # supported models take the padding-free path


def test_other_models_take_the_padded_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()
    assert "gpt2" in unpadded_unsupported(model)
    ids, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    assert torch.equal(hidden_states(model, ids, mask), padded_hidden_states(model, ids, mask))


def test_bf16_autocast_forward_stays_close_to_fp32_and_log_probs_stay_fp32():
    from grpo_cli.batch import Batch
    from grpo_cli.models.policy import token_logprobs

    model, ids, mask = model_and_batch()
    real = mask.bool()
    fp32 = unpadded_hidden_states(model, ids, mask)
    with autocast("bf16", torch.device("cpu")):
        bf16 = unpadded_hidden_states(model, ids, mask)
    assert bf16.dtype == torch.float32  # the residual stream and norms stay fp32; matmuls ran in bf16
    err = (bf16[real] - fp32[real]).abs().max() / fp32[real].abs().max()
    assert 0 < err < 0.05  # bf16 rounding (8 mantissa bits), not a different function
    batch = Batch(ids, mask, mask, [""] * 3, [""] * 3, [""] * 3, torch.arange(3))
    with autocast("bf16", torch.device("cpu")):
        logp = token_logprobs(model, batch)[0]
    assert logp.dtype == torch.float32
    # The head ran in fp32 on the autocast hidden states: the same as running it outside autocast.
    from grpo_cli.kernels import selected_logprobs

    head = model.get_output_embeddings().weight
    h = bf16[:, :-1].reshape(-1, 64)
    targets = torch.where(mask[:, 1:].reshape(-1).bool(), ids[:, 1:].reshape(-1), -100)
    assert torch.allclose(logp.reshape(-1), selected_logprobs(h, head, targets), atol=1e-6)


def test_bf16_matmul_attention_is_causal_attention_with_grouped_heads():
    from grpo_cli.models.kv_decoder import additive
    from grpo_cli.models.unpadded import bf16_matmul_attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, requires_grad=True)  # [B, heads, L, D]
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)  # 2 key/value heads, each serving 2 query heads
    mask = additive(torch.ones(5, 5, dtype=torch.bool).tril(), torch.float32)  # 0 on and below the diagonal
    ours, _ = bf16_matmul_attention(None, q, k, v, mask, scaling=8**-0.5)  # fp32 inputs: fp32 matmuls
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), q)
    (g_sdpa,) = torch.autograd.grad(sdpa.sum(), q)
    torch.testing.assert_close(g_ours, g_sdpa, rtol=1e-4, atol=1e-5)


def test_cpu_bf16_autocast_forward_uses_the_matmul_attention_and_follows_the_padded_forward(monkeypatch):
    import grpo_cli.models.unpadded as unpadded

    calls = []
    attend = unpadded.bf16_matmul_attention
    monkeypatch.setattr(unpadded, "bf16_matmul_attention", lambda *a, **k: calls.append(a[1].dtype) or attend(*a, **k))
    model, ids, mask = model_and_batch()
    real = mask.bool()
    with autocast("bf16", torch.device("cpu")):
        ours, padded = unpadded_hidden_states(model, ids, mask), padded_hidden_states(model, ids, mask)
    assert calls == [torch.bfloat16] * 2  # both layers, bf16 q/k/v
    err = (ours[real].float() - padded[real].float()).abs().max() / padded[real].float().abs().max()
    assert err < 0.05  # bf16 rounding apart (HF's bf16 autocast forward against ours)


def test_bf16_warning_only_for_bf16_on_a_cpu_without_bf16_instructions(monkeypatch):
    import grpo_cli.models.policy as policy_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for has, warned in ((False, True), (True, False), (None, False)):  # None: /proc/cpuinfo does not say
        monkeypatch.setattr(policy_module, "cpu_has_bf16", lambda: has)
        assert (policy_module.bf16_warning("bf16", cpu) is not None) == warned
        assert policy_module.bf16_warning("fp32", cpu) is None and policy_module.bf16_warning("bf16", cuda) is None
    monkeypatch.undo()
    if os.path.exists("/proc/cpuinfo"):  # Linux: the flags are read, whichever this CPU has
        assert policy_module.cpu_has_bf16() in (True, False)


def test_unknown_precision_is_a_one_line_config_error():
    with pytest.raises(UserError, match="trainer.precision: expected one of"):
        autocast("fp8", torch.device("cpu"))


@pytest.mark.slow
def test_grpo_trains_under_bf16_autocast_with_fp32_weights(tmp_path, monkeypatch, capsys, length_rewards):
    import json

    import grpo_cli.models.policy as policy_module
    import grpo_cli.trainer.loop as loop

    monkeypatch.setattr(policy_module, "cpu_has_bf16", lambda: False)  # a CPU that emulates bf16: warned
    monkeypatch.setattr(loop, "WARNED", set())  # once per process: as if no earlier run had warned

    seen = {}
    build = loop.build_policy

    def spy(*args):
        policy = build(*args)
        seen["policy"], seen["before"] = policy, {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        return policy

    monkeypatch.setattr(loop, "build_policy", spy)
    # An untrained model answers nothing right: a reward that varies within groups gives gradients.
    cfg = compose(
        "grpo_arithmetic",
        "model.name_or_path=tiny",
        f"output_dir={tmp_path / 'bf16'}",
        "trainer.precision=bf16",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "trainer.lr=1e-2",
        "reward.name=length_mod_3",
    )
    run = loop.train(cfg)
    warned = "trainer.precision=fp32 is faster here" in " ".join(capsys.readouterr().err.split())
    assert warned == (seen["policy"].device.type == "cpu")  # a GPU computes bf16 natively: no warning
    after = dict(seen["policy"].model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())  # master weights stay fp32
    assert any(not torch.equal(seen["before"][n], p.detach()) for n, p in after.items())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # pi_ref and pi_theta: the same autocast forward
    ref = seen["policy"].frozen_reference
    assert ref.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16  # stored as autocast casts it
    assert ref.model.norm.weight.dtype == ref.lm_head.weight.dtype == torch.float32
    loop.train(
        compose(
            "grpo_arithmetic",
            "model.name_or_path=tiny",
            f"output_dir={tmp_path / 'again'}",
            "trainer.precision=bf16",
            "trainer.steps=1",
            "source.prompts_per_step=2",
            "source.group_size=2",
        )
    )
    assert "is faster here" not in capsys.readouterr().err  # a second run in the process (iterative GRPO's)


def test_a_bf16_reference_gives_the_autocast_log_probs_of_its_fp32_weights_bit_for_bit():
    from grpo_cli.batch import Batch
    from grpo_cli.models.policy import store_projections, token_logprobs

    model, ids, mask = model_and_batch()
    model.eval()
    completion = mask.clone()
    completion[:, :3] = 0
    batch = Batch(ids, mask, completion, [""] * 3, [""] * 3, [""] * 3, torch.arange(3))
    compact = copy.deepcopy(model)
    store_projections(compact, torch.bfloat16)
    assert compact.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        expected, _ = token_logprobs(model, batch)
        ours, _ = token_logprobs(compact, batch)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("cls,config", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
def test_fused_rms_norm_is_bit_identical_to_the_model_norm(cls, config):
    from grpo_cli.models.kv_decoder import norm

    model, _, _ = model_and_batch(cls, config)
    module = model.model.layers[0].input_layernorm
    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(7, 5, 64) * 3
    for bf16 in (False, True):
        with autocast("bf16" if bf16 else "fp32", torch.device("cpu")):
            assert torch.equal(norm(module, x), module(x))
    assert torch.equal(norm(module, x.bfloat16()), module(x.bfloat16()))  # other dtypes: the module itself


def saved_bytes(fn):
    """(fn(), bytes of the tensors autograd keeps for backward while fn runs)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("bf16", [False, True])
def test_activation_checkpointing_gives_the_same_gradients_from_a_fraction_of_the_saved_tensors(bf16):
    model, ids, mask = model_and_batch()
    model.train()
    weights = torch.randn(*ids.shape, 64) * mask[..., None]
    params = list(model.model.parameters())

    def grads():
        with autocast("bf16" if bf16 else "fp32", torch.device("cpu")):
            out, kept = saved_bytes(lambda: unpadded_hidden_states(model, ids, mask))
        return out, torch.autograd.grad((out.float() * weights).sum(), params), kept

    plain, g_plain, kept_plain = grads()
    enable_activation_checkpointing(model)  # what trainer.activation_checkpointing sets
    ckpt, g_ckpt, kept_ckpt = grads()
    assert torch.equal(ckpt, plain)  # the same forward
    for a, b in zip(g_plain, g_ckpt):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)  # the recomputed blocks give the same gradients
    # Kept: each block's input [N, H] instead of its activations (the recomputation's own saved
    # tensors live only during backward). 2 layers here; the share falls with depth.
    assert kept_ckpt < 0.35 * kept_plain, (kept_ckpt, kept_plain)


@pytest.mark.slow
def test_activation_checkpointing_option_reaches_every_block_and_the_run_trains(tmp_path, monkeypatch, length_rewards):
    import grpo_cli.trainer.loop as loop

    calls, seen, build = [], {}, loop.build_policy

    def spy(*args):
        policy = seen["policy"] = build(*args)
        seen["before"] = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        for layer in policy.model.model.layers:
            assert layer.gradient_checkpointing
            ckpt = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _f=ckpt, **k: calls.append(1) or _f(*a, **k)
        return policy

    monkeypatch.setattr(loop, "build_policy", spy)
    cfg = compose(
        "grpo_arithmetic",
        "model.name_or_path=tiny",
        f"output_dir={tmp_path / 'ckpt'}",
        "trainer.steps=1",
        "trainer.activation_checkpointing=true",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "trainer.lr=1e-2",
        "reward.name=length_mod_3",
    )
    loop.train(cfg)
    layers = len(seen["policy"].model.model.layers)
    assert len(calls) == layers  # one training forward, every block checkpointed; no-grad forwards never
    assert any(not torch.equal(seen["before"][n], p.detach()) for n, p in seen["policy"].model.named_parameters())


# --- rows sharing a prefix (a GRPO group's prompt) run it once ---


def test_prefix_owner_is_the_first_row_with_the_same_tokens_so_far():
    from grpo_cli.models.unpadded import prefix_owner

    # "abcd", "abxy", "abcz": rows 0 and 1 agree on "ab", rows 0 and 2 on "abc".
    t = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 9], [1, 2, 3, 8]])
    assert prefix_owner(t, torch.tensor([4, 4, 4])).tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]
    # Lengths 4, 3, 5, 5 (-1: padding). Row 1 is row 0's first 3 tokens; row 2 starts elsewhere; row 3
    # is row 0 and one more token; a row owns its padding (never read).
    t = torch.tensor([[1, 2, 3, 4, -1], [1, 2, 3, -1, -1], [5, 2, 3, 4, 7], [1, 2, 3, 4, 6]])
    assert prefix_owner(t, torch.tensor([4, 3, 5, 5])).tolist() == [
        [0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1],
        [2, 2, 2, 2, 2],
        [0, 0, 0, 0, 3],
    ]


def test_prefix_owner_in_chunks_of_rows_is_the_brute_force_search(monkeypatch):
    import grpo_cli.models.unpadded as unpadded

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 3, (40, 6), generator=g)  # 3 symbols: many rows share a prefix
    lengths = torch.randint(1, 7, (40,), generator=g)

    def first_sharing(b, p):  # the first row whose tokens 0..p are row b's (both long enough)
        return next(c for c in range(40) if p < lengths[c] and torch.equal(t[c, : p + 1], t[b, : p + 1]))

    brute = [[first_sharing(b, p) if p < lengths[b] else b for p in range(6)] for b in range(40)]
    assert unpadded.prefix_owner(t, lengths).tolist() == brute
    monkeypatch.setattr(unpadded, "COMPARED_AT_ONCE", 3 * 40 * 6)  # 3 rows against all 40 at a time
    assert unpadded.prefix_owner(t, lengths).tolist() == brute
    shared = sum(o != b for b, row in enumerate(brute) for o in row)
    assert 40 < shared < 200  # of 240 positions: neither no sharing nor all of it


def group_batch():
    """Two prompts (3 and 5 tokens, left-padded) x 3 completions (right-padded); some completions
    also begin alike. Rows: 5 6 7|20 21 22 23, 5 6 7|20 21 30, 5 6 7|40 41 42 43 44, 8..12|20 21,
    8..12|25 26 27 28, 8..12|25 26 27 29: 46 real tokens, of which 25 are computed (7 + 1 + 5 +
    7 + 4 + 1: each row less the prefix an earlier row shares)."""
    prompts = [[5, 6, 7]] * 3 + [[8, 9, 10, 11, 12]] * 3
    completions = [[20, 21, 22, 23], [20, 21, 30], [40, 41, 42, 43, 44], [20, 21], [25, 26, 27, 28], [25, 26, 27, 29]]
    P, C = 5, 5
    ids = torch.zeros(6, P + C, dtype=torch.long)
    mask = torch.zeros(6, P + C, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, P - len(p) : P + len(c)] = torch.tensor(p + c)
        mask[b, P - len(p) : P + len(c)] = 1
    return ids, mask


def embedded_tokens(model, fn):
    """(fn(), number of tokens the decoder embedded while fn ran)."""
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        handle.remove()


@pytest.mark.parametrize("cls,config", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_shared_prefixes_run_once_and_give_the_padded_forward_and_gradients(cls, config, attn, ckpt):
    model, _, _ = model_and_batch(cls, config, attn)
    if ckpt:
        model.train()
        enable_activation_checkpointing(model)
    ids, mask = group_batch()
    ours, computed = embedded_tokens(model, lambda: unpadded_hidden_states(model, ids, mask))
    assert computed == 25 and int(mask.sum()) == 46
    # Each row's loss reaches the shared tokens: backward sums the rows' gradients into them.
    assert_follows_the_padded_forward(model, ids, mask, ours)


def test_shared_prefixes_under_bf16_autocast_follow_the_unshared_forward():
    model, _, _ = model_and_batch()
    ids, mask = group_batch()
    real = mask.bool()
    with autocast("bf16", torch.device("cpu")):
        shared, computed = embedded_tokens(model, lambda: unpadded_hidden_states(model, ids, mask))
        every, all_tokens = embedded_tokens(
            model, lambda: unpadded_hidden_states(model, ids, mask, share_prefixes=False)
        )
    assert (computed, all_tokens) == (25, 46)
    assert torch.allclose(shared[real].float(), every[real].float(), atol=2e-2)


def test_model_share_prefixes_reaches_the_policys_log_probs(tmp_path):
    from types import SimpleNamespace

    from grpo_cli.batch import Batch
    from grpo_cli.config.compose import compose_run
    from grpo_cli.trainer import loop

    ids, mask = group_batch()
    batch = Batch(ids, mask, mask, [""] * 6, [""] * 6, [""] * 6, torch.arange(6))
    tokens = {}
    for share in (True, False):
        cfg = compose_run("grpo_arithmetic", [f"model.share_prefixes={share}"])
        loaded = (model_and_batch()[0], None, "base")
        policy = loop.build_policy(cfg, SimpleNamespace(needs_reference=True), tmp_path, torch.device("cpu"), loaded)
        tokens[share] = (
            embedded_tokens(policy.model, lambda: policy.logprobs(batch))[1],
            embedded_tokens(policy.frozen_reference, lambda: policy.reference_logprobs(batch))[1],
        )
    assert tokens == {True: (25, 25), False: (46, 46)}


def test_dropout_in_training_computes_every_row_for_itself():
    # Dropout draws noise per token: a shared token would give its rows one draw instead of one each.
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=50,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            attention_dropout=0.1,
        )
    )
    ids, mask = group_batch()
    assert embedded_tokens(model.train(), lambda: unpadded_hidden_states(model, ids, mask))[1] == 46
    assert embedded_tokens(model.eval(), lambda: unpadded_hidden_states(model, ids, mask))[1] == 25
    lora = apply_lora(model_and_batch()[0], LoraConfig(enabled=True, r=4, dropout=0.1)).train()
    assert embedded_tokens(lora.get_base_model(), lambda: unpadded_hidden_states(lora, ids, mask))[1] == 46


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ckpt", [False, True])
def test_shared_prefixes_on_gpu_give_the_padded_forward_and_gradients(ckpt):
    # In float64: in fp32 the padded forward and ours run different CUDA attention kernels, and one
    # weight's gradient differed by more than the 1e-4 tolerance on an H100 (ckpt=False).
    model, _, _ = model_and_batch()
    model = model.cuda().double()
    if ckpt:
        model.train()
        enable_activation_checkpointing(model)
    ids, mask = (t.cuda() for t in group_batch())
    ours, computed = embedded_tokens(model, lambda: unpadded_hidden_states(model, ids, mask))
    assert computed == 25
    assert_follows_the_padded_forward(model, ids, mask, ours)
    model.float()
    real = mask.bool()
    with autocast("bf16", ids.device):
        shared = unpadded_hidden_states(model, ids, mask)
        every = unpadded_hidden_states(model, ids, mask, share_prefixes=False)
    assert torch.allclose(shared[real].float(), every[real].float(), atol=2e-2)
