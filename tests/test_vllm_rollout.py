"""The vLLM rollout engine (rollout.engine=vllm): its contract with vLLM on CPU through a stand-in
``vllm`` module, and against our engine with the real vLLM where a GPU and vllm are installed."""

import copy
import importlib.util
import sys
import types

import pytest
import torch
from test_generation import PROMPTS, chaotic_tiny_model

from grpo_cli.config.schema import LoraConfig, RolloutConfig
from grpo_cli.errors import UserError
from grpo_cli.generation import check_rollout, generate_ids
from grpo_cli.models import vllm_rollout
from grpo_cli.models.load import apply_lora


class FakeVLLMModel:
    """vLLM's model as our engine sees it: ``load_weights`` of (name, tensor) pairs."""

    def __init__(self):
        self.weights, self.loads = {}, 0

    def load_weights(self, weights):
        self.loads += 1
        self.weights.update({name: w.clone() for name, w in weights})


class FakeLLM:
    """Records what it is built and called with; 'generates' ``prompt[-1] + 1 + i`` for i = 0, 1, ...,
    stopping (as vLLM reports a stop token: in ``finish_reason``) at a stop token, which current vLLM
    also puts in the row (``stop_in_row``), older ones not. With ``logprobs=0`` each position's
    ``{token: Logprob}`` holds the sampled token's, ``-(i + 1) / 10``."""

    built = []
    stop_in_row = False

    def __init__(self, model, **kwargs):
        from transformers import AutoConfig

        self.config, self.kwargs, self.model = AutoConfig.from_pretrained(model), kwargs, FakeVLLMModel()
        self.calls = []
        FakeLLM.built.append(self)

    def apply_model(self, func):
        return [func(self.model)]

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outs = []
        for prompt, p in zip(prompts, params):
            ids, reason = [], "length"
            for i in range(p.max_tokens):
                t = prompt["prompt_token_ids"][-1] + 1 + i
                if t in p.stop_token_ids and not p.ignore_eos:
                    reason = "stop"
                    ids += [t] if self.stop_in_row else []
                    break
                ids.append(t)
            logprobs = None
            if p.logprobs is not None:
                logprobs = [{t: types.SimpleNamespace(logprob=-(i + 1) / 10)} for i, t in enumerate(ids)]
            out = types.SimpleNamespace(token_ids=ids, finish_reason=reason, logprobs=logprobs)
            outs.append(types.SimpleNamespace(outputs=[out]))
        return outs


class FakeSamplingParams:
    def __init__(
        self, *, temperature, top_p, max_tokens, detokenize, seed, logprobs=None, stop_token_ids=(), ignore_eos=False
    ):
        self.__dict__.update(
            logprobs=logprobs,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            detokenize=detokenize,
            seed=seed,
            stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos,
        )


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": list(prompt_token_ids)}
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(vllm_rollout, "check_vllm", lambda device: None)  # the stand-in runs on a CPU
    FakeLLM.built, FakeLLM.stop_in_row = [], False
    return FakeLLM


def vllm_rows(model, tok, eos=True, generator=None, **kw):
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    return generate_ids(
        model,
        ids,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id if eos else None,
        max_new_tokens=kw.pop("n", 6),
        engine="vllm",
        generator=generator,
        temperature=kw.pop("temperature", 0.0),
        **kw,
    )


def test_plain_weights_go_to_vllm_under_their_own_names():
    model, _ = chaotic_tiny_model()
    sent = dict(vllm_rollout.checkpoint_weights(model))
    assert sent.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(sent[n], p) for n, p in model.named_parameters())


def test_lora_weights_go_to_vllm_merged_as_merge_and_unload_stores_them():
    model, _ = chaotic_tiny_model()
    model = apply_lora(model, LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (fresh ones are zero)
    merged = copy.deepcopy(model).merge_and_unload()  # peft's own merge: the oracle
    sent = dict(vllm_rollout.checkpoint_weights(model))
    assert sent.keys() == dict(merged.named_parameters()).keys()
    for name, p in merged.named_parameters():
        torch.testing.assert_close(sent[name], p, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(
        sent["model.layers.0.self_attn.q_proj.weight"],
        model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
    )


def test_dora_is_refused_with_the_layer_named():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model, _ = chaotic_tiny_model()
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(UserError, match="q_proj is not plain LoRA"):
        dict(vllm_rollout.checkpoint_weights(model))


def test_engine_is_built_once_from_the_config_and_fed_the_current_weights(fake_vllm):
    model, tok = chaotic_tiny_model()
    vllm_rows(model, tok, vllm_memory=0.2, vllm_kwargs={"enforce_eager": True, "seed": 7})
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # an optimiser step, as far as the engine can tell
    vllm_rows(model, tok)
    (llm,) = fake_vllm.built  # the second batch reuses the engine
    assert llm.config.architectures == ["Qwen2ForCausalLM"] and llm.config.hidden_size == 64
    assert llm.kwargs == dict(
        skip_tokenizer_init=True,
        load_format="dummy",
        dtype=torch.float32,
        seed=7,
        gpu_memory_utilization=0.2,
        max_model_len=model.config.max_position_embeddings,
        enforce_eager=True,
    )  # the user's kwargs win
    assert llm.model.loads == 2  # before each batch
    assert torch.equal(
        llm.model.weights["model.layers.0.mlp.down_proj.weight"], model.model.layers[0].mlp.down_proj.weight
    )


def test_a_new_dtype_gets_its_own_engine(fake_vllm):
    model, tok = chaotic_tiny_model()
    vllm_rows(model, tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vllm_rows(model, tok)
    assert [llm.kwargs["dtype"] for llm in fake_vllm.built] == [torch.float32, torch.bfloat16]


def test_token_ids_in_and_out_with_eos_kept_and_rows_padded(fake_vllm):
    model, tok = chaotic_tiny_model()
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids[0] = ids[0][:-1] + [eos - 3]  # the stand-in then emits eos-2, eos-1 and stops at eos
    rows = generate_ids(model, ids, pad_id=pad, eos_id=eos, max_new_tokens=6, engine="vllm", temperature=0.0)
    ((prompts, params),) = fake_vllm.built[0].calls
    assert [p["prompt_token_ids"] for p in prompts] == ids  # no re-tokenisation
    assert rows[0] == [eos - 2, eos - 1, eos, pad, pad, pad]  # EOS kept (it is trained), then padding
    assert all(len(r) == 6 for r in rows)
    assert all(p.stop_token_ids == [eos] and not p.ignore_eos and not p.detokenize for p in params)
    vllm_rows(model, tok, eos=False)  # fixed-length benchmarks: never stop
    assert all(p.ignore_eos for p in fake_vllm.built[0].calls[-1][1])


def test_sampling_seeds_come_from_the_run_generator(fake_vllm):
    model, tok = chaotic_tiny_model()

    def seeds(seed):
        vllm_rows(model, tok, generator=torch.Generator().manual_seed(seed), temperature=1.0, top_p=0.9)
        params = fake_vllm.built[0].calls[-1][1]
        assert all(p.temperature == 1.0 and p.top_p == 0.9 for p in params)
        return [p.seed for p in params]

    first = seeds(0)
    assert first == seeds(0) and first != seeds(1) and len(set(first)) == len(PROMPTS)
    vllm_rows(model, tok)  # no generator: vLLM's own seed
    assert all(p.seed is None for p in fake_vllm.built[0].calls[-1][1])


def test_sampled_log_probs_come_back_aligned_with_the_batch_targets(fake_vllm):
    from grpo_cli.data.types import Example
    from grpo_cli.generation import sample_batch

    fake_vllm.stop_in_row = True  # current vLLM: the stop token in the row, with its log-prob
    model, tok = chaotic_tiny_model()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    ids[0] = ids[0][:-1] + [eos - 3]  # the stand-in then emits eos-2, eos-1 and stops at eos
    rows, logp = generate_ids(
        model, ids, pad_id=pad, eos_id=eos, max_new_tokens=6, engine="vllm", temperature=0.0, with_logprobs=True
    )
    assert all(p.logprobs == 0 for p in fake_vllm.built[0].calls[-1][1])  # the sampled token's alone
    assert rows[0] == [eos - 2, eos - 1, eos, pad, pad, pad]
    assert logp[0] == pytest.approx([-0.1, -0.2, -0.3, 0.0, 0.0, 0.0])  # the stop token's too, 0 on padding
    assert logp[1] == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6])
    examples = [Example(question=p, prompt=p, solution=None, answer="0") for p in PROMPTS]
    batch, gens = sample_batch(
        model, tok, examples, group=torch.arange(len(examples)), engine="vllm", max_new_tokens=4, temperature=0.0
    )
    got, mask = batch.tensors["rollout_logp"], batch.target_mask
    for b, g in enumerate(gens):  # left-padded: the completion's n tokens are the last n, scored one position earlier
        n = len(g.completion_ids)
        assert got[b, -n:].tolist() == pytest.approx([-(i + 1) / 10 for i in range(n)])
    assert torch.all(got[mask == 0] == 0) and torch.all(got[mask == 1] < 0)


def test_log_probs_that_are_not_the_trainers_distribution_are_not_returned(fake_vllm, monkeypatch):
    model, tok = chaotic_tiny_model()
    fake_vllm.stop_in_row = True

    def logp(**kw):
        return vllm_rows(model, tok, with_logprobs=True, **kw)[1]

    # No logprobs_mode (the stand-in, an old vLLM): raw log-probs, before temperature
    assert logp(temperature=0.0) is not None and logp(temperature=1.0, top_p=0.9) is not None
    assert logp(temperature=0.7) is None
    assert "logprobs_mode" not in fake_vllm.built[0].kwargs
    monkeypatch.setattr(vllm_rollout, "has_logprobs_mode", lambda: True)
    vllm_rollout._ENGINES.clear()
    assert logp(temperature=0.7) is not None  # processed: after temperature...
    assert fake_vllm.built[-1].kwargs["logprobs_mode"] == "processed_logprobs"
    assert logp(temperature=0.7, top_p=0.9) is None  # ... and after top-p, renormalised: not the trainer's
    assert logp(temperature=0.0, top_p=0.9) is not None  # greedy: neither applies
    fake_vllm.stop_in_row = False  # an older vLLM reports the stop token beside the row, without its log-prob
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    ids[0] = ids[0][:-1] + [tok.eos_token_id - 1]  # the stand-in stops at once
    options = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=6, engine="vllm")
    rows, logps = generate_ids(model, ids, temperature=0.0, with_logprobs=True, **options)
    assert rows[0][0] == tok.eos_token_id and logps is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_missing_vllm_and_a_typo_are_one_line_errors():
    with pytest.raises(UserError, match="the vllm package is not installed"):
        check_rollout(RolloutConfig(engine="vllm"), torch.device("cpu"))
    with pytest.raises(UserError, match=r"rollout.engine: expected one of .*got 'vlm'"):
        check_rollout(RolloutConfig(engine="vlm"), torch.device("cpu"))
    check_rollout(RolloutConfig(engine="fast"), torch.device("cpu"))


def test_vllm_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # as if installed
    with pytest.raises(UserError, match="on a CUDA GPU, but the policy is on cpu"):
        check_rollout(RolloutConfig(engine="vllm"), torch.device("cpu"))


def test_a_mapping_override_names_the_append_syntax():
    from conftest import compose

    with pytest.raises(UserError, match=r"'rollout.vllm_kwargs' is a mapping: .*\+rollout.vllm_kwargs.enforce_eager="):
        compose("grpo_arithmetic", "rollout.vllm_kwargs={enforce_eager:true}")
    cfg = compose("grpo_arithmetic", "rollout.engine=vllm", "+rollout.vllm_kwargs.enforce_eager=true")
    assert cfg.rollout.vllm_kwargs == {"enforce_eager": True}


# --- the real vLLM, on a GPU ---

real_vllm = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("vllm")), reason="needs a CUDA GPU and the vllm package"
)
GPU_KWARGS = {"vllm_memory": 0.1, "vllm_kwargs": {"attention_backend": "TRITON_ATTN", "enforce_eager": True}}
"""Triton attention: it runs fp32, which vLLM's default FlashAttention does not.
Eager: seconds to build an engine instead of a compile and CUDA graph captures (the benchmark runs those)."""
VLLM_HEADS = dict(hidden_size=128, num_heads=4, intermediate_size=256)
"""Heads of 32: vLLM's Triton attention takes head sizes from 32 up."""


def agreement(a, b) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


@real_vllm
def test_real_vllm_greedy_matches_our_engine_and_follows_the_policy():
    model, tok = chaotic_tiny_model(**VLLM_HEADS)
    model = model.cuda()
    fast = generate_ids(
        model,
        tok(PROMPTS, add_special_tokens=False)["input_ids"],
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=24,
        engine="fast",
        temperature=0.0,
    )
    before = vllm_rows(model, tok, n=24, **GPU_KWARGS)
    assert agreement(before, fast) >= 0.9
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std())  # a different policy
    fast_after = generate_ids(
        model,
        tok(PROMPTS, add_special_tokens=False)["input_ids"],
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=24,
        engine="fast",
        temperature=0.0,
    )
    after = vllm_rows(model, tok, n=24, **GPU_KWARGS)
    assert after != before and agreement(after, fast_after) >= 0.9


@real_vllm
def test_real_vllm_samples_reproducibly_and_applies_lora():
    model, tok = chaotic_tiny_model(**VLLM_HEADS)
    model = apply_lora(model.cuda(), LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    draws = [
        vllm_rows(model, tok, n=16, temperature=1.0, generator=torch.Generator("cuda").manual_seed(s), **GPU_KWARGS)
        for s in (0, 0, 1)
    ]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    fast = generate_ids(
        model, ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=16, engine="fast", temperature=0.0
    )
    assert agreement(vllm_rows(model, tok, n=16, **GPU_KWARGS), fast) >= 0.9
