"""``reward=outcome_rm`` on a transformers sequence-classification reward model with its own tokenizer
(rewards/classifier.py), as public reward models are shipped: built here, nothing downloaded."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, compose, metrics

RM_VOCAB = 1024


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A Qwen2ForSequenceClassification (one label) with a ChatML byte-level BPE tokenizer of 1,024
    tokens: a vocabulary neither the tiny policy's nor the real-shaped model's (2,048)."""
    from real_model import train_tokenizer
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tok = train_tokenizer(vocab=RM_VOCAB)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hub_rm") / "qwen2-rm"
    Qwen2ForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _reward(path):
    from grpo_cli.rewards.registry import build_reward

    return build_reward(compose("grpo_arithmetic", "reward=outcome_rm", f"reward.path={path}").reward)


def _batch(tok, prompts, completions):
    """A left-padded batch whose ids are ``tok``'s ids of each prompt + completion."""
    from grpo_cli.batch import Batch, pack

    ids = [tok(p + c)["input_ids"] for p, c in zip(prompts, completions)]
    input_ids, attn, comp = pack(ids, [[] for _ in ids], tok.pad_token_id)
    n = len(prompts)
    return Batch(input_ids, attn, comp, list(prompts), list(completions), ["0"] * n, torch.arange(n))


PROMPTS = ["What is 3 + 4?\n", "Compute 12 * 2 - 5.\n", "1+1=?\n"]
COMPLETIONS = ["3 + 4 = 7\n#### 7", "12 * 2 = 24\n24 - 5 = 19\n#### 19", "#### 2"]


def test_same_tokenizer_scores_the_ids_as_the_text_would_be(rm_dir):
    """With the policy's vocabulary the model reads the batch's ids; they score as the re-tokenised
    text of the same rows does (here without a chat template, so the text is prompt + completion)."""
    from grpo_cli.models.load import load_tokenizer
    from grpo_cli.rewards.classifier import ClassifierReward

    reward = _reward(rm_dir)
    assert isinstance(reward, ClassifierReward)
    reward.tokenizer.chat_template = None
    policy_tok = load_tokenizer(str(rm_dir))  # another object, the same vocabulary
    batch = _batch(policy_tok, PROMPTS, COMPLETIONS)
    reward.bind(policy_tok)
    assert reward.direct
    direct = reward(batch)
    text = reward.score_rows(reward.text_rows(batch))
    assert direct.shape == (3,) and torch.allclose(direct, text, atol=1e-5)
    assert len(set(direct.tolist())) == 3  # real scores, one per row
    plain = reward.model(**reward.tokenizer(PROMPTS[1] + COMPLETIONS[1], return_tensors="pt")).logits[0, 0]
    assert direct[1] == pytest.approx(float(plain), abs=1e-5)  # padding changes nothing


def test_other_vocabulary_is_retokenised_in_the_reward_models_chat_template(rm_dir, monkeypatch):
    from grpo_cli.models.tiny import build_tokenizer

    reward = _reward(rm_dir)
    policy_tok = build_tokenizer()  # the tiny policy's character tokenizer
    batch = _batch(policy_tok, PROMPTS, COMPLETIONS)
    seen = []
    forward = reward.model.forward
    monkeypatch.setattr(reward.model, "forward", lambda **kw: seen.append(kw) or forward(**kw))
    reward.bind(policy_tok)
    assert not reward.direct
    scores = reward(batch)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    ids, attn = seen[0]["input_ids"], seen[0]["attention_mask"]
    assert int(ids.max()) < RM_VOCAB and attn[:, 0].all()  # its own ids, right-padded
    rendered = reward.tokenizer.decode(ids[1][attn[1].bool()])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{PROMPTS[1]}<|im_end|>\n<|im_start|>assistant\n{COMPLETIONS[1]}<|im_end|>\n"
    )
    batch.prompts = [f"Question: {q}Answer:" for q in PROMPTS]  # a prompt template the policy reads
    batch.questions = list(PROMPTS)  # the questions as written in the data
    seen.clear()
    assert torch.allclose(reward(batch.select([0, 1, 2])), scores)  # the user's turn is the question


def _variant(rm_dir, out, **changes):
    """The reward model's architecture and tokenizer saved to ``out`` with config ``changes``."""
    from transformers import AutoConfig, Qwen2ForSequenceClassification

    config = AutoConfig.from_pretrained(rm_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    Qwen2ForSequenceClassification(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((rm_dir / name).read_bytes())
    return out


def test_a_classifier_with_several_labels_is_refused(tmp_path, rm_dir):
    from grpo_cli.errors import UserError

    with pytest.raises(UserError, match=r"^reward.path: '.*' has 2 labels; an outcome reward model has one"):
        _reward(_variant(rm_dir, tmp_path / "two", num_labels=2))


def test_a_missing_pad_token_id_is_taken_from_its_tokenizer(tmp_path, rm_dir):
    from grpo_cli.models.tiny import build_tokenizer

    reward = _reward(_variant(rm_dir, tmp_path / "nopad", pad_token_id=None))
    assert reward.model.config.pad_token_id == reward.tokenizer.pad_token_id
    reward.bind(build_tokenizer())
    assert reward(_batch(build_tokenizer(), PROMPTS, COMPLETIONS)).shape == (3,)  # batched: needs the pad id


@pytest.mark.slow
def test_grpo_trains_on_a_hub_reward_model_with_another_tokenizer(rm_dir, tmp_path, monkeypatch):
    from grpo_cli.rewards.classifier import ClassifierReward
    from grpo_cli.trainer.loop import train

    seen = []
    text_rows = ClassifierReward.text_rows
    monkeypatch.setattr(ClassifierReward, "text_rows", lambda self, batch: seen.append(batch) or text_rows(self, batch))
    cfg = compose(
        "grpo_arithmetic",
        "model.name_or_path=tiny",
        "reward=outcome_rm",
        f"reward.path={rm_dir}",
        "data.prompt_template='Q: {question} A: '",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=3",
        f"output_dir={tmp_path / 'g'}",
    )
    rows = metrics(train(cfg))
    assert len(rows) == 2 and all("reward_mean" in r for r in rows)
    assert rows[0]["reward_std"] > 0  # the model's real-valued scores
    batch = seen[0]  # re-tokenised text (the tiny policy's characters are not its vocabulary)
    assert batch.prompts == [f"Q: {q} A: " for q in batch.questions]  # its user turn: the data's question


def test_stored_samples_carry_their_question(tmp_path):
    from grpo_cli.data.types import Example
    from grpo_cli.trainer.offline import samples_batch

    examples = [Example("2+2", "Q: 2+2 A: ", "#### 4", "4")]
    rows = [
        {"question": 0, "prompt": "Q: 2+2 A: ", "prompt_ids": [1], "completion_ids": [2], "completion": "4"},
        {"question": 0, "prompt": "other data", "prompt_ids": [1], "completion_ids": [2], "completion": "4"},
    ]
    rows = [{**r, "answer": "4", "reward": 1.0} for r in rows]
    assert samples_batch(rows, torch.arange(2), 0, examples).questions == ["2+2", "other data"]


def test_an_unreachable_hub_name_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_cli.cli",
            "train",
            "recipe=grpo_arithmetic",
            "model.name_or_path=tiny",
            "reward=outcome_rm",
            "reward.path=no-such-org/no-such-reward-model",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: reward.path: cannot load 'no-such-org/no-such-reward-model': ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
