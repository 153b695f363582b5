"""SFT on tool solutions: the arithmetic task's tool variant, its observation tokens masked (holes in
completion_mask, attended to but never trained on), and the tool recipes."""

import json

import pytest
import torch
from conftest import compose, metrics

import grpo_cli.models.policy as policy_module
from grpo_cli.algorithms.sft import sft_loss
from grpo_cli.batch import pack
from grpo_cli.data import load_examples
from grpo_cli.data.arithmetic import tool_solution
from grpo_cli.models.load import load_model_and_tokenizer
from grpo_cli.models.policy import Policy
from grpo_cli.models.tiny import build_tokenizer
from grpo_cli.tools.base import output_spans
from grpo_cli.trainer.source_registry import build_source
from grpo_cli.trainer.sources import mask_holes, solution_ids, written_mask


def test_written_mask_by_hand():
    # Tokens over "ab|cd|e|f" (offsets), the observation spans characters [2, 5): "cd" and "e" lie
    # in it, "f" [5, 6) ends where it ends; a token straddling a boundary ("bc" [1, 3)) is a hole too.
    assert written_mask([(0, 2), (2, 4), (4, 5), (5, 6)], [(2, 5)]) == [1, 0, 0, 1]
    assert written_mask([(0, 1), (1, 3), (3, 6)], [(2, 5)]) == [1, 0, 0]
    assert written_mask([(0, 1), (1, 1), (1, 2)], [(1, 2)]) == [1, 1, 0]  # an empty token overlaps nothing
    assert written_mask([(0, 1), (1, 2)], []) == [1, 1]


def test_mask_holes_zeroes_the_right_aligned_completion_tokens():
    _, _, comp = pack([[5, 6], [5]], [[1, 2, 3], [1, 2]], pad_id=0)  # [[1,1,1,1,1]... completions right-aligned
    masked = mask_holes(comp, [[1, 0, 1], None])
    assert masked.tolist() == [[0, 0, 1, 0, 1], [0, 0, 0, 1, 1]]
    assert comp.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]  # the input is left as it was


def test_solution_ids_mask_exactly_the_output_block():
    tok = build_tokenizer()  # the tiny model's: one token per character
    solution = tool_solution("23+45*17", 1156)
    ids, written = solution_ids(tok, solution)
    assert ids == tok(solution, add_special_tokens=False)["input_ids"]
    ((start, end),) = output_spans(solution)
    assert written == [0 if start <= i < end else 1 for i in range(len(solution))]
    assert tok.decode([t for t, w in zip(ids, written) if not w]) == "\n```output\n1156\n```\n"
    plain = "23+45=68\n68*17=1156\n#### 1156"
    assert solution_ids(tok, plain) == (tok(plain, add_special_tokens=False)["input_ids"], None)


def _dataset_batch(recipe, *overrides):
    cfg = compose(recipe, "model.name_or_path=tiny", *overrides)
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    policy = Policy(model, tok)
    examples = load_examples(cfg.data, "train")
    source = build_source(cfg.source, examples=examples, policy=policy, batch_size=8, rollout=cfg.rollout, seed=0)
    return source.next_batch(policy), policy, source


def test_default_sft_batches_are_the_plain_packing():
    batch, policy, source = _dataset_batch("sft_arithmetic")
    tok = policy.tokenizer
    rows = source.rows
    assert all(r[3] is None for r in rows)  # no observations: no mask kept
    # The batch is what packing the plain token ids gives (the code before holes existed).
    by_prompt = {r[0].prompt + r[0].solution: r for r in rows}
    picked = [by_prompt[p + c] for p, c in zip(batch.prompts, batch.completions)]
    ids, attn, comp = pack(
        [tok(r[0].prompt, add_special_tokens=False)["input_ids"] for r in picked],
        [tok(r[0].solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in picked],
        tok.pad_token_id,
    )
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, attn)
    assert torch.equal(batch.completion_mask, comp)


def test_tool_sft_batch_has_holes_on_observations_only_and_they_get_no_gradient(monkeypatch):
    batch, policy, _ = _dataset_batch("sft_tool_arithmetic", "data.arithmetic.tool_fraction=1.0")
    tok = policy.tokenizer
    T = batch.input_ids.shape[1]
    for b, solution in enumerate(batch.completions):
        ((start, end),) = output_spans(solution)
        n = len(solution) + 1  # one token per character, then EOS
        comp = batch.completion_mask[b, T - n :].tolist()
        assert comp == [0 if start <= i < end else 1 for i in range(n)]
        assert batch.attention_mask[b, T - n :].all()  # the observation is still read
        holes = batch.input_ids[b, T - n :][torch.tensor(comp) == 0]
        assert tok.decode(holes.tolist()) == solution[start:end]
    assert batch.with_totals().totals["tokens"] == float(batch.target_mask.sum())

    # The loss's gradient reaches the last hidden state of a position only through the logits that
    # predict the next token: zero exactly where that token is a hole or not a completion token.
    kept = {}

    def hidden_states(*args, **kwargs):
        h = original(*args, **kwargs)
        h.retain_grad()
        kept["h"] = h
        return h

    original = policy_module.hidden_states
    monkeypatch.setattr(policy_module, "hidden_states", hidden_states)
    logp, _ = policy.logprobs(batch)
    sft_loss(logp, batch.target_mask, batch.totals["tokens"]).backward()
    grad = kept["h"].grad[:, :-1].abs().sum(-1)  # [B, T-1]: position t predicts token t+1
    trained = batch.target_mask.bool()
    assert (grad[~trained] == 0).all() and (grad[trained] > 0).all()
    assert (logp[~trained] == 0).all()


@pytest.mark.slow
def test_two_step_sft_on_the_tool_variant(tmp_path):
    from grpo_cli.trainer.loop import train

    run = train(compose("sft_tool_arithmetic", "trainer.steps=2", "trainer.batch_size=8", f"output_dir={tmp_path}"))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    assert (run / "checkpoints" / "final" / "model.safetensors").exists()


def test_sft_tool_recipe_sets_the_tool_variant():
    from grpo_cli.config.compose import compose_run

    cfg = compose_run("sft_tool_arithmetic", [])  # the recipe's own settings, not the tests' tiny ones
    a = cfg.data.arithmetic
    assert (a.digits, a.mul_digits, a.ops, a.tool_fraction, a.direct_fraction) == (3, 2, "+*", 0.8, 0.0)
    assert cfg.source.name == "dataset" and cfg.algorithm.name == "sft"
    assert cfg.model.tiny.max_position_embeddings >= 16 + cfg.rollout.max_new_tokens  # prompt + completion fit


def test_tool_grpo_recipes_compose_with_the_tools_on():
    arith = compose("grpo_tool_arithmetic")
    assert list(arith.rollout.tools) == ["python"] and arith.data.arithmetic.tool_fraction == 0.8
    gsm8k = compose("grpo_gsm8k_tool")
    assert list(gsm8k.rollout.tools) == ["python"] and "```python" in gsm8k.data.system_prompt


def test_the_python_environment_answers_with_the_real_sandbox():
    from grpo_cli.tools.environments import PythonEnvironment

    env = PythonEnvironment(timeout_s=5.0)
    text = "```python\nprint((714+984)*87)\n```"
    assert env.turn_ended(text) and env.respond(text) == "\n```output\n147726\n```\n"
    failing = text.replace("print((714+984)*87)", "1/0")
    assert env.respond(failing).endswith("ZeroDivisionError: division by zero\n```\n")


@pytest.mark.slow
def test_sft_then_grpo_with_the_python_tool_runs_as_the_recipes_say(tmp_path):
    """recipe=sft_tool_arithmetic then recipe=grpo_tool_arithmetic (the real sandbox in the rollouts),
    shortened; the completion tables count the turns."""
    from grpo_cli.trainer.loop import train

    short = ("trainer.steps=2", "trainer.batch_size=8")
    sft = train(compose("sft_tool_arithmetic", *short, f"output_dir={tmp_path / 's'}"))
    grpo = train(
        compose(
            "grpo_tool_arithmetic",
            f"model.name_or_path={sft}",
            "trainer.steps=2",
            "source.prompts_per_step=2",
            "source.group_size=4",
            f"output_dir={tmp_path / 'g'}",
        )
    )
    rows = metrics(grpo)
    assert [r["step"] for r in rows] == [1, 2]
    table = [json.loads(x) for x in (grpo / "completions" / "step_000002.jsonl").read_text().splitlines()]
    assert len(table) == 8 and all(r["turns"] >= 1 for r in table)
