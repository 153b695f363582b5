"""The rollout engines' log-prob of each sampled token (batch.tensors["rollout_logp"]): the trainer's
``policy.logprobs`` of the same token at the same temperature, on every engine, with the tokens unchanged."""

import functools

import pytest
import torch
from test_generation import EXACT, PROMPTS, chaotic_tiny_model, require_cpp_compiler, rows_of

import grpo_cli.generation as generation
import grpo_cli.models.kv_decoder as kv_decoder
from grpo_cli.data.types import Example
from grpo_cli.generation import Generation, rollout_logp, sample_batch, sampled_logprob
from grpo_cli.models.policy import Policy

SETTINGS = [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)]
"""(temperature, top_p): sampled at 1, sampled at 0.7 under top-p (which must not change the log-prob's
distribution, only the draws), greedy (T' = 1)."""
SETTING_IDS = ["t1", "t0.7-top_p", "greedy"]


def drift_batch(model, tok, engine, temperature, top_p, seed=3, **options):
    """(batch, generations) of PROMPTS twice each (a group's shared prompts) with 16 new tokens."""
    examples = [Example(question=p, prompt=p, solution=None, answer="0") for p in PROMPTS for _ in range(2)]
    return sample_batch(
        model,
        tok,
        examples,
        group=torch.arange(len(examples)) // 2,
        generator=torch.Generator().manual_seed(seed),
        max_new_tokens=16,
        temperature=temperature,
        top_p=top_p,
        engine=engine,
        **options,
    )


def trainer_logp(model, tok, batch) -> torch.Tensor:
    """[B, T-1]: what the loss computes, at the temperature the source records (1 when greedy)."""
    temperature = batch.totals.get("temperature", 1.0)
    return Policy(model, tok).logprobs(batch, temperature=temperature)[0]


def check_against_trainer(model, tok, batch, temperature, atol):
    batch.totals["temperature"] = temperature if temperature > 0 else 1.0  # as sources.py records it
    got, mask = batch.tensors["rollout_logp"], batch.target_mask
    assert got.dtype == torch.float32 and got.shape == mask.shape
    assert torch.all(got[mask == 0] == 0)
    assert torch.all(got[mask == 1] < 0)  # every sampled token has a log-prob of its own
    want = trainer_logp(model, tok, batch)
    assert (got - want).mul(mask).abs().max().item() < atol


@pytest.mark.parametrize("temperature,top_p", SETTINGS, ids=SETTING_IDS)
def test_reference_engine_logp_is_the_trainers_logprob(temperature, top_p):
    model, tok = chaotic_tiny_model()
    batch, gens = drift_batch(model, tok, "reference", temperature, top_p)
    assert any(g.finished for g in gens) and not all(g.finished for g in gens)  # stop tokens scored too
    check_against_trainer(model, tok, batch, temperature, atol=1e-5)


FAST = [
    pytest.param(EXACT, id="modules"),
    pytest.param(dict(packed_weights=True, compile_decode_step=False), id="packed"),
    pytest.param(dict(compile_decode_min_mib=0), id="compiled", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("options", FAST)
@pytest.mark.parametrize("temperature,top_p", SETTINGS, ids=SETTING_IDS)
def test_fast_engine_logp_is_the_trainers_logprob_and_the_tokens_the_reference_loops(options, temperature, top_p):
    if "compile_decode_min_mib" in options:
        require_cpp_compiler()
    model, tok = chaotic_tiny_model()
    batch, gens = drift_batch(model, tok, "fast", temperature, top_p, **options)
    ref, ref_gens = drift_batch(model, tok, "reference", temperature, top_p)
    if options is EXACT:  # the model's own arithmetic: the reference loop's tokens, bit for bit
        assert [g.completion_ids for g in gens] == [g.completion_ids for g in ref_gens]
        assert torch.equal(batch.input_ids, ref.input_ids)
    check_against_trainer(model, tok, batch, temperature, atol=1e-4)
    assert not kv_decoder.PROCESS_COMPILE_FAILURES  # a compiled case ran compiled, not on the SDPA fallback


@pytest.mark.parametrize("temperature,top_p", SETTINGS, ids=SETTING_IDS)
def test_fixed_shape_decode_step_logp_is_the_trainers_logprob(monkeypatch, temperature, top_p):
    # The CUDA graph's step run eagerly on CPU: the log-prob buffer it writes, finished rows kept.
    model, tok = chaotic_tiny_model()
    ref, ref_gens = drift_batch(model, tok, "reference", temperature, top_p)
    monkeypatch.setattr(generation, "_decode_eager", functools.partial(generation._decode_graphed, capture=False))
    batch, gens = drift_batch(model, tok, "fast", temperature, top_p)
    assert [g.completion_ids for g in gens] == [g.completion_ids for g in ref_gens]
    check_against_trainer(model, tok, batch, temperature, atol=1e-4)
    assert torch.allclose(batch.tensors["rollout_logp"], ref.tensors["rollout_logp"], atol=1e-5)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_asking_for_logprobs_changes_no_token(engine):
    model, tok = chaotic_tiny_model()
    kw = dict(temperature=1.0, top_p=0.9)
    plain = rows_of(model, tok, engine, generator=torch.Generator().manual_seed(5), **kw)
    rows, logp = rows_of(model, tok, engine, generator=torch.Generator().manual_seed(5), with_logprobs=True, **kw)
    assert rows == plain and [len(r) for r in logp] == [len(r) for r in rows]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for row, lp in zip(rows, logp):  # 0.0 on the padding after the stop token, not on the stop token
        end = row.index(eos) if eos in row else len(row) - 1
        assert all(v < 0 for v in lp[: end + 1]) and all(v == 0.0 for v in lp[end + 1 :])
        assert set(row[end + 1 :]) <= {pad}


def test_sampled_logprob_is_log_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    tokens = torch.tensor([1, 2])
    for temperature, scale in [(0.5, 0.5), (1.0, 1.0), (0.0, 1.0)]:
        want = torch.log_softmax(logits / scale, -1)[torch.arange(2), tokens]
        assert torch.allclose(sampled_logprob(logits, tokens, temperature), want, atol=1e-7)


def test_rollout_logp_lines_up_with_the_target_mask():
    from grpo_cli.batch import pack

    gens = [Generation([1, 2], [7, 8, 9], "", True, [-0.1, -0.2, -0.3]), Generation([4], [5], "", False, [-0.5])]
    ids, _, comp = pack([g.prompt_ids for g in gens], [g.completion_ids for g in gens], pad_id=0)
    got = rollout_logp(gens, ids.shape[1])  # T = 5: [1, 2, 7, 8, 9] and [0, 0, 0, 4, 5]
    assert torch.allclose(got, torch.tensor([[0.0, -0.1, -0.2, -0.3], [0.0, 0.0, 0.0, -0.5]]))
    assert torch.equal(got != 0, comp[:, 1:].bool())


def test_a_generation_without_logprobs_leaves_rollout_logp_out(monkeypatch):
    # vLLM at settings whose log-probs are not the contract's gives None: no tensor, not wrong numbers.
    model, tok = chaotic_tiny_model()
    real = generation.generate_ids
    monkeypatch.setattr(generation, "generate_ids", lambda *a, **kw: (real(*a, **kw)[0], None))
    batch, gens = drift_batch(model, tok, "reference", 1.0, 1.0)
    assert all(g.logprobs is None for g in gens) and "rollout_logp" not in batch.tensors


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("temperature,top_p", SETTINGS, ids=SETTING_IDS)
def test_cuda_graph_logp_is_the_trainers_logprob_on_gpu(monkeypatch, temperature, top_p):
    captured = []
    graphed = generation._graphed
    monkeypatch.setattr(generation, "_graphed", lambda *a: captured.append(1) or graphed(*a))
    model, tok = chaotic_tiny_model()
    model = model.cuda()
    examples = [Example(question=p, prompt=p, solution=None, answer="0") for p in PROMPTS for _ in range(2)]
    options = dict(max_new_tokens=16, temperature=temperature, top_p=top_p, group=torch.arange(len(examples)) // 2)

    def run(engine, graphs):
        gen = torch.Generator(device="cuda").manual_seed(3)
        return sample_batch(model, tok, examples, generator=gen, engine=engine, cuda_graphs=graphs, **options)

    batch, gens = run("fast", True)
    assert captured  # the graph path ran
    ref, ref_gens = run("reference", False)
    assert [g.completion_ids for g in gens] == [g.completion_ids for g in ref_gens]
    check_against_trainer(model, tok, batch.to(torch.device("cuda")), temperature, atol=1e-4)
