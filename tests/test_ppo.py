"""PPO and the outcome reward model through the shared trainer, on the tiny model."""

import pytest
import torch

from tests.conftest import compose, metrics

PPO_METRICS = [
    "value_loss",
    "explained_variance",
    "kl",
    "clip_fraction",
    "reward_mean",
    "policy_loss",
    "gc_mean",
    "gc_std",
    "gc_positive",
    "gc_negative",
]


@pytest.mark.slow
@pytest.mark.parametrize("value_model,lora", [("separate", False), ("separate", True), ("lora", True)])
def test_ppo_trains_policy_and_value_model(sft_run, tmp_path, length_rewards, monkeypatch, value_model, lora):
    from grpo_cli.trainer import loop

    seen = {}
    real = loop.optimise

    def spy(batch, algorithm, policy, *a, **k):
        if "value" not in seen:
            seen["value"] = {n: p.detach().clone() for n, p in algorithm.value.named_parameters()}
            seen["policy"] = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
        seen["algorithm"], seen["model"] = algorithm, policy.model
        return real(batch, algorithm, policy, *a, **k)

    monkeypatch.setattr(loop, "optimise", spy)
    cfg = compose(
        "ppo_arithmetic",
        f"model.name_or_path={sft_run}",
        "reward.name=length_mod_3_is_0",
        f"lora.enabled={lora}",
        f"algorithm.value_model={value_model}",
        "source.prompts_per_step=6",
        "trainer.steps=3",
        "trainer.lr=1e-3",
        f"output_dir={tmp_path / 'ppo'}",
    )
    rows = metrics(loop.train(cfg))
    assert len(rows) == 3 and all(k in rows[-1] for k in PPO_METRICS)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first batch: pi_old == pi_ref
    value = dict(seen["algorithm"].value.named_parameters())
    assert any(not torch.equal(seen["value"][n], value[n]) for n in seen["value"]), "value model did not train"
    policy = {n: p for n, p in seen["model"].named_parameters() if p.requires_grad}
    changed = [n for n in seen["policy"] if not torch.equal(seen["policy"][n], policy[n])]
    assert any("value" not in n for n in changed), "the policy did not train"
    if value_model == "lora":  # the value adapter lives on the policy's base, the base stays frozen
        assert any(".value." in n for n in changed) and all("lora_" in n for n in changed)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["pairwise", "pointwise"])
def test_reward_model_trains_saves_and_scores_in_grpo(sft_run, tmp_path, length_rewards, objective):
    from grpo_cli.models.scorer import load_scorer
    from grpo_cli.trainer.loop import train

    source = "pairs" if objective == "pairwise" else "labelled"
    cfg = compose(
        "rm_arithmetic",
        f"model.name_or_path={sft_run}",
        "reward.name=length_mod_3_is_0",
        f"source={source}",
        f"algorithm.objective={objective}",
        "source.questions=16",
        "source.samples_per_question=6",
        "source.heldout=0.25",
        "trainer.steps=6",
        "trainer.batch_size=4",
        "trainer.lr=3e-3",
        "trainer.eval_every=3",
        f"output_dir={tmp_path / 'rm'}",
    )
    run = train(cfg)
    rows = metrics(run)
    metric = "pair_acc" if objective == "pairwise" else "accuracy"
    assert f"heldout_{metric}" in rows[2] and f"heldout_{metric}" in rows[-1]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # a zero head: sigmoid(0) everywhere
    scorer, _ = load_scorer(str(run))
    assert scorer.head.weight.abs().sum() > 0  # the trained head was saved and reloaded
    grpo = compose(
        "grpo_arithmetic",
        f"model.name_or_path={sft_run}",
        "reward=outcome_rm",
        f"reward.path={run}",
        "trainer.steps=1",
        "source.prompts_per_step=2",
        "source.group_size=3",
        f"output_dir={tmp_path / 'g'}",
    )
    out = metrics(train(grpo))
    assert out[0]["reward_std"] > 0  # real-valued scores from the reward model
    from grpo_cli.rewards.registry import build_reward

    moved = build_reward(grpo.reward, torch.device("meta")).modules[0]  # the run's device, not always CPU
    assert {p.device.type for p in moved.parameters()} == {"meta"}


def test_outcome_rm_needs_a_reward_model_directory(sft_run):
    from grpo_cli.errors import UserError
    from grpo_cli.rewards.registry import build_reward

    with pytest.raises(UserError, match="not a reward model"):
        build_reward(compose("grpo_arithmetic", "reward=outcome_rm", f"reward.path={sft_run}").reward)


@pytest.mark.slow
def test_reward_model_and_ppo_runs_resume_exactly(sft_run, tmp_path, length_rewards):
    """The scorer (LM + head) and PPO's value model come back from a checkpoint: same rows as one run."""
    from grpo_cli.trainer.loop import train

    drop = ("seconds", "time_")
    for recipe, extra in [
        (
            "rm_arithmetic",
            ["source.questions=12", "source.samples_per_question=4", "source.heldout=0.25", "trainer.batch_size=2"],
        ),
        ("ppo_arithmetic", ["source.prompts_per_step=4"]),
    ]:
        common = [
            f"model.name_or_path={sft_run}",
            "reward.name=length_mod_3_is_0",
            "trainer.lr=1e-3",
            "trainer.schedule=constant",
            *extra,
        ]
        whole = metrics(train(compose(recipe, *common, "trainer.steps=4", f"output_dir={tmp_path / recipe / 'a'}")))
        part = tmp_path / recipe / "b"
        train(compose(recipe, *common, "trainer.steps=2", "trainer.save_every=2", f"output_dir={part}"))
        resumed = metrics(train(compose(recipe, *common, "trainer.steps=4", "resume=true", f"output_dir={part}")))
        # the shortened run also scored its held-out pairs at its last step (2): compare the rest
        strip = lambda r: {
            k: v for k, v in r.items() if not k.startswith(drop) and not (r["step"] == 2 and k.startswith("heldout_"))
        }  # noqa: E731
        assert [strip(r) for r in resumed] == [strip(r) for r in whole], recipe
        assert any(k.startswith("heldout_") for k in resumed[-1]) or recipe != "rm_arithmetic"


@pytest.mark.slow
def test_process_reward_model_trains_and_drives_process_grpo(sft_run, tmp_path):
    from grpo_cli.models.scorer import load_scorer
    from grpo_cli.trainer.loop import train

    cfg = compose(
        "prm_arithmetic",
        f"model.name_or_path={sft_run}",
        "source.questions=12",
        "source.samples_per_question=3",
        "source.heldout=0.25",
        "trainer.steps=4",
        "trainer.batch_size=6",
        "trainer.lr=3e-3",
        f"output_dir={tmp_path / 'prm'}",
    )
    run = train(cfg)
    rows = metrics(run)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # zero head: p = 0.5 on every step
    assert rows[-1]["loss"] < rows[0]["loss"] and "heldout_step_acc" in rows[-1]
    scorer, _ = load_scorer(str(run), kind="process")
    assert scorer.kind == "process"
    grpo = compose(
        "grpo_process_arithmetic",
        f"model.name_or_path={sft_run}",
        "reward=process_rm",
        f"reward.path={run}",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=3",
        f"output_dir={tmp_path / 'g'}",
    )
    out = metrics(train(grpo))
    assert 0.0 < out[0]["reward_mean"] < 1.0  # mean step probability from the model, not a 0/1 rule
