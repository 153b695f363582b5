"""RFT's filter and DPO's pairing of the start model's samples, and both methods through the loop."""

import json

import pytest
import torch

from tests.conftest import compose


def _s(q, ids, reward):
    return {
        "question": q,
        "prompt": f"p{q}",
        "answer": "1",
        "completion": str(ids),
        "prompt_ids": [1],
        "completion_ids": ids,
        "reward": reward,
    }


def test_keep_correct_filters_by_threshold_and_deduplicates_per_question():
    from grpo_cli.trainer.offline import keep_correct

    samples = [_s(0, [5], 1.0), _s(0, [5], 1.0), _s(0, [6], 0.0), _s(1, [5], 1.0), _s(1, [7], 0.4)]
    kept = keep_correct(samples, threshold=0.5)
    # the duplicate output of question 0 goes; the same output for question 1 is a different sample
    assert [(s["question"], s["completion_ids"]) for s in kept] == [(0, [5]), (1, [5])]


def test_make_pairs_one_correct_one_incorrect_of_the_same_question():
    from grpo_cli.trainer.offline import make_pairs

    samples = [
        _s(0, [1], 1.0),
        _s(0, [2], 0.0),
        _s(0, [3], 1.0),
        _s(0, [4], 0.0),
        _s(0, [4], 0.0),
        _s(0, [5], 1.0),
        _s(1, [1], 1.0),
        _s(2, [1], 0.0),
    ]
    pairs = make_pairs(samples, threshold=0.5, per_question=2)
    # question 0: 3 correct, 2 distinct incorrect -> 2 pairs; questions 1 and 2 have one side only
    assert [(a["completion_ids"], b["completion_ids"]) for a, b in pairs] == [([1], [2]), ([3], [4])]


@pytest.mark.slow
def test_rft_samples_once_saves_and_reuses_its_set(sft_run, tmp_path, length_rewards):
    from grpo_cli.trainer.loop import train

    common = [
        f"model.name_or_path={sft_run}",
        "reward.name=length_mod_3_is_0",
        "source.questions=8",
        "source.samples_per_question=4",
        "trainer.steps=2",
        "trainer.batch_size=4",
    ]
    run = train(compose("rft_arithmetic", *common, f"output_dir={tmp_path / 'a'}"))
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 * 4 and {s["reward"] for s in samples} <= {0.0, 1.0}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward_mean"] == 1.0 and rows[0]["gc_mean"] == 1.0  # only correct samples are served
    # a second run reuses the file: same set, no sampling (a model that cannot generate would fail)
    again = train(
        compose("rft_arithmetic", *common, f"source.samples={run / 'samples.jsonl'}", f"output_dir={tmp_path / 'b'}")
    )
    assert not (again / "samples.jsonl").exists()
    assert (
        json.loads((again / "metrics.jsonl").read_text().splitlines()[0])["train_samples"] == rows[0]["train_samples"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_dpo_trains_on_pairs_against_a_fixed_reference(sft_run, tmp_path, length_rewards, lora, monkeypatch):
    from grpo_cli.trainer import loop

    seen = {}
    real = loop.build_policy

    def spy(*a, **k):
        seen["policy"] = real(*a, **k)
        return seen["policy"]

    monkeypatch.setattr(loop, "build_policy", spy)
    cfg = compose(
        "dpo_arithmetic",
        f"model.name_or_path={sft_run}",
        "reward.name=length_mod_3_is_0",
        "source.questions=8",
        "source.samples_per_question=6",
        "trainer.steps=4",
        "trainer.batch_size=2",
        "trainer.grad_accum=2",
        "trainer.lr=1e-2",
        "algorithm.sft_weight=0",
        f"lora.enabled={lora}",
        f"output_dir={tmp_path / 'dpo'}",
    )
    run = loop.train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    # step 1: pi_theta == pi_ref, so every margin is 0, the loss log 2 and GC = +-0.5
    assert first["dpo_margin"] == pytest.approx(0.0, abs=1e-6) and first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert first["gc_mean"] == pytest.approx(0.0, abs=1e-6) and first["gc_std"] == pytest.approx(0.5, abs=1e-6)
    assert last["dpo_margin"] != pytest.approx(0.0, abs=1e-6)
    # the reference still gives the start model's log-probs
    from grpo_cli.config.schema import ModelConfig
    from grpo_cli.models.load import load_model_and_tokenizer

    policy = seen["policy"]
    start, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(sft_run)))
    x = torch.tensor([[3, 4, 5, 6]], device=policy.device)  # the run's device (a GPU when there is one)
    with torch.no_grad(), policy.reference() as ref:
        assert torch.allclose(ref(x).logits, start.to(policy.device)(x).logits, atol=1e-5)


def test_dpo_rejects_a_micro_batch_that_splits_a_pair():
    from grpo_cli.algorithms.dpo import check_pairs
    from grpo_cli.batch import Batch
    from grpo_cli.errors import UserError

    ids = torch.ones(3, 2, dtype=torch.long)
    batch = Batch(ids, ids, ids, ["a"] * 3, ["b"] * 3, ["1"] * 3, torch.tensor([0, 0, 1]))
    with pytest.raises(UserError, match="grad_accum"):
        check_pairs(batch)
