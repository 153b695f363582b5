"""Sampling rules (greedy, temperature, nucleus, EOS) and the rollout engine against HF generate."""

import platform

import pytest
import torch

from grpo_cli.config.schema import LoraConfig, TinyModelConfig
from grpo_cli.generation import _finish, generate, generate_ids, sample_next
from grpo_cli.models.kv_decoder import KVDecoder, causal_mask, packing_unsupported, unsupported_reason
from grpo_cli.models.load import apply_lora
from grpo_cli.models.tiny import build_tiny_model, build_tokenizer


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.5], [3.0, -1.0, 0.0]])
    assert sample_next(logits, 0.0, 1.0, None).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities [0.5, 0.3, 0.2]: top_p = 0.6 keeps {0, 1} (mass before token 1 is 0.5 < 0.6,
    # before token 2 it is 0.8 >= 0.6), so token 2 is never drawn; top_p = 0.4 keeps token 0 only.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.6, torch.rand(4000, generator=g))
    assert set(draws.tolist()) == {0, 1}
    frac1 = (draws == 1).float().mean().item()
    assert abs(frac1 - 0.3 / 0.8) < 0.03  # renormalised over the kept set: 0.375
    assert set(sample_next(logits, 1.0, 0.4, torch.rand(4000, generator=g)).tolist()) == {0}


def test_sampling_is_the_inverse_cdf_of_the_uniform_draw():
    # probabilities [0.5, 0.3, 0.2]: cdf [0.5, 0.8, 1.0]; u picks the first token with cdf > u.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(5, 3)
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.999])
    assert sample_next(logits, 1.0, 1.0, u).tolist() == [0, 0, 1, 1, 2]
    # top_p = 0.6 keeps [0.5, 0.3] (mass 0.8): u * 0.8 = [0, .392, .4, .632, .799] -> cdf [.5, .8]
    assert sample_next(logits, 1.0, 0.6, u).tolist() == [0, 0, 0, 1, 1]


def test_temperature_flattens_the_distribution():
    logits = torch.log(torch.tensor([[0.9, 0.1]])).expand(4000, 2)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4000, generator=g)
    cold = (sample_next(logits, 0.5, 1.0, u) == 1).float().mean().item()  # 0.1^2/(0.81+0.01) = 0.012
    hot = (sample_next(logits, 2.0, 1.0, u) == 1).float().mean().item()  # sqrt(.1)/(sqrt(.9)+sqrt(.1)) = 0.25
    assert cold < 0.03 and 0.2 < hot < 0.3


def test_finish_cuts_after_the_first_eos_and_keeps_it():
    tok = build_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = tok("7*2=14", add_special_tokens=False)["input_ids"]
    g = _finish(tok, [5], ids + [eos, pad, pad], (eos,))
    assert g.completion_ids == ids + [eos] and g.finished and g.text == "7*2=14"
    cut = _finish(tok, [5], ids, (eos,))  # no EOS within max_new_tokens: truncated
    assert cut.completion_ids == ids and not cut.finished


# --- the rollout engine (grpo_cli.models.kv_decoder) against HF generate and the reference loop ---

PROMPTS = ["3+4*2\n", "9-2-5+1-3\n", "7*7\n", "1\n", "8*3-2\n", "5+5+5+5+5+5\n"]  # lengths 2 to 12


def chaotic_tiny_model(**overrides):
    """A tiny Qwen2 with weights of std 1/sqrt(fan_in): unlike the default init (std 0.02, which
    greedily repeats one token forever) its greedy rows differ, and some emit EOS early."""
    tok = build_tokenizer()
    cfg = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    model = build_tiny_model(TinyModelConfig(**{**cfg, **overrides}), len(tok), tok.pad_token_id, tok.eos_token_id)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model.eval(), tok


EXACT = dict(packed_weights=False, compile_decode_step=False)
"""The fast engine on the model's modules and attention function: HF's arithmetic, rounding included."""

COMPILED = pytest.param(dict(compile_decode_min_mib=0), marks=pytest.mark.slow)
"""The fast engine with its decode attention compiled: slow, as every test that runs torch.compile
(Inductor and a C++ compiler: ~5-15 s a test with a warm cache, 20-90 s on a cold one, 2 cores)."""


def rows_of(model, tok, engine, n=24, **kw):
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    return generate_ids(
        model,
        ids,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=n,
        engine=engine,
        temperature=kw.pop("temperature", 0.0),
        **kw,
    )


def hf_rows(model, tok, n=24):
    """HF generate, greedy, on the same left-padded batch: [B] rows of new tokens (pad after EOS)."""
    batch = tok.pad({"input_ids": tok(PROMPTS, add_special_tokens=False)["input_ids"]}, return_tensors="pt")
    out = model.generate(
        **batch, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    return out[:, batch["input_ids"].shape[1] :].tolist()


def count_compactions(monkeypatch) -> list:
    """Records the batch size left by every KVDecoder.keep_rows call (finished rows dropped)."""
    from grpo_cli.models.kv_decoder import KVDecoder

    calls, keep = [], KVDecoder.keep_rows
    monkeypatch.setattr(
        KVDecoder, "keep_rows", lambda self, rows, filled: calls.append(len(rows)) or keep(self, rows, filled)
    )
    return calls


def test_fast_engine_greedy_equals_hf_generate_with_padding_and_early_stops(monkeypatch):
    model, tok = chaotic_tiny_model()
    compactions = count_compactions(monkeypatch)
    ours = rows_of(model, tok, "fast", **EXACT)
    assert compactions and compactions[-1] < len(PROMPTS)  # finished rows left the batch
    eos = tok.eos_token_id
    stops = {row.index(eos) if eos in row else None for row in ours}
    assert len(stops - {None}) >= 2 and None in stops  # rows end at different steps, one never does
    assert ours == hf_rows(model, tok)
    assert ours == rows_of(model, tok, "reference")


def test_fast_engine_samples_exactly_like_the_reference_loop(monkeypatch):
    # Same logits bit for bit and the same uniform per (row, step): the same draws, EOS and padding
    # included, although the fast engine drops finished rows and the reference loop keeps them.
    model, tok = chaotic_tiny_model()
    compactions = count_compactions(monkeypatch)
    fast = rows_of(model, tok, "fast", temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3), **EXACT)
    ref = rows_of(model, tok, "reference", temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert fast == ref and any(tok.eos_token_id in r for r in fast) and compactions


@pytest.mark.parametrize("options", [EXACT, COMPILED], ids=["modules", "compiled"])
def test_cache_columns_are_written_before_any_step_reads_them(monkeypatch, options):
    # The cache starts uninitialised (kv_decoder.cache_buffer): filled with NaN here, any column
    # read before it is written (a prompt's padding, rows moved by a compaction) would reach the
    # logits and change the greedy tokens.
    import grpo_cli.models.kv_decoder as kv_decoder

    fresh = kv_decoder.cache_buffer
    monkeypatch.setattr(kv_decoder, "cache_buffer", lambda *a: fresh(*a).fill_(float("nan")))
    if options is not EXACT:
        require_cpp_compiler()
    model, tok = chaotic_tiny_model()
    compactions = count_compactions(monkeypatch)
    assert rows_of(model, tok, "fast", **options) == hf_rows(model, tok) and compactions
    assert not kv_decoder.PROCESS_COMPILE_FAILURES  # the compiled case ran compiled, not on the SDPA fallback


def test_distinct_rows_finds_each_prompts_first_copy():
    from grpo_cli.generation import distinct_rows

    assert distinct_rows([[1], [2], [1]]) == ([0, 1], [0, 1, 0])
    assert distinct_rows([[3, 4]] * 3 + [[5]] * 2) == ([0, 3], [0, 0, 0, 1, 1])
    assert distinct_rows([[1], [2]]) == ([0, 1], [0, 1])


@pytest.mark.parametrize("options", [EXACT, COMPILED], ids=["modules", "compiled"])
def test_a_groups_prompt_is_prefilled_once_and_its_copies_decode_as_hf_does(monkeypatch, options):
    # GRPO's batch holds each prompt G times: the prefill runs on the distinct prompts and their
    # cache rows are copied; every copy then decodes (and samples) as if prefilled itself.
    import grpo_cli.models.kv_decoder as kv_decoder

    if options is not EXACT:
        require_cpp_compiler()
    model, tok = chaotic_tiny_model()
    group = [p for p in PROMPTS[:3] for _ in range(3)]
    ids = tok(group, add_special_tokens=False)["input_ids"]
    prefills = []
    call = KVDecoder.__call__
    monkeypatch.setattr(
        KVDecoder, "__call__", lambda self, x, *a: (x.shape[1] > 1 and prefills.append(len(x))) or call(self, x, *a)
    )
    ours = generate_ids(
        model,
        ids,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=24,
        temperature=0.0,
        engine="fast",
        **options,
    )
    assert prefills == [3]  # three distinct prompts for nine rows
    batch = tok.pad({"input_ids": ids}, return_tensors="pt")
    hf = model.generate(
        **batch, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )[:, batch["input_ids"].shape[1] :].tolist()
    assert ours == hf
    sample = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=24, temperature=1.0)
    fast = generate_ids(model, ids, generator=torch.Generator().manual_seed(3), engine="fast", **sample, **options)
    ref = generate_ids(model, ids, generator=torch.Generator().manual_seed(3), engine="reference", **sample)
    assert fast == ref and len({tuple(r) for r in fast}) > 3  # copies of a prompt draw their own tokens
    assert not kv_decoder.PROCESS_COMPILE_FAILURES  # the compiled case ran compiled, not on the SDPA fallback


def gqa_model(attn: str, family: str = "qwen2"):
    """A tiny Qwen2 (q/k/v biases) or Llama (none) with 4 query heads sharing 2 key/value heads,
    ``attn`` attention, diverse greedy rows."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    config, cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)  # diverse greedy rows
    return model, tok


def test_fast_engine_with_grouped_query_attention_and_eager_attention():
    for attn in ("sdpa", "eager"):
        model, tok = gqa_model(attn)
        assert model.config._attn_implementation == attn
        assert rows_of(model, tok, "fast", **EXACT) == hf_rows(model, tok)


def test_fast_engine_applies_lora_adapters():
    model, tok = chaotic_tiny_model()
    base = rows_of(model, tok, "reference")
    model = apply_lora(model, LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (fresh ones are zero)
    with model.disable_adapter():
        assert rows_of(model, tok, "fast", **EXACT) == base
    adapted = rows_of(model, tok, "fast", **EXACT)
    assert adapted == rows_of(model, tok, "reference") and adapted != base


# --- packed weights (CPU): fused q|k|v and gate|up GEMMs on oneDNN-packed copies, LoRA merged ---


@torch.no_grad()
def decoder_logits(model, tok, packed: bool, steps: int = 4, compiled: bool = False, failures=None):
    """[steps + 1, B, V] logits of KVDecoder: the prefill of PROMPTS, then ``steps`` decode steps
    fed fixed tokens (the same on both paths, whatever they would sample). ``failures``: the
    decoder's record of failed compiles (None: the process's)."""
    from grpo_cli.batch import position_ids
    from grpo_cli.generation import _left_pad

    ids, attn = _left_pad(tok(PROMPTS, add_special_tokens=False)["input_ids"], tok.pad_token_id, "cpu")
    (B, T0), pos = ids.shape, position_ids(attn)
    decoder = KVDecoder(model, B, T0 + steps, packed=packed, compiled=compiled, failures=failures)
    assert (decoder.packed is not None) == packed
    keys = torch.ones(B, T0 + steps, dtype=torch.bool)
    keys[:, :T0] = attn.bool()
    out = [decoder(ids, pos, 0, causal_mask(attn.bool()))]
    for i in range(steps):
        fed = ids[:, i : i + 1]  # any tokens will do
        out.append(decoder(fed, pos[:, -1:] + 1 + i, T0 + i, keys[:, None, None, : T0 + i + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["chaotic", "gqa-sdpa", "gqa-eager", "llama-sdpa"])
def test_packed_weights_give_the_modules_logits(kind):
    family, _, attn = kind.partition("-")
    model, tok = (
        chaotic_tiny_model() if kind == "chaotic" else gqa_model(attn, "llama" if family == "llama" else "qwen2")
    )
    assert packing_unsupported(model) is None
    packed, modules = decoder_logits(model, tok, True), decoder_logits(model, tok, False)
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        with torch.no_grad():
            assert KVDecoder(model, 2, 8, packed=True).packed[0].qkv[0].layout == torch._mkldnn
    # fp32 both ways; only the GEMMs' summation order differs (oneDNN's blocked kernel, fused N)
    torch.testing.assert_close(packed, modules, rtol=1e-4, atol=1e-4)
    assert rows_of(model, tok, "fast") == rows_of(model, tok, "fast", packed_weights=False)


def test_packed_weights_stay_plain_tensors_where_onednn_packing_is_not_used(monkeypatch):
    import grpo_cli.models.kv_decoder as kv_decoder

    model, tok = chaotic_tiny_model()
    monkeypatch.setattr(kv_decoder.platform, "machine", lambda: "arm64")
    with torch.no_grad():
        decoder = KVDecoder(model, 2, 8, packed=True)
    assert decoder.packed[0].qkv[0].layout == torch.strided  # fused and pre-cast, not re-blocked
    torch.testing.assert_close(
        decoder_logits(model, tok, True), decoder_logits(model, tok, False), rtol=1e-4, atol=1e-4
    )


def test_packed_weights_under_bf16_autocast_are_bf16_and_follow_the_modules():
    from grpo_cli.models.policy import autocast

    model, tok = chaotic_tiny_model()
    with autocast("bf16", torch.device("cpu")):
        packed, modules = decoder_logits(model, tok, True), decoder_logits(model, tok, False)
        decoder = KVDecoder(model, 2, 8, packed=True)
    assert all(w.dtype == torch.bfloat16 for w, _ in (decoder.packed[0].qkv, decoder.packed[0].down))
    assert decoder.packed_head[0].dtype == torch.bfloat16  # the head too, as HF generate under autocast
    assert packed.dtype == modules.dtype == torch.float32  # fp32 logits either way
    # bf16 GEMMs on fp32 residuals (unpacked: the head in fp32): apart only by bf16 rounding (~0.4% per product)
    scale = modules.abs().max()
    assert (packed - modules).abs().max() <= 0.03 * scale
    assert (packed.argmax(-1) == modules.argmax(-1)).float().mean() >= 0.9


def test_packed_weights_merge_the_active_lora_adapters():
    model, tok = chaotic_tiny_model()
    base = decoder_logits(model, tok, False)
    model = apply_lora(model, LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted = decoder_logits(model, tok, False)  # peft's forward: base(x) + scaling * B(A(x))
    torch.testing.assert_close(decoder_logits(model, tok, True), adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - base).abs().max() > 1.0  # the adapter matters
    with model.disable_adapter():
        torch.testing.assert_close(decoder_logits(model, tok, True), base, rtol=1e-4, atol=1e-4)


def test_layers_that_are_not_plain_linear_maps_are_not_packed():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model, tok = chaotic_tiny_model()
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "neither nn.Linear nor a plain LoRA layer" in packing_unsupported(model)
    with torch.no_grad():
        decoder = KVDecoder(model, 2, 8, packed=True)
    assert decoder.packed is None  # the modules run instead
    assert rows_of(model, tok, "fast") == rows_of(model, tok, "reference")


# --- compiled decode attention (CPU): rotary, cache write and single-query attention in one kernel ---


def require_cpp_compiler():
    """Skip, naming why, where Inductor finds no C++ compiler: there torch.compile fails and decoders fall
    back to SDPA (recorded in kv_decoder.PROCESS_COMPILE_FAILURES), which a test of the compiled path must
    not pass on."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # torch's InvalidCxxCompiler
        pytest.skip(
            f"torch.compile on CPU needs a C++ compiler: {(str(err).strip() or type(err).__name__).splitlines()[0]}"
        )


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # True: torch.compile
def test_decode_attention_is_sdpa_over_the_written_cache(compiled):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from grpo_cli.models.kv_decoder import compiled_decode_attention, decode_attention

    torch.manual_seed(0)
    B, H, Hkv, D, T_max, L = 3, 4, 2, 8, 9, 6  # 2 queries per key head; columns 0..5 filled, 5 is new
    q, k, v = torch.randn(B, 1, H * D), torch.randn(B, 1, Hkv * D), torch.randn(B, 1, Hkv * D)
    cos, sin = torch.randn(B, 1, D), torch.randn(B, 1, D)
    keys, values = torch.randn(B, Hkv, T_max, D), torch.randn(B, Hkv, T_max, D)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :2] = False  # a left-padded row
    expected_keys, expected_values = keys.clone(), values.clone()
    fn = compiled_decode_attention() if compiled else decode_attention
    with torch.no_grad():
        out = fn(apply_rotary_pos_emb, q, k, v, cos, sin, keys, values, mask, D**-0.5)
    qr, kr = apply_rotary_pos_emb(q.view(B, 1, H, D).transpose(1, 2), k.view(B, 1, Hkv, D).transpose(1, 2), cos, sin)
    expected_keys[:, :, L - 1] = kr[:, :, 0]
    expected_values[:, :, L - 1] = v.view(B, Hkv, D)
    ref = torch.nn.functional.scaled_dot_product_attention(
        qr, expected_keys[:, :, :L], expected_values[:, :, :L], attn_mask=mask[:, None, None], enable_gqa=True
    )
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)  # only column 5 changed
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B, 1, H * D), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chaotic", "gqa-sdpa", "gqa-eager"])
def test_compiled_attention_gives_the_sdpa_logits(kind):
    from grpo_cli.models.kv_decoder import CompileFailures

    family, _, attn = kind.partition("-")
    model, tok = chaotic_tiny_model() if kind == "chaotic" else gqa_model(attn)
    failures = CompileFailures()
    compiled = decoder_logits(model, tok, packed=False, compiled=True, failures=failures)
    assert not failures  # it compiled: the environment has what Inductor needs
    # fp32 both ways; the scores and weighted sums are summed in another order than SDPA's
    torch.testing.assert_close(compiled, decoder_logits(model, tok, packed=False), rtol=1e-5, atol=1e-5)
    if kind == "chaotic":
        compiled_rows = rows_of(model, tok, "fast", packed_weights=False, compile_decode_min_mib=0)
        assert compiled_rows == rows_of(model, tok, "fast", **EXACT)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chaotic", "gqa-sdpa", "llama-sdpa"])
def test_compiled_step_gives_the_packed_logits(kind, monkeypatch):
    # With packed weights the whole decode step compiles (decode_layers): norms, rotary, cache
    # writes, attention, residuals and the MLP's activation around oneDNN's GEMMs.
    import grpo_cli.models.kv_decoder as kv_decoder

    family, _, attn = kind.partition("-")
    model, tok = gqa_model(attn, "llama" if family == "llama" else "qwen2") if attn else chaotic_tiny_model()
    with torch.no_grad():
        whole = KVDecoder(model, 2, 8, packed=True, compiled=True).whole_step
        assert not KVDecoder(model, 2, 8, packed=True, compiled=True, whole_step=False).whole_step  # attention alone
    assert whole == (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available())
    calls = []
    layers = kv_decoder.compiled_decode_layers
    monkeypatch.setattr(kv_decoder, "compiled_decode_layers", lambda: calls.append(1) or layers())
    failures = kv_decoder.CompileFailures()
    compiled = decoder_logits(model, tok, packed=True, compiled=True, failures=failures)
    assert not failures and len(calls) == (4 if whole else 0)  # every decode step, not the prefill
    # fp32 both ways; reductions (norms, scores, weighted sums) are summed in another order
    torch.testing.assert_close(compiled, decoder_logits(model, tok, packed=True), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_step_under_bf16_autocast_is_the_eager_packed_step():
    import grpo_cli.models.kv_decoder as kv_decoder
    from grpo_cli.models.policy import autocast

    require_cpp_compiler()
    model, tok = chaotic_tiny_model()
    with autocast("bf16", torch.device("cpu")):
        compiled = decoder_logits(model, tok, packed=True, compiled=True)
        eager = decoder_logits(model, tok, packed=True)  # fp32 cache, SDPA
    # it compiled: a failed compile falls back to this very eager step (an fp32 cache), equal bit for bit
    assert not kv_decoder.PROCESS_COMPILE_FAILURES and not torch.equal(compiled, eager)
    # the same bf16 GEMMs on fp32 residuals; the compiled cache is bf16 (~0.4% per stored value)
    assert compiled.dtype == eager.dtype == torch.float32
    assert (compiled - eager).abs().max() <= 0.03 * eager.abs().max()
    assert (compiled.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
def test_compiled_attention_compiles_once_for_every_batch_shape():
    # Batch size, prompt lengths, cache length, filled columns and rows dropped mid-batch all vary;
    # the dynamic-shape graph must serve them all (a recompile costs seconds, and past torch's
    # limit dynamo would run the uncompiled sums, materialising [B, H, L, D] per layer).
    from torch._dynamo.utils import counters

    import grpo_cli.models.kv_decoder as kv_decoder

    require_cpp_compiler()
    model, tok = chaotic_tiny_model()
    prompts = [p * r for p in PROMPTS for r in (1, 2)]
    # Start from no compiled graph: what earlier tests compiled (in whatever order a runner picks)
    # must not decide which shapes are already served.
    torch._dynamo.reset()
    rows_of(model, tok, "fast", n=6, compile_decode_min_mib=0)  # compiles the dynamic-shape graph
    graphs = counters["stats"]["unique_graphs"]
    for n, (first, last), seed in [(20, (0, 8), 0), (9, (2, 7), 1), (31, (1, 3), 2), (13, (0, 12), 3)]:
        ids = tok(prompts[first:last], add_special_tokens=False)["input_ids"]
        generate_ids(
            model,
            ids,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            max_new_tokens=n,
            temperature=1.0,
            generator=torch.Generator().manual_seed(seed),
            compile_decode_min_mib=0,
        )
    # after a failed compile nothing compiles again: no new graph, for the wrong reason
    assert not kv_decoder.PROCESS_COMPILE_FAILURES and graphs >= 1
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_step_compiles_only_where_it_reads_at_least_the_threshold(monkeypatch):
    from grpo_cli.models.kv_decoder import cache_mib, step_read_mib

    model, tok = chaotic_tiny_model()  # 2 layers, 4 key/value heads of 16
    # k and v x 2 layers x 6 rows x 4 heads x (12 prompt + 24 new) columns x 16 x 4 bytes = 221184 B
    assert cache_mib(model, 6, 36) == 221184 / 2**20
    # plus 88,960 parameters x 4 bytes = 355840 B: 577024 B = 0.5503 MiB
    assert step_read_mib(model, 6, 36) == (221184 + 355840) / 2**20
    compiled = []
    init = KVDecoder.__init__
    monkeypatch.setattr(
        KVDecoder, "__init__", lambda self, *a, **k: init(self, *a, **k) or compiled.append(self.compiled)
    )
    for threshold in (0.56, 0.55):  # MiB: just above and below the batch's 0.5503
        rows_of(model, tok, "fast", compile_decode_min_mib=threshold)
    rows_of(model, tok, "fast")  # the default, 64 MiB
    assert compiled == [False, True, False]


def break_compiler(monkeypatch, factory: str):
    """A fresh record of failed compiles (the process's stays untouched), with kv_decoder's
    ``factory`` (a compiled-function getter) raising as Inductor does without a C++ compiler."""
    import grpo_cli.models.kv_decoder as kv_decoder

    def broken():
        def fn(*args):
            raise RuntimeError("InductorError: no working C++ compiler found\n(details)")

        return fn

    monkeypatch.setattr(kv_decoder, factory, broken)
    return kv_decoder.CompileFailures()


def test_a_failed_compile_warns_once_and_decodes_with_sdpa(monkeypatch):
    from grpo_cli.models.kv_decoder import CompileFailures
    from grpo_cli.models.policy import autocast

    failures = break_compiler(monkeypatch, "compiled_decode_attention")
    model, tok = chaotic_tiny_model()
    with pytest.warns(
        RuntimeWarning, match="torch.compile failed \\(InductorError: no working C\\+\\+ compiler found\\)"
    ):
        fallen = decoder_logits(model, tok, packed=False, compiled=True, failures=failures)
    assert torch.equal(fallen, decoder_logits(model, tok, packed=False))  # fp32: exactly the SDPA path
    assert len(failures) == 1
    with autocast("bf16", torch.device("cpu")), torch.no_grad():
        later = KVDecoder(model, 2, 8, compiled=True, failures=failures)
    assert not later.compiled and later.k.dtype == torch.float32  # later decoders do not try again
    with autocast("bf16", torch.device("cpu")), torch.no_grad():
        decoder = KVDecoder(model, 2, 8, compiled=True, failures=CompileFailures())  # none failed yet
        assert decoder.k.dtype == torch.bfloat16
        with pytest.warns(RuntimeWarning):
            decoder(
                torch.ones(2, 1, dtype=torch.long),
                torch.zeros(2, 1, dtype=torch.long),
                0,
                torch.ones(2, 1, 1, 1, dtype=torch.bool),
            )
    assert not decoder.compiled and decoder.k.dtype == decoder.v.dtype == torch.float32  # the cache was upcast


def test_a_failed_step_compile_warns_and_decodes_with_the_packed_modules(monkeypatch):
    failures = break_compiler(monkeypatch, "compiled_decode_layers")
    model, tok = chaotic_tiny_model()
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        fallen = decoder_logits(model, tok, packed=True, compiled=True, failures=failures)
    assert torch.equal(fallen, decoder_logits(model, tok, packed=True))  # the eager packed step, SDPA
    assert len(failures) == 1


def test_unknown_engine_options_are_refused_whatever_the_engine():
    model, tok = chaotic_tiny_model()
    for engine in ("fast", "reference"):
        with pytest.raises(TypeError, match=r"unknown rollout engine options \['compile_atention'\]"):
            rows_of(model, tok, engine, n=2, compile_atention=False)


def test_unsupported_models_fall_back_to_the_reference_loop():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert "gpt2" in unsupported_reason(model)
    gens = generate(model, tok, PROMPTS[:2], max_new_tokens=5, temperature=0)  # engine="auto"
    assert [len(g.completion_ids) for g in gens] == [5, 5]
    with pytest.raises(ValueError, match="fast rollout engine"):
        generate(model, tok, PROMPTS[:2], max_new_tokens=5, engine="fast")


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=pytest.mark.slow), False])  # True: torch.compile
def test_fast_engine_under_bf16_autocast_follows_hf(monkeypatch, compiled):
    # trainer.precision=bf16: projections, MLP and head in bf16 (fp32 logits); on CPU attention computes
    # in fp32, over a bf16 cache when compiled (half the bytes a step reads), else over an fp32 one.
    # Tokens may differ from HF's all-bf16 arithmetic only where two logits are within bf16 rounding.
    from grpo_cli.models.kv_decoder import PROCESS_COMPILE_FAILURES, KVDecoder
    from grpo_cli.models.policy import autocast

    model, tok = chaotic_tiny_model()
    dtypes = []
    init = KVDecoder.__init__
    monkeypatch.setattr(KVDecoder, "__init__", lambda self, *a, **k: init(self, *a, **k) or dtypes.append(self.k.dtype))
    with autocast("bf16", torch.device("cpu")):
        ours = rows_of(model, tok, "fast", compile_decode_step=compiled, compile_decode_min_mib=0)
        hf = hf_rows(model, tok)
    assert dtypes == [torch.bfloat16 if compiled else torch.float32] and not PROCESS_COMPILE_FAILURES
    pairs = [(a, b) for r, h in zip(ours, hf) for a, b in zip(r, h)]
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)


# --- the GPU decode step (CUDA graphs): fixed shapes, the column to write held on the device ---


def static_step_engine(monkeypatch, capture: bool):
    """Route the fast engine's decode through _decode_graphed (capture=False: the same step, eager)."""
    import functools

    import grpo_cli.generation as generation

    monkeypatch.setattr(generation, "_decode_eager", functools.partial(generation._decode_graphed, capture=capture))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fixed_shape_decode_step_gives_the_tokens_of_the_reference_loop(monkeypatch, attn):
    # What the CUDA graph replays, run eagerly on CPU: attention over the whole cache with unfilled
    # columns masked, finished rows kept, must give the same greedy rows and the same samples.
    model, tok = chaotic_tiny_model()
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    ref_greedy = rows_of(model, tok, "reference")
    ref_sampled = rows_of(
        model, tok, "reference", temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3)
    )
    static_step_engine(monkeypatch, capture=False)
    assert rows_of(model, tok, "fast") == ref_greedy == hf_rows(model, tok)
    sampled = rows_of(model, tok, "fast", temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert sampled == ref_sampled and any(tok.eos_token_id in r for r in sampled)


def test_fixed_shape_decode_stops_once_every_row_has_finished(monkeypatch):
    import grpo_cli.models.kv_decoder as kv_decoder

    fresh = kv_decoder.cache_buffer  # garbage in the unwritten columns, which this step reads (masked)
    monkeypatch.setattr(kv_decoder, "cache_buffer", lambda *a: fresh(*a).fill_(float("nan")))
    model, tok = chaotic_tiny_model()
    ids = tok(PROMPTS[4:], add_special_tokens=False)["input_ids"]  # two rows that end early
    static_step_engine(monkeypatch, capture=False)
    ours = generate_ids(
        model, ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=64, temperature=0.0, engine="fast"
    )
    stops = [row.index(tok.eos_token_id) for row in ours]  # at tokens 3 and 0 of 64
    assert max(stops) < 8 and len(ours[0]) <= max(stops) + 9  # all done is checked every 8 steps
    assert all(set(row[stop + 1 :]) <= {tok.pad_token_id} for row, stop in zip(ours, stops))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_graph_rollout_equals_the_eager_engines_on_gpu(monkeypatch):
    import grpo_cli.generation as generation

    model, tok = chaotic_tiny_model()
    model = model.cuda()
    captured = []
    graphed = generation._graphed
    monkeypatch.setattr(generation, "_graphed", lambda *a: captured.append(1) or graphed(*a))
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]

    def rows(engine, graphs, **kw):
        gen = torch.Generator(device="cuda").manual_seed(3) if kw.get("temperature") else None
        return generate_ids(
            model,
            ids,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            max_new_tokens=24,
            engine=engine,
            cuda_graphs=graphs,
            generator=gen,
            **kw,
        )

    greedy = rows("fast", True, temperature=0.0)
    assert captured  # the graph path ran
    assert greedy == rows("fast", False, temperature=0.0) == rows("reference", False, temperature=0.0)
    sampled = rows("fast", True, temperature=1.0, top_p=0.9)
    assert sampled == rows("reference", False, temperature=1.0, top_p=0.9)
    from grpo_cli.models.policy import autocast

    with autocast("bf16", torch.device("cuda")):
        bf16 = rows("fast", True, temperature=0.0)
        eager_bf16 = rows("fast", False, temperature=0.0)
    pairs = [(a, b) for r, h in zip(bf16, eager_bf16) for a, b in zip(r, h)]
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)


@needs_cuda
def test_cuda_graph_rollout_of_grouped_prompts_reads_no_unwritten_cache_on_gpu(monkeypatch):
    # GRPO's batch on a GPU: each prompt G times, so the prefill runs once per prompt and its cache
    # rows are copied (KVDecoder.copy_rows) before the captured step replays; the cache starts as
    # NaN, so a column read before it is written would change the greedy tokens.
    import grpo_cli.models.kv_decoder as kv_decoder

    fresh = kv_decoder.cache_buffer
    monkeypatch.setattr(kv_decoder, "cache_buffer", lambda *a: fresh(*a).fill_(float("nan")))
    model, tok = chaotic_tiny_model()
    model = model.cuda()
    ids = tok([p for p in PROMPTS for _ in range(3)], add_special_tokens=False)["input_ids"]
    greedy = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=24, temperature=0.0)
    graphed = generate_ids(model, ids, engine="fast", cuda_graphs=True, **greedy)
    assert graphed == generate_ids(model, ids, engine="fast", cuda_graphs=False, **greedy)
    batch = tok.pad({"input_ids": ids}, return_tensors="pt").to("cuda")
    hf = model.generate(
        **batch, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )[:, batch["input_ids"].shape[1] :].tolist()
    assert graphed == hf
    sample = dict(greedy, temperature=1.0)
    fast = generate_ids(
        model, ids, engine="fast", cuda_graphs=True, generator=torch.Generator(device="cuda").manual_seed(3), **sample
    )
    ref = generate_ids(
        model, ids, engine="reference", generator=torch.Generator(device="cuda").manual_seed(3), **sample
    )
    assert fast == ref and len({tuple(r) for r in fast}) > len(PROMPTS)


@needs_cuda
def test_cuda_graph_rollouts_leave_no_gpu_memory_behind():
    # Each rollout captures a new graph; what it allocated (its private pool, cuBLAS's workspace of
    # the stream it ran on) must not outlive it, or every GRPO step grows the allocated memory.
    model, tok = chaotic_tiny_model()
    model = model.cuda()
    ids = tok([p for p in PROMPTS for _ in range(4)], add_special_tokens=False)["input_ids"]
    after = []
    for _ in range(4):
        generate_ids(
            model,
            ids,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            max_new_tokens=24,
            temperature=1.0,
            engine="fast",
            cuda_graphs=True,
        )
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[1] == after[2] == after[3], after  # the first rollout's workspaces are kept for the next


def test_generate_restores_training_mode_when_the_engine_fails(monkeypatch):
    import grpo_cli.generation as generation

    model, tok = chaotic_tiny_model()
    model.train()

    def broken(*args, **kwargs):
        raise RuntimeError("engine failed")

    monkeypatch.setattr(generation, "generate_ids", broken)
    with pytest.raises(RuntimeError, match="engine failed"):
        generate(model, tok, ["1+2\n"], max_new_tokens=4)
    assert model.training


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_rows_stop_at_the_first_of_several_stop_tokens(engine):
    """EOS and a chat template's end of turn both end a row, kept as its last token."""
    model, _ = chaotic_tiny_model()
    prompts = [[5, 6, 7], [9, 3]]
    free = generate_ids(
        model, prompts, pad_id=0, eos_id=None, max_new_tokens=8, temperature=0.0, engine=engine, **EXACT
    )
    stops = (free[0][3], free[1][5])  # each row meets one of them (row 0 perhaps earlier)
    rows = generate_ids(
        model, prompts, pad_id=0, eos_id=stops, max_new_tokens=8, temperature=0.0, engine=engine, **EXACT
    )
    for row, full in zip(rows, free):
        end = next(i for i, t in enumerate(full) if t in stops)
        assert row[: end + 1] == full[: end + 1] and all(t == 0 for t in row[end + 1 :])
