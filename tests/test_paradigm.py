"""The paradigm sweep (recipes/paradigm_arithmetic.yaml) in miniature: every method, one seed, a
couple of steps, through `grpo sweep` exactly as docs/results.md runs it."""

import csv

import pytest
from conftest import TINY

from grpo_cli.cli import main

METHODS = ["start", "sft", "rft", "online_rft", "dpo", "ppo", "grpo", "grpo_process", "iterative_grpo"]
GRPO_FAMILY = ["dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "dapo_budget"]
"""The GRPO family: algorithm=grpo with switches (recipes/method/<name>.yaml)."""


def test_every_method_option_composes_with_its_own_triple():
    from conftest import compose

    triples = {m: compose("paradigm_arithmetic", f"method={m}") for m in METHODS + GRPO_FAMILY}
    assert triples["rft"].source.name == "rft" and triples["dpo"].algorithm.name == "dpo"
    assert triples["ppo"].algorithm.name == "ppo" and triples["grpo_process"].algorithm.supervision == "process"
    assert triples["iterative_grpo"].iterative.iterations == 3 and triples["grpo"].iterative.iterations == 0
    assert triples["start"].trainer.steps == 0
    assert all(triples[m].algorithm.name == "grpo" for m in GRPO_FAMILY)
    assert triples["gspo"].algorithm.ratio_level == "sequence" and triples["dapo"].reward.overlong_buffer > 0
    budget = lambda c: (c.source.prompts_per_step, c.source.group_size, c.trainer.steps, c.rollout.max_new_tokens)  # noqa: E731
    assert all(budget(triples[m]) == budget(triples["grpo"]) for m in GRPO_FAMILY if m != "dapo_budget")
    # dynamic sampling drew 2 rounds a step from the SFT checkpoint: half the steps for grpo's samples
    dapo, half = triples["dapo"], triples["dapo_budget"]
    assert dapo.source.dynamic_sampling and half.source.dynamic_sampling
    assert half.trainer.steps * 2 == dapo.trainer.steps and half.algorithm == dapo.algorithm
    # a method option and its own recipe are one and the same config
    own = compose("dpo_arithmetic")
    assert triples["dpo"].algorithm == own.algorithm and triples["dpo"].source == own.source


@pytest.fixture
def tiny_reward_model(sft_run, tmp_path, monkeypatch):
    """A reward model for the iterative method (the test's barely trained model gets no answer right,
    so the answer rule alone could not train one): labelled by length, two steps."""
    from conftest import compose, length_mod_3_is_0

    from grpo_cli.rewards.registry import REWARDS
    from grpo_cli.trainer.loop import train

    monkeypatch.setitem(REWARDS, "outcome", lambda cfg: length_mod_3_is_0)
    return train(
        compose(
            "rm_arithmetic",
            f"model.name_or_path={sft_run}",
            "source.questions=8",
            "source.samples_per_question=4",
            "trainer.steps=2",
            "trainer.batch_size=2",
            f"output_dir={tmp_path / 'rm'}",
        )
    )


@pytest.mark.slow
def test_paradigm_sweep_smoke_runs_every_method_and_summarises(sft_run, tiny_reward_model, tmp_path, capsys):
    args = [
        "sweep",
        "recipe=paradigm_arithmetic",
        f"method={','.join(METHODS + GRPO_FAMILY)}",
        "trainer.seed=0",
        *[t for t in TINY if not t.startswith("logging.progress")],
        f"model.name_or_path={sft_run}",
        f"reward.path={tiny_reward_model}",
        "trainer.steps=1",
        "rollout.max_new_tokens=8",
        "data.arithmetic.num_train=40",
        "iterative.rm_steps=1",
        "iterative.questions=4",
        "iterative.samples_per_question=2",
        "iterative.eval_limit=2",
        "eval.limit=4",
        "eval.n=2",
        "eval.ks=[1,2]",
        f"sweep.dir={tmp_path / 'sweep'}",
        "sweep.plot=false",
    ]
    try:
        main(args)
    except SystemExit as exit_:  # a failed run makes the sweep exit 1
        assert exit_.code in (0, None), capsys.readouterr().out[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert [r["method"] for r in rows] == METHODS + GRPO_FAMILY and all(r["status"] == "ok" for r in rows)
    assert all(r["eval.maj@2"] != "" and r["eval.pass@2"] != "" for r in rows)
