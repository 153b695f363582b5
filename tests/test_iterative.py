"""Iterative GRPO (Algorithm 1): reference reset, reward model continued with replay, resumable."""

import json

import pytest
import yaml

from tests.conftest import compose, length_mod_3_is_0


@pytest.fixture
def length_rule(monkeypatch):
    """The answer rule almost never fires on the test's barely trained model: label by length instead."""
    from grpo_cli.rewards.registry import REWARDS

    monkeypatch.setitem(REWARDS, "outcome", lambda cfg: length_mod_3_is_0)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_iterative_grpo_resets_reference_refreshes_reward_model_and_resumes(sft_run, tmp_path, length_rule):
    from grpo_cli.iterative import run_iterative

    common = [
        f"model.name_or_path={sft_run}",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=3",
        "iterative.rm_steps=2",
        "iterative.questions=6",
        "iterative.samples_per_question=3",
        "iterative.eval_limit=4",
        f"output_dir={tmp_path / 'it'}",
    ]
    cfg = compose("iterative_grpo_arithmetic", *common, "iterative.iterations=2")
    run = run_iterative(cfg)
    rows = _lines(run / "iterations.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["rm_replayed"] > 0 and "eval_accuracy" in r for r in rows)  # 10% from the buffer each time
    # pi_ref <- pi_theta: iteration 2 starts (and takes its reference) from iteration 1's policy
    it2 = yaml.safe_load((run / "iter_2" / "policy" / "config.yaml").read_text())
    assert it2["model"]["name_or_path"] == str(run / "iter_1" / "policy")
    assert _lines(run / "iter_2" / "policy" / "metrics.jsonl")[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # the reward model continues: iteration 2 trains from iteration 1's model and head
    rm2 = yaml.safe_load((run / "iter_2" / "rm" / "config.yaml").read_text())
    assert rm2["model"]["name_or_path"] == rm2["algorithm"]["head_from"] == str(run / "iter_1" / "rm")
    buffer = _lines(run / "rm_buffer.jsonl")
    assert len(buffer) == len(_lines(run / "rm_0" / "samples.jsonl")) + 2 * 6 * 3
    assert (run / "checkpoints" / "final").resolve() == (run / "iter_2" / "policy" / "checkpoints" / "final").resolve()
    # resume: the finished iterations are skipped, the third starts from the second's policy
    again = run_iterative(compose("iterative_grpo_arithmetic", *common, "iterative.iterations=3", "resume=true"))
    assert [r["iteration"] for r in _lines(again / "iterations.jsonl")] == [1, 2, 3]
    it3 = yaml.safe_load((run / "iter_3" / "policy" / "config.yaml").read_text())
    assert it3["model"]["name_or_path"] == str(run / "iter_2" / "policy")


def test_replay_share_of_the_mix():
    from grpo_cli.iterative import with_replay

    fresh, history = [{"i": i} for i in range(90)], [{"h": i} for i in range(50)]
    mix = with_replay(fresh, history, 0.1, seed=0)
    assert len(mix) == 100 and sum("h" in r for r in mix) == 10  # 10 of 100 are historical
    assert len(with_replay(fresh, [], 0.1, seed=0)) == 90


def test_iterative_needs_a_learned_reward():
    from grpo_cli.errors import UserError
    from grpo_cli.iterative import run_iterative

    with pytest.raises(UserError, match="reward=outcome_rm"):
        run_iterative(compose("grpo_arithmetic", "iterative.iterations=2"))


@pytest.mark.slow
def test_iterative_grpo_with_a_process_reward_model(sft_run, tmp_path):
    """The process variant: a PRM trained first (rm_0), process advantages, the PRM continued."""
    from grpo_cli.iterative import run_iterative

    cfg = compose(
        "iterative_grpo_arithmetic",
        f"model.name_or_path={sft_run}",
        "reward=process_rm",
        "algorithm.supervision=process",
        "iterative.iterations=1",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=3",
        "iterative.rm_steps=2",
        "iterative.questions=6",
        "iterative.samples_per_question=2",
        "iterative.eval_limit=0",
        f"output_dir={tmp_path / 'pit'}",
    )
    run = run_iterative(cfg)
    row = _lines(run / "iterations.jsonl")[0]
    assert "rm_skipped" not in row and 0.0 <= row["rm_heldout_step_acc"] <= 1.0  # the PRM was trained and scored
    prm = yaml.safe_load((run / "iter_1" / "rm" / "config.yaml").read_text())
    assert prm["algorithm"]["name"] == "process_reward_model" and prm["algorithm"]["head_from"] == str(run / "rm_0")
    # GRPO with supervision=process refuses a batch without step rewards: these steps got them from the PRM
    assert len(_lines(run / "iter_1" / "policy" / "metrics.jsonl")) == 2
