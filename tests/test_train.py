"""Tiny-model integration tests of the shared trainer: SFT, GRPO (LoRA on and off), eval, loading."""

import json
import shutil

import pytest
import torch
from conftest import compose, metrics
from transformers import AutoModelForCausalLM

from grpo_cli.cli import main
from grpo_cli.config.schema import ModelConfig
from grpo_cli.generation import generate
from grpo_cli.models.load import load_model_and_tokenizer, load_tokenizer
from grpo_cli.trainer.loop import train

GRPO_METRICS = [
    "reward_mean",
    "reward_std",
    "accuracy",
    "zero_std_groups",
    "kl",
    "clip_fraction",
    "entropy",
    "completion_length",
    "gc_mean",
    "gc_std",
    "time_generate",
    "time_reward",
    "time_logprob",
    "time_train",
]


def test_sft_run_learns_and_writes_its_run_directory(sft_run):
    rows = metrics(sft_run)
    assert len(rows) == 30
    for key in ("step", "loss", "lr", "tokens", "seconds", "target_prob"):
        assert key in rows[0]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert (sft_run / "config.yaml").exists()
    assert (sft_run / "checkpoints" / "final" / "model.safetensors").exists()


def test_sft_changes_parameters_and_checkpoint_reloads_identically(sft_run):
    cfg = compose("sft_arithmetic").model
    initial, _, _ = load_model_and_tokenizer(cfg)
    trained = AutoModelForCausalLM.from_pretrained(sft_run / "checkpoints" / "final")
    changed = [not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values())]
    assert all(changed)
    # the same greedy outputs from the run directory as from the checkpoint directory
    a, tok_a, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(sft_run)))
    tok_b = load_tokenizer(str(sft_run / "checkpoints" / "final"))
    prompts = ["3+4*2\n", "9-2-5+1\n"]
    out_a = [g.text for g in generate(a, tok_a, prompts, max_new_tokens=20, temperature=0)]
    out_b = [g.text for g in generate(trained, tok_b, prompts, max_new_tokens=20, temperature=0)]
    assert out_a == out_b


def test_our_greedy_generation_equals_hf_generate(sft_run):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(sft_run)))
    prompts = ["3+4*2\n", "9-2-5+1-3\n", "7*7\n"]  # different lengths: left padding is exercised
    ours = generate(model, tok, prompts, max_new_tokens=16, temperature=0)
    for prompt, g in zip(prompts, ours):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        ref = model.generate(
            ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
        assert g.completion_ids == ref[0, ids.shape[1] :].tolist()


def test_eval_on_a_run_writes_accuracy_and_samples(sft_run, tmp_path, capsys):
    run = shutil.copytree(
        sft_run, tmp_path / "sft", symlinks=True
    )  # eval writes into the run: not into the shared fixture
    main(["eval", f"run={run}", "eval.limit=8", "trainer.threads=1"])
    assert not (sft_run / "eval").exists()
    result = json.loads((run / "eval" / "latest" / "eval.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["total"] == 8
    rows = [json.loads(x) for x in (run / "eval" / "latest" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"prompt", "completion", "answer", "correct"} <= set(rows[0])
    assert result["correct"] == sum(r["correct"] for r in rows)


def test_eval_scores_a_samples_file(tmp_path, capsys):
    f = tmp_path / "s.jsonl"
    rows = [
        {"completion": "2+2=4\n#### 4", "answer": "4"},
        {"completion": "The answer is 5.", "answer": "4"},
        {"completion": "no idea", "answer": "1"},
        {"completion": "A: 1,000", "answer": "1000"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    main(["eval", f"samples={f}", f"eval.output_dir={tmp_path / 'out'}"])
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["accuracy"] == 0.5 and result["total"] == 4


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"completion": "x"}', "s.jsonl:2: missing field 'answer' (eval.answer_field)"),
        ("{not json", "s.jsonl:2: malformed JSON"),
    ],
)
def test_eval_bad_samples_file_names_the_line(tmp_path, capsys, line, expected):
    f = tmp_path / "s.jsonl"
    f.write_text('{"completion": "1", "answer": "1"}\n' + line + "\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", f"samples={f}"])
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_a_locally_saved_model_loads_by_path(tmp_path):
    cfg = compose("sft_arithmetic").model
    model, tok, _ = load_model_and_tokenizer(cfg)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2, base_ref = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert base_ref == str(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert tok2("12+3\n", add_special_tokens=False)["input_ids"] == tok("12+3\n", add_special_tokens=False)["input_ids"]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_grpo_steps_train_policy_keep_reference_and_log_metrics(sft_run, tmp_path, lora, monkeypatch, length_rewards):
    """A few GRPO steps: trainable parameters move, pi_ref's log-probs do not, every metric is logged."""
    import grpo_cli.trainer.loop as loop

    seen = {}
    original = loop.build_policy

    def spy(*args):
        policy = original(*args)
        seen["policy"], seen["before"] = policy, _trainable(policy.model)
        return policy

    monkeypatch.setattr(loop, "build_policy", spy)
    # A barely trained model gets every answer wrong: all advantages would be 0. A reward that
    # varies within groups (completion length mod 3) makes every step carry a gradient.
    cfg = compose(
        "grpo_arithmetic",
        f"model.name_or_path={sft_run}",
        f"output_dir={tmp_path / 'g'}",
        f"lora.enabled={lora}",
        "reward.name=length_mod_3",
        "trainer.steps=3",
        "source.prompts_per_step=4",
        "source.group_size=4",
        "trainer.lr=1e-3",
    )
    run = train(cfg)
    policy = seen["policy"]
    after = _trainable(policy.model)
    assert any(not torch.equal(seen["before"][n], after[n]) for n in after), "no trainable parameter changed"
    if lora:
        assert all("lora_" in n for n in after)
    rows = metrics(run)
    assert len(rows) == 3
    for key in GRPO_METRICS:
        assert key in rows[-1], key
    gpu_mem = {f"gpu_mem_{phase}_mb" for phase in ("generate", "reward", "logprob", "train")}
    if policy.device.type == "cuda":  # each phase's peak of allocated GPU memory
        assert all(rows[-1][k] > 0 for k in gpu_mem)
    else:
        assert not gpu_mem & set(rows[-1])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # first update: pi_theta == pi_ref
    # the reference is still the starting model: its log-probs equal a fresh load's
    start, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(sft_run)))
    from grpo_cli.batch import Batch, pack
    from grpo_cli.models.policy import token_logprobs

    ids, attn, comp = pack(
        [tok("3+4*2\n")["input_ids"]], [tok("3+4=7\n7*2=14\n#### 14")["input_ids"]], tok.pad_token_id
    )
    batch = Batch(ids, attn, comp, ["p"], ["c"], ["14"], torch.zeros(1, dtype=torch.long)).to(policy.device)
    with torch.no_grad():
        expected = token_logprobs(start.to(policy.device), batch)[0]
        ref = policy.reference_logprobs(batch)
        moved = policy.logprobs(batch)[0]
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not torch.allclose(moved, expected, atol=1e-5)


@pytest.mark.slow
def test_grpo_mu_inner_updates_reuse_one_rollout_batch(sft_run, tmp_path, monkeypatch, length_rewards):
    """mu = 2: two optimiser steps per batch, the second one against the stored pi_old: the sampling
    policy's log-probs, computed once in prepare, so the ratio pi_theta / pi_old moves off 1."""
    import grpo_cli.algorithms.functional as F
    import grpo_cli.algorithms.grpo as grpo

    calls = []  # per loss call (one micro-batch): pi_theta's and pi_old's log-probs, clipped tokens, the mask
    token_loss, loss = F.grpo_token_loss, grpo.GRPO.loss

    def token_loss_spy(logp, old, ref, adv, **kw):
        per_token, parts = token_loss(logp, old, ref, adv, **kw)
        calls.append({"logp": logp.detach().clone(), "old": old.detach().clone(), "clipped": parts["clipped"]})
        return per_token, parts

    def loss_spy(self, batch, policy):
        out = loss(self, batch, policy)
        calls[-1]["mask"] = batch.target_mask.bool()
        return out

    monkeypatch.setattr(F, "grpo_token_loss", token_loss_spy)
    monkeypatch.setattr(grpo.GRPO, "loss", loss_spy)
    cfg = compose(
        "grpo_arithmetic",
        f"model.name_or_path={sft_run}",
        f"output_dir={tmp_path / 'mu'}",
        "algorithm.mu=2",
        "reward.name=length_mod_3",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "trainer.lr=1e-2",
        "trainer.schedule=linear",
        "algorithm.eps=0.01",
        "rollout.temperature=0.7",
    )
    rows = metrics(train(cfg))
    # linear decay over steps * mu = 4 optimiser steps: after 2 batches (4 updates) the lr is 0
    assert rows[-1]["lr"] == pytest.approx(0.0)
    assert rows[0]["lr"] == pytest.approx(1e-2 * (1 - 2 / 4))
    # 2 batches x mu = 2 inner updates x 1 micro-batch: calls (first, second) of batch 1, then of batch 2
    assert len(calls) == 4
    for first, second in (calls[0:2], calls[2:4]):
        mask = first["mask"]
        assert mask.any() and torch.equal(mask, second["mask"])
        # inner update 1: pi_theta is still the sampling policy, so old_logp is its own log-probs (at the
        # sampling temperature, 0.7, like the loss's): ratio 1
        torch.testing.assert_close(first["logp"][mask], first["old"][mask], rtol=0, atol=1e-5)
        assert not (first["clipped"] & mask).any()  # |ratio - 1| < eps: nothing is clipped
        # inner update 2: the same stored pi_old (not recomputed from pi_theta), while pi_theta has moved
        assert torch.equal(second["old"], first["old"])
        assert (second["logp"][mask] - second["old"][mask]).abs().max() > 1e-3
        assert (second["clipped"] & mask).any()  # after an lr 1e-2 step some tokens' ratios leave [0.99, 1.01]
    # the logged clip fraction is the mean over both updates: (0 + f) / 2 with 0 < f <= 1
    assert all(0.0 < r["clip_fraction"] <= 0.5 for r in rows)


def test_fused_and_naive_log_probs_agree_in_the_trainer(sft_run):
    """The trainer's fused path (no [N, V] logits) against the naive one: values and gradients."""
    from grpo_cli.batch import Batch, pack
    from grpo_cli.models.policy import token_logprobs

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(sft_run)))
    prompts, comps = ["3+4*2\n", "9-2\n"], ["3+4=7\n7*2=14\n#### 14", "#### 7"]
    enc = lambda xs: [tok(x, add_special_tokens=False)["input_ids"] for x in xs]  # noqa: E731
    ids, attn, comp = pack(enc(prompts), [c + [tok.eos_token_id] for c in enc(comps)], tok.pad_token_id)
    batch = Batch(ids, attn, comp, prompts, comps, ["14", "7"], torch.arange(2))
    grads = {}
    for backend in ("naive", "fused"):
        model.zero_grad()
        logp, ent = token_logprobs(model, batch, temperature=0.7, with_entropy=True, backend=backend)
        mask = batch.target_mask
        ((logp * mask).sum() + (ent * mask).sum()).backward()
        grads[backend] = (logp * mask, ent * mask, model.get_output_embeddings().weight.grad.clone())
    for a, b in zip(grads["naive"], grads["fused"]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_online_rft_trains_on_kept_samples_through_the_same_loop(sft_run, tmp_path, length_rewards):
    cfg = compose(
        "online_rft_arithmetic",
        f"model.name_or_path={sft_run}",
        f"output_dir={tmp_path / 'rft'}",
        "reward.name=length_mod_3",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "trainer.lr=1e-3",
    )
    run = train(cfg)
    rows = metrics(run)
    assert 0.0 < rows[0]["kept"] <= 1.0 and rows[0]["gc_negative"] == 0.0
    before, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(sft_run)))
    after = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "final")
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_fused_adamw_makes_the_updates_of_the_reference_loop():
    """build_optimizer picks torch's fused AdamW for plain float parameters; its oracle is the default
    single-tensor loop: after 3 steps on the same gradients the weights agree to float rounding."""
    import copy

    from grpo_cli.config.schema import TrainerConfig
    from grpo_cli.trainer.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    oracle, start = copy.deepcopy(model), copy.deepcopy(model)
    cfg = TrainerConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, schedule="constant")
    opt, _ = build_optimizer(model, cfg, 1)
    assert opt.defaults["fused"]
    ref = torch.optim.AdamW(oracle.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(3):
        x = torch.randn(8, 16)
        for net, o in ((model, opt), (oracle, ref)):
            o.zero_grad()
            net(x).square().sum().backward()
            o.step()
    for a, b, s in zip(model.parameters(), oracle.parameters(), start.parameters()):
        assert (a - s).abs().max() > 1e-3  # every tensor moved (steps of up to lr each)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
