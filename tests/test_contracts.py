"""The contracts the loop relies on: a data source's own resume state, a reward's declarations and
the one way a reward is called, and the one sampling path."""

import pytest
import torch
from conftest import compose

from grpo_cli.batch import Batch, pack
from grpo_cli.data import load_examples
from grpo_cli.errors import UserError
from grpo_cli.generation import rollout_options, sample_batch
from grpo_cli.models.load import load_model_and_tokenizer
from grpo_cli.models.policy import Policy
from grpo_cli.rewards.base import FunctionReward, Reward
from grpo_cli.rewards.registry import REWARDS, build_reward, score_batch
from grpo_cli.trainer.source_registry import SOURCES, build_source
from grpo_cli.trainer.sources import Source


def _online_source(seed=0):
    cfg = compose("grpo_arithmetic", "model.name_or_path=tiny", "source.prompts_per_step=2", "source.group_size=2")
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    policy = Policy(model.eval(), tok)
    source = build_source(
        cfg.source,
        examples=load_examples(cfg.data, "train"),
        policy=policy,
        batch_size=4,
        rollout=cfg.rollout,
        seed=seed,
    )
    return source, policy


def test_every_registered_source_is_a_source():
    assert SOURCES and all(issubclass(cls, Source) for cls in SOURCES.values())


def test_a_source_saves_what_it_needs_and_resumes_the_same_batches():
    source, policy = _online_source()
    source.next_batch(policy)
    state = source.state_dict()
    assert set(state) == {"sampler", "generator"}  # declared by the source, not found by reflection
    after = source.next_batch(policy)
    fresh, _ = _online_source(seed=7)  # another seed: only the loaded state makes it the same
    fresh.load_state_dict(state)
    again = fresh.next_batch(policy)
    assert again.prompts == after.prompts and torch.equal(again.input_ids, after.input_ids)


def test_a_state_of_another_source_is_a_one_line_error():
    source, _ = _online_source()
    with pytest.raises(UserError, match="another source.name"):
        source.load_state_dict({"sampler": source.sampler.state_dict()})  # a dataset source's state


def test_the_base_source_has_no_held_out_batches_and_nothing_skipped():
    assert Source().heldout_batches() == [] and Source.skipped == 0 and not Source.samples_each_step


def _text_batch(tok, completions):
    prompts = ["1+2\n"] * len(completions)
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    c_ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    ids, attn, comp = pack(p_ids, c_ids, tok.pad_token_id)
    return Batch(ids, attn, comp, prompts, completions, ["3"] * len(completions), torch.arange(len(completions)))


def test_score_batch_adds_token_offsets_only_for_a_per_step_reward():
    _, tok, _ = load_model_and_tokenizer(compose("sft_arithmetic").model)
    seen = []
    outcome = FunctionReward(lambda b: seen.append(dict(b.tensors)) or torch.zeros(len(b)), name="o")
    per_step = FunctionReward(lambda b: seen.append(dict(b.tensors)) or torch.zeros(len(b)), name="p", per_step=True)
    score_batch(outcome, _text_batch(tok, ["1+2=3\n#### 3"]), tok)
    score_batch(per_step, _text_batch(tok, ["1+2=3\n#### 3"]), tok)
    assert "char_ends" not in seen[0]
    # "1+2=3\n#### 3" is 12 characters, one token each, then EOS (0 characters more): the last
    # two completion tokens end at character 12
    ends = seen[1]["char_ends"][0]
    assert ends[ends > 0].tolist()[-2:] == [12, 12]


def test_build_reward_wraps_a_plain_function_and_the_guard_keeps_the_declarations(monkeypatch):
    monkeypatch.setitem(REWARDS, "plain", lambda cfg: lambda b: [1.0] * len(b.completions))
    reward = build_reward(compose("grpo_arithmetic", "reward.name=plain").reward)
    assert isinstance(reward, Reward) and reward.name == "plain" and not reward.per_step
    steps = build_reward(compose("grpo_process_arithmetic").reward)
    assert steps.per_step  # the step rule declares it labels steps


def test_sample_batch_keeps_the_sampled_tokens_and_counts_what_it_saw():
    cfg = compose("grpo_arithmetic", "model.name_or_path=tiny")
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    examples = load_examples(cfg.data, "train")[:3]
    batch, gens = sample_batch(
        model.eval(),
        tok,
        examples,
        group=torch.arange(3),
        generator=torch.Generator().manual_seed(0),
        **rollout_options(cfg.rollout),
    )
    assert batch.completion_token_ids() == [g.completion_ids for g in gens]  # never re-tokenised
    assert batch.completions == [g.text for g in gens] and batch.answers == [e.answer for e in examples]
    assert batch.stats["completion_length"] == sum(len(g.completion_ids) for g in gens) / 3
    assert batch.stats["truncated"] == sum(not g.finished for g in gens) / 3
