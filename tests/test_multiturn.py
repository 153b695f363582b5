"""Multi-turn rollouts (issue 33): environments, the engines' turn loop against a slow oracle that
recomputes the whole prefix, the masks that keep observations out of training, training and eval."""

import json
import threading
import time
from typing import Optional

import pytest
import torch
from conftest import compose, metrics, rows
from test_generation import chaotic_tiny_model
from test_vllm_rollout import fake_vllm, vllm_rows  # noqa: F401 (a fixture)

from grpo_cli.errors import UserError
from grpo_cli.generation import generate_ids, sample_next, sampled_logprob, uniforms
from grpo_cli.models.tiny import build_tokenizer
from grpo_cli.tools.base import Environment
from grpo_cli.tools.environments import EnvironmentTurns, PythonEnvironment, build_environment

PROMPTS = ["3+4*2\n", "9-2-5+1-3\n", "7*7\n", "1\n", "8*3-2\n", "5+5+5+5+5+5\n"]


class SevenEnvironment(Environment):
    """A deterministic fake: a turn ends at each of some characters the chaotic tiny model writes
    (greedy or sampled), answered by an observation whose length depends on the completion's, so rows'
    observations differ."""

    trigger_chars = "7gmkQ/("

    def __init__(self, timeout_s: float = 1.0):
        self.timeout_s = timeout_s

    def turn_ended(self, text: str) -> bool:
        return text[-1:] in self.trigger_chars if text else False

    def respond(self, text: str) -> Optional[str]:
        return "\n```output\n" + "4" * (1 + len(text) % 4) + "\n```\n"


class FenceEnvironment(Environment):
    """The tool format with a fake tool: any closed python block gets the output 42."""

    def __init__(self, timeout_s: float = 1.0):
        pass

    def turn_ended(self, text: str) -> bool:
        return PythonEnvironment().turn_ended(text)

    def respond(self, text: str) -> Optional[str]:
        return "\n```output\n42\n```\n"


@pytest.fixture(scope="module")
def chaotic():
    return chaotic_tiny_model()


# --- environments and the adapter ---


def test_build_environment_picks_tools_or_a_class():
    assert build_environment() is None
    assert isinstance(build_environment(["python"], "", 2.0), PythonEnvironment)
    assert isinstance(build_environment([], "test_multiturn:SevenEnvironment"), SevenEnvironment)
    for bad in ("nope.module:X", "test_multiturn:Nothing", "test_multiturn:chaotic_tiny_model", "no_colon"):
        with pytest.raises(UserError, match="rollout.environment"):
            build_environment([], bad)
    with pytest.raises(UserError, match="unknown tool"):
        build_environment(["bash"])
    with pytest.raises(UserError, match="exclusive"):
        build_environment(["python"], "test_multiturn:SevenEnvironment")


def test_python_environment_runs_the_closed_block(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("grpo_cli.tools.python")
    fake.run_python = lambda code, timeout_s: (f"ran {code} in {timeout_s}\n", None)
    monkeypatch.setitem(sys.modules, "grpo_cli.tools.python", fake)
    env = PythonEnvironment(timeout_s=3.0)
    text = "let me compute\n```python\nprint(1)\n```"
    assert env.turn_ended(text) and not env.turn_ended(text + "\n")
    assert env.respond(text) == "\n```output\nran print(1) in 3.0\n```\n"


def test_adapter_pauses_at_a_turn_end_and_tokenises_the_observation():
    tok = build_tokenizer()
    turns = EnvironmentTurns(FenceEnvironment(), tok, max_turns=1)
    ids = tok("```python\nprint(6*7)\n```", add_special_tokens=False)["input_ids"]
    assert not any(turns.pauses(0, ids[:k]) for k in range(len(ids)))  # not before the closing fence
    assert turns.pauses(0, ids)
    obs = turns.observe(0, ids)
    assert tok.decode(obs) == "\n```output\n42\n```\n"
    assert turns.observe(0, ids + obs + ids) is None  # max_turns spent: the row is done
    assert turns.observe(1, ids) is not None  # turns are counted per row
    # the completion is decoded only where the newest token could end a turn (it holds a backtick)
    env, asked = FenceEnvironment(), []
    env.turn_ended = lambda text: asked.append(text) or PythonEnvironment().turn_ended(text)
    counting = EnvironmentTurns(env, tok, max_turns=1)
    for k in range(1, len(ids) + 1):
        counting.pauses(0, ids[:k])
    assert len(asked) == 6  # two fences of three backticks


# --- the engines against the oracle ---


def oracle(model, tok, prompt_ids, env, max_turns, *, n, temperature, generator):
    """Slow and obvious: every step recomputes each live row's whole sequence (prompt, completion,
    observations) with a plain forward, samples with the same draws, and asks the environment
    directly. Returns (tokens, log-probs, written, stopped) per row."""
    stops = (tok.eos_token_id,)
    B = len(prompt_ids)
    comp, logp, written = [[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)]
    turns_used, done, stopped = [0] * B, [False] * B, [False] * B
    for _ in range(n):
        u = uniforms(B, temperature, generator, "cpu")
        live = [b for b in range(B) if not done[b]]
        for b in live:
            seq = torch.tensor([prompt_ids[b] + comp[b]])
            logits = model(input_ids=seq).logits[:, -1]
            tokn = sample_next(logits, temperature, 1.0, None if u is None else u[b : b + 1])
            comp[b].append(int(tokn))
            logp[b].append(float(sampled_logprob(logits, tokn, temperature)))
            written[b].append(True)
            text = tok.decode(comp[b], skip_special_tokens=True)
            if int(tokn) in stops:
                done[b] = stopped[b] = True
            elif len(comp[b]) >= n:
                done[b] = True
            elif env.turn_ended(text):
                if turns_used[b] >= max_turns:
                    done[b] = stopped[b] = True
                    continue
                turns_used[b] += 1
                obs = tok(env.respond(text), add_special_tokens=False)["input_ids"][: n - len(comp[b])]
                comp[b] += obs
                logp[b] += [0.0] * len(obs)
                written[b] += [False] * len(obs)
                done[b] = len(comp[b]) >= n
        if all(done):
            break
    return comp, logp, written, stopped


ENGINES = [
    ("reference", {}),
    ("fast", dict(packed_weights=False, compile_decode_step=False)),
    ("fast", dict(packed_weights=True, compile_decode_step=False)),
]


@pytest.mark.parametrize("engine,options", ENGINES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@torch.no_grad()
def test_engines_match_the_oracle_that_recomputes_the_prefix(chaotic, engine, options, temperature):
    model, tok = chaotic
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    env, n, max_turns = SevenEnvironment(), 40, 3
    expected = oracle(model, tok, ids, env, max_turns, n=n, temperature=temperature, generator=_gen())
    turns = EnvironmentTurns(env, tok, max_turns)
    got = generate_ids(
        model,
        ids,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=n,
        temperature=temperature,
        generator=_gen(),
        engine=engine,
        turns=turns,
        **options,
    )
    assert got.tokens == expected[0]
    assert got.model_written == expected[2]
    assert got.stopped == expected[3]
    assert sum(not w for row in got.model_written for w in row) > 10  # observations were appended
    for a, b in zip(got.logprobs, expected[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


def _gen():
    return torch.Generator().manual_seed(3)


@pytest.mark.parametrize("engine,options", ENGINES[:2])
@torch.no_grad()
def test_without_pauses_the_turn_loop_samples_as_the_plain_engine(chaotic, engine, options):
    model, tok = chaotic
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    common = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=24, temperature=1.0, engine=engine)
    plain, plain_logp = generate_ids(model, ids, generator=_gen(), with_logprobs=True, **common, **options)
    never = EnvironmentTurns(SevenEnvironment(), tok, max_turns=3, trigger_chars="")
    never.env.turn_ended = lambda text: False
    got = generate_ids(model, ids, generator=_gen(), turns=never, **common, **options)
    for b, row in enumerate(got.tokens):
        assert row == plain[b][: len(row)] and all(t == tok.pad_token_id for t in plain[b][len(row) :])
        torch.testing.assert_close(torch.tensor(got.logprobs[b]), torch.tensor(plain_logp[b][: len(row)]))


# --- masks: a trained token is exactly one the model wrote ---


@torch.no_grad()
def _sampled(chaotic, engine="auto"):
    from grpo_cli.data.types import Example
    from grpo_cli.generation import sample_batch

    model, tok = chaotic
    examples = [Example(question=p, prompt=p, solution="", answer="0") for p in PROMPTS]
    options = dict(max_new_tokens=40, temperature=1.0, engine=engine, environment=SevenEnvironment(), max_turns=3)
    return sample_batch(
        model, tok, examples, group=torch.arange(len(PROMPTS)), generator=_gen(), **options, compile_decode_step=False
    )


def test_a_trained_token_is_exactly_one_the_model_wrote(chaotic):
    from grpo_cli.models.policy import token_logprobs
    from grpo_cli.tracking import completion_rows

    batch, gens = _sampled(chaotic)
    T = batch.input_ids.shape[1]
    for b, g in enumerate(gens):
        start = T - len(g.completion_ids)
        assert batch.input_ids[b, start:].tolist() == g.completion_ids
        written = [start + k for k, w in enumerate(g.model_written) if w]
        assert batch.completion_mask[b].nonzero().flatten().tolist() == written  # trained: model-written only
        assert batch.attention_mask[b, start:].all()  # observations are attended to
        assert batch.completion_span[b].nonzero().flatten().tolist() == list(range(start, T))
        assert batch.completion_token_ids()[b] == g.completion_ids
        assert g.text == chaotic[1].decode(g.completion_ids, skip_special_tokens=True)
    assert any(g.turns > 1 for g in gens) and any(not all(g.model_written) for g in gens)
    # rollout_logp: the engine's log-prob on model tokens, 0 on the holes
    holes = (batch.completion_span[:, 1:] & ~batch.completion_mask[:, 1:].bool()).float()
    assert float((batch.tensors["rollout_logp"] * holes).abs().sum()) == 0
    # observation targets get no gradient through the loss
    model = chaotic[0]
    with torch.enable_grad():
        logp, _ = token_logprobs(model, batch, backend="naive")
        logp.retain_grad()
        (-(logp * batch.target_mask).sum()).backward()
    assert float((logp.grad * holes).abs().sum()) == 0 and float(logp.grad.abs().sum()) > 0
    torch.testing.assert_close((logp.detach() * batch.target_mask), batch.tensors["rollout_logp"], atol=1e-4, rtol=0)
    model.zero_grad(set_to_none=True)
    rows = completion_rows(batch, step=0, max_rows=64)
    assert [r["turns"] for r in rows] == [g.turns for g in gens]
    assert [r["length"] for r in rows] == [len(g.completion_ids) for g in gens]


def test_kl_shaped_rewards_put_the_outcome_at_the_last_model_token():
    import grpo_cli.algorithms.functional as F

    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])  # row 0 cut inside an observation
    r = F.kl_shaped_rewards(torch.tensor([2.0, 3.0]), torch.zeros(2, 4), torch.zeros(2, 4), mask, beta=0.0)
    assert r.tolist() == [[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]


# --- training and evaluation with a fake tool ---


class EqualsEnvironment(Environment):
    """For the SFT'd tiny model: a turn ends at each '=' it writes; the 'tool' answers 42."""

    trigger_chars = "="

    def __init__(self, timeout_s: float = 1.0):
        pass

    def turn_ended(self, text: str) -> bool:
        return text.endswith("=")

    def respond(self, text: str) -> Optional[str]:
        return "\n```output\n42\n```\n"


class HashEnvironment(EqualsEnvironment):
    """A turn ends at each '#' (what the barely trained model writes greedily)."""

    trigger_chars = "#"

    def turn_ended(self, text: str) -> bool:
        return text.endswith("#")


TOOL = ["rollout.environment=test_multiturn:EqualsEnvironment", "rollout.max_turns=2", "rollout.max_new_tokens=40"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("grpo_arithmetic", ["source.group_size=4"]),
        ("ppo_arithmetic", []),
        ("online_rft_arithmetic", ["source.group_size=4"]),
    ],
)
def test_a_training_step_with_a_tool_environment(sft_run, tmp_path, length_rewards, monkeypatch, recipe, extra):
    import grpo_cli.trainer.loop as loop

    seen = []
    original = loop.build_policy
    monkeypatch.setattr(loop, "build_policy", lambda *a: seen.append(original(*a)) or seen[-1])
    cfg = compose(
        recipe,
        f"model.name_or_path={sft_run}",
        f"output_dir={tmp_path / 'r'}",
        "reward.name=length_mod_3",
        "trainer.steps=2",
        "source.prompts_per_step=4",
        "logging.completions_every=1",
        *TOOL,
        *extra,
    )
    run = loop.train(cfg)
    out = metrics(run)
    assert len([r for r in out if "loss" in r]) == 2 and all(
        torch.isfinite(torch.tensor(r["loss"])) for r in out if "loss" in r
    )
    table = [json.loads(line) for line in next((run / "completions").glob("step_*1.jsonl")).read_text().splitlines()]
    assert any(r["turns"] > 1 and "```output\n42\n```" in r["completion"] for r in table)


@pytest.mark.slow
def test_a_tool_run_resumes_exactly(sft_run, tmp_path, length_rewards):
    from grpo_cli.trainer.loop import train

    common = [
        f"model.name_or_path={sft_run}",
        "reward.name=length_mod_3",
        "trainer.lr=1e-3",
        "trainer.schedule=constant",
    ]
    common += ["source.prompts_per_step=4", "source.group_size=2", *TOOL]
    whole = rows(train(compose("grpo_arithmetic", *common, "trainer.steps=4", f"output_dir={tmp_path / 'a'}")))
    part = tmp_path / "b"
    train(compose("grpo_arithmetic", *common, "trainer.steps=2", "trainer.save_every=2", f"output_dir={part}"))
    resumed = rows(train(compose("grpo_arithmetic", *common, "trainer.steps=4", "resume=true", f"output_dir={part}")))
    assert resumed == whole


def test_eval_of_a_tool_run_uses_its_tools_and_says_so(sft_run, tmp_path, capsys):
    import shutil

    from omegaconf import OmegaConf

    from grpo_cli.cli import main

    run = shutil.copytree(sft_run, tmp_path / "sft", symlinks=True)
    saved = OmegaConf.load(run / "config.yaml")
    saved.rollout.environment, saved.rollout.max_turns = "test_multiturn:HashEnvironment", 2
    OmegaConf.save(saved, run / "config.yaml")
    main(["eval", f"run={run}", "eval.limit=8", "trainer.threads=1", "rollout.max_new_tokens=40"])
    printed = " ".join(capsys.readouterr().err.split())  # a notice: on stderr
    assert "eval: multi-turn rollouts as the run was trained (environment=test_multiturn:HashEnvironment" in printed
    samples = [json.loads(x) for x in (run / "eval" / "latest" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all("turns" in r for r in samples)
    assert any(r["turns"] > 1 and "```output\n42\n```" in r["completion"] for r in samples)


# --- vLLM: a new request per turn (the stand-in vllm module of tests/test_vllm_rollout.py) ---


class EveryFifth:
    """Token-level Turns: a turn ends at a token divisible by 5, answered by that token + 10; two
    observations per row, then done."""

    def __init__(self):
        self.used = {}

    def pauses(self, row, ids):
        return ids[-1] % 5 == 0

    def observe(self, row, ids):
        self.used[row] = self.used.get(row, 0) + 1
        return None if self.used[row] > 2 else [ids[-1] + 10]


def test_vllm_takes_a_new_request_per_turn(fake_vllm):  # noqa: F811 (the fixture imported above)
    model, tok = chaotic_tiny_model()
    n = 12
    got = vllm_rows(model, tok, eos=False, n=n, turns=EveryFifth())
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    for b, p in enumerate(ids):  # the stand-in writes last + 1, last + 2, ...: by hand
        row, written, used, last = [], [], 0, p[-1]
        while len(row) < n:
            last += 1
            row.append(last)
            written.append(True)
            if last % 5 == 0:
                used += 1
                if used > 2:
                    break
                last += 10
                row.append(last)
                written.append(False)
        assert got.tokens[b] == row[:n] and got.model_written[b] == written[:n]
        assert got.stopped[b] == (used > 2)
    calls = fake_vllm.built[-1].calls
    assert len(calls) == 3  # two observations: three rounds of requests
    for prompts, _ in calls[1:]:  # later turns: prompt + completion so far (its observation last), as ids
        for p in prompts:
            p = p["prompt_token_ids"]
            b = next(
                b for b, q in enumerate(ids) if p[: len(q)] == q and p[len(q) :] == got.tokens[b][: len(p) - len(q)]
            )
            assert not got.model_written[b][len(p) - len(ids[b]) - 1]  # it ends with the observation
    assert all(lp == 0.0 for lps, ws in zip(got.logprobs, got.model_written) for lp, w in zip(lps, ws) if not w)


def test_a_step_that_ends_in_an_observation_is_charged_at_the_model_token_before_it():
    from grpo_cli.batch import Batch
    from grpo_cli.rewards.process import place_steps

    comp = torch.tensor([[0, 1, 1, 0, 0, 1]])  # tokens 3-4: an observation
    batch = Batch(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6), comp, ["p"], ["c"], ["a"], torch.tensor([0]))
    place_steps(batch, [[(4, 1.0), (5, -1.0)]])
    assert batch.tensors["step_rewards"].tolist() == [[0.0, 1.0, 0.0, 0.0, -1.0]]  # target t scores token t + 1
    assert (batch.tensors["step_mask"] <= batch.target_mask).all()


class SlowSevenEnvironment(SevenEnvironment):
    """SevenEnvironment whose answers take a while and may run together: records the most in flight."""

    concurrent = True

    def __init__(self, timeout_s: float = 1.0):
        super().__init__(timeout_s)
        self.lock, self.running, self.most = threading.Lock(), 0, 0

    def respond(self, text: str) -> Optional[str]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        return super().respond(text)


@torch.no_grad()
def test_a_concurrent_environment_answers_the_rows_of_a_step_together_with_the_same_result(chaotic):
    """Rows whose turns end at the same decode step are answered in threads (a sandbox call is mostly a
    process start): the rollout is the sequential one, token for token."""
    model, tok = chaotic
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]

    def run(env):
        turns = EnvironmentTurns(env, tok, max_turns=3)
        options = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=40, temperature=1.0)
        return generate_ids(model, ids, generator=_gen(), engine="reference", turns=turns, **options)

    slow = SlowSevenEnvironment()
    together, alone = run(slow), run(SevenEnvironment())
    assert slow.most > 1
    assert together.tokens == alone.tokens and together.model_written == alone.model_written
