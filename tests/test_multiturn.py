"""Multi-turn rollouts (issue 33): environments, the engines' turn loop against a slow oracle that
recomputes the whole prefix, the masks that keep observations out of training, training and eval."""

from typing import Optional

import pytest
import torch

from grpo_cli.config.schema import TinyModelConfig
from grpo_cli.errors import UserError
from grpo_cli.generation import generate_ids, sample_next, sampled_logprob, uniforms
from grpo_cli.models.tiny import build_tiny_model, build_tokenizer
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


def chaotic_tiny_model():
    """A tiny Qwen2 whose rows differ and stop at different steps (weights of std 1/sqrt(fan_in))."""
    tok = build_tokenizer()
    cfg = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    model = build_tiny_model(cfg, len(tok), tok.pad_token_id, tok.eos_token_id)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model.eval(), tok


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
    directly. Returns (tokens, log-probs, written) per row."""
    stops = (tok.eos_token_id,)
    B = len(prompt_ids)
    comp, logp, written = [[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)]
    turns_used, done = [0] * B, [False] * B
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
            if int(tokn) in stops or len(comp[b]) >= n:
                done[b] = True
            elif env.turn_ended(text):
                if turns_used[b] >= max_turns:
                    done[b] = True
                    continue
                turns_used[b] += 1
                obs = tok(env.respond(text), add_special_tokens=False)["input_ids"][: n - len(comp[b])]
                comp[b] += obs
                logp[b] += [0.0] * len(obs)
                written[b] += [False] * len(obs)
                done[b] = len(comp[b]) >= n
        if all(done):
            break
    return comp, logp, written


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
