"""Process supervision: step offsets on sampled tokens, the rule step reward, process advantages
(hand values, arithmetic in the comments) and GRPO with supervision=process through the trainer."""

import json
import math
import random

import pytest
import torch
from conftest import compose

from grpo_cli.algorithms import functional as F
from grpo_cli.batch import Batch, pack
from grpo_cli.errors import UserError
from grpo_cli.models.tiny import build_tokenizer
from grpo_cli.rewards.process import char_ends, rule_process_rewards, rule_step_verdicts, step_ends
from grpo_cli.rewards.steps import split_steps, token_char_offsets

# ----------------------------------------------------------------------------- process_advantages


def test_process_advantages_hand_values_ragged_steps_and_interleaved_groups():
    # Rows 0, 2, 3 are group 0; rows 1, 4 group 1 (interleaved). T = 6 target positions.
    # group 0: row 0 steps end at t=0 (r=2), t=2 (r=2), t=4 (r=1); t=5 is after its last step
    #          row 2 steps end at t=1 (r=0), t=3 (r=0); t=4, 5 are after its last step
    #          row 3 has no step
    #   R = {2, 2, 1, 0, 0}: mean 1, deviations {1, 1, 0, -1, -1}, sample std sqrt(4 / 4) = 1
    #   rtilde: row 0 {1, 1, 0}, row 2 {-1, -1}
    #   A_t = sum of rtilde of the steps ending at or after t:
    #     row 0: t0: 1+1+0 = 2, t1: 1+0 = 1, t2: 1, t3: 0, t4: 0, t5: 0 (after the last step)
    #     row 2: t0: -2, t1: -2, t2: -1, t3: -1, t4: 0, t5: 0
    #     row 3: all 0
    # group 1: every step reward is 5: std 0 -> no signal, all 0 (not NaN)
    r = torch.zeros(5, 6)
    m = torch.zeros(5, 6)
    for row, t, value in [(0, 0, 2), (0, 2, 2), (0, 4, 1), (2, 1, 0), (2, 3, 0), (1, 2, 5), (1, 5, 5), (4, 5, 5)]:
        r[row, t], m[row, t] = value, 1
    group = torch.tensor([0, 1, 0, 0, 1])
    adv = F.process_advantages(r, m, group)
    expected = torch.tensor(
        [
            [2.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [-2.0, -2.0, -1.0, -1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert torch.allclose(adv, expected, atol=1e-6)


def test_process_advantages_scale_and_degenerate_groups():
    # group 0: row 0 one step r=3 at t=2, row 1 one step r=0 at t=0; mean 1.5,
    #   sample std sqrt((1.5^2 + 1.5^2) / 1) = 1.5 * sqrt(2) -> rtilde +-1/sqrt(2) = +-0.7071
    #   scale=False only centres: +-1.5
    # group 1: a single step in the whole group: std undefined -> 0; values off the mask are ignored
    r = torch.tensor([[9.0, 9.0, 3.0], [0.0, 9.0, 9.0], [0.0, 4.0, 0.0], [7.0, 7.0, 7.0]])
    m = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    group = torch.tensor([0, 0, 1, 1])
    a = 1 / math.sqrt(2)
    assert torch.allclose(
        F.process_advantages(r, m, group),
        torch.tensor([[a, a, a], [-a, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        atol=1e-6,
    )
    assert torch.allclose(
        F.process_advantages(r, m, group, scale=False),
        torch.tensor([[1.5, 1.5, 1.5], [-1.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        atol=1e-6,
    )


def _process_advantages_loop(steps, group, T):
    """The paper's formula literally: ``steps[i]`` lists (index(j), r_i^index(j)) of output i."""
    out = []
    for i, own in enumerate(steps):
        R = [r for k, other in enumerate(steps) if group[k] == group[i] for _, r in other]
        mean = sum(R) / len(R) if R else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in R) / (len(R) - 1)) if len(R) > 1 else 0.0
        out.append([0.0 if std < 1e-6 else sum((r - mean) / std for end, r in own if end >= t) for t in range(T)])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(5))
def test_process_advantages_equals_the_loop_reference(seed):
    rng = random.Random(seed)
    B, T = 12, 9
    group = [rng.randrange(4) for _ in range(B)]
    steps = [
        sorted({(t, float(rng.choice([0, 1, 2]))) for t in rng.sample(range(T), rng.randrange(4))}) for _ in range(B)
    ]
    r, m = torch.zeros(B, T), torch.zeros(B, T)
    for i, own in enumerate(steps):
        for t, value in own:
            r[i, t], m[i, t] = value, 1
    adv = F.process_advantages(r, m, torch.tensor(group))
    assert torch.allclose(adv, _process_advantages_loop(steps, group, T), atol=1e-5)


# ----------------------------------------------------------------------------- token offsets


def test_token_char_offsets_fast_path_and_eos():
    tok = build_tokenizer()
    ids = tok("12\n#", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert token_char_offsets(tok, ids, "12\n#") == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 4)]


class _SentencePieceLike:
    """Words with a leading space that a lone token's decode drops, and one character split over two
    byte tokens (7, 8): the pieces do not join into the text, so the exact slow path runs."""

    vocab = {1: " two", 2: "one", 3: ".", 7: b"\xc3", 8: b"\xa9", 0: ""}  # 0 is EOS

    def decode(self, ids, skip_special_tokens=True):
        raw = b"".join(v if isinstance(v, bytes) else v.encode() for v in (self.vocab[i] for i in ids))
        return raw.decode("utf-8", errors="replace").lstrip(" ")

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


def test_token_char_offsets_slow_path_is_exact():
    tok = _SentencePieceLike()
    ids = [2, 1, 7, 8, 3, 0]
    text = tok.decode(ids)
    assert text == "one two\u00e9."
    # "one" 0-3, " two" 3-7, the first byte of e-acute holds no character yet, the second completes
    # it (7-8), "." 8-9, EOS is zero-width
    assert token_char_offsets(tok, ids, text) == [(0, 3), (3, 7), (7, 7), (7, 8), (8, 9), (9, 9)]


# ----------------------------------------------------------------------------- step verdicts and ends


def test_docstring_examples():
    import doctest

    import grpo_cli.rewards.process as process_module

    result = doctest.testmod(process_module)
    assert result.attempted > 0 and result.failed == 0


def test_rule_step_verdicts_checkers_and_last_step_outcome():
    kw = dict(delimiter="\n", checker="auto", last_step_outcome=True)
    # the arithmetic checker (auto: the prompt is a chain); the last step by the final answer
    assert rule_step_verdicts("2+3*4\n", "2+3=5\n5*4=20\n#### 20", "20", **kw) == [True, True, True]
    # stopped early: the checker finds line 1 right, the outcome rule charges the last (only) step
    assert rule_step_verdicts("2+3*4\n", "2+3=5", "20", **kw) == [False]
    assert rule_step_verdicts("2+3*4\n", "2+3=5", "20", **{**kw, "last_step_outcome": False}) == [True]
    # not a chain: auto falls back to the calculator annotations; the last step by the outcome rule
    gsm = "Half: <<48/2=24>>24\nAll: <<48+24=70>>70\n#### 72"
    assert rule_step_verdicts("Natalia sold 48 clips...\n", gsm, "72", **kw) == [True, False, True]
    assert rule_step_verdicts("q\n", gsm, "70", **kw) == [True, False, False]
    # a custom delimiter
    assert rule_step_verdicts(
        "2+3*4\n", "2+3=5; 5*4=20; #### 20", "20", delimiter="; ", checker="arithmetic", last_step_outcome=False
    ) == [True, True, True]
    with pytest.raises(ValueError):
        rule_step_verdicts("What is 2+2?\n", "4", "4", delimiter="\n", checker="arithmetic", last_step_outcome=True)


def test_step_ends_trailing_text_blank_output_and_shared_tokens():
    # "ab\ncd" + EOS at input positions 10..15 (one character per token): the step after the last
    # delimiter ends at its last character's token (14), not at EOS (15)
    offsets = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 5)]
    positions = list(range(10, 16))
    assert step_ends(split_steps("ab\ncd"), [True, False], positions, offsets) == [(11, True), (14, False)]
    # no step at all (EOS alone, or blank text): one incorrect step ending at the last token
    assert step_ends([], [], [20], [(0, 0)]) == [(20, False)]
    assert step_ends(split_steps("\n\n"), [], [5, 6, 7], [(0, 1), (1, 2), (2, 2)]) == [(7, False)]
    # no completion token: no step (its advantages are then 0)
    assert step_ends([], [], [], []) == []
    # one token "b\nc" holds the end of two steps: they are one step, correct only if both are
    assert step_ends(split_steps("ab\nc"), [True, False], [3, 4], [(0, 1), (1, 4)]) == [(4, False)]


def _batch(prompts, completions, answers, group):
    tok = build_tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    comp_ids = [enc(c) + [tok.eos_token_id] for c in completions]
    ids, attn, comp = pack([enc(p) for p in prompts], comp_ids, tok.pad_token_id)
    batch = Batch(ids, attn, comp, prompts, completions, answers, torch.tensor(group))
    batch.tensors["char_ends"] = char_ends(tok, comp_ids, completions, comp)
    return batch


def test_rule_process_rewards_places_step_rewards_on_the_step_end_targets():
    # one token per character. Row 1 is longest (6 + 24 + EOS = 31 = T); row 0 (6 + 20 + EOS = 27)
    # is left-padded by 4, so its completion starts at input position 10, row 1's at 6.
    # row 0 "2+3=5\n5*4=21\n#### 20": steps end at characters 4, 11, 19 -> tokens 14, 21, 29
    #   -> targets 13, 20, 28 (target t scores token t+1); verdicts [True, False, True]
    # row 1 "2+3=5\n5*4=20\n#### 20\n\nxy": steps end at characters 4, 11, 19, 23 -> tokens 10, 17,
    #   25, 29 -> targets 9, 16, 24, 28; "xy" is unparsable (the text after the last delimiter)
    batch = _batch(["2+3*4\n"] * 2, ["2+3=5\n5*4=21\n#### 20", "2+3=5\n5*4=20\n#### 20\n\nxy"], ["20"] * 2, [0, 0])
    summary = rule_process_rewards(
        batch, delimiter="\n", checker="auto", correct=1.0, incorrect=-1.0, last_step_outcome=False
    )
    mask, rewards = batch.tensors["step_mask"], batch.tensors["step_rewards"]
    assert mask.shape == rewards.shape == (2, 30)
    assert mask[0].nonzero().flatten().tolist() == [13, 20, 28]
    assert rewards[0, [13, 20, 28]].tolist() == [1.0, -1.0, 1.0]
    assert mask[1].nonzero().flatten().tolist() == [9, 16, 24, 28]
    assert rewards[1, [9, 16, 24, 28]].tolist() == [1.0, 1.0, 1.0, -1.0]
    assert rewards.sum() == (1 - 1 + 1) + (1 + 1 + 1 - 1) and mask.sum() == 7  # nothing elsewhere
    assert batch.input_ids[1, 29].item() == build_tokenizer().convert_tokens_to_ids("y")
    # the mean step reward per output: (1 - 1 + 1) / 3 and (1 + 1 + 1 - 1) / 4
    assert summary.tolist() == [pytest.approx(1 / 3), pytest.approx(0.5)]
    assert batch.stats["steps_per_output"] == 3.5 and batch.stats["step_accuracy"] == 5 / 7
    assert ((mask == 1) <= (batch.target_mask == 1)).all()  # step ends are completion targets


def test_process_reward_needs_sampled_token_offsets():
    batch = _batch(["2+3\n"], ["2+3=5"], ["5"], [0])
    del batch.tensors["char_ends"]
    with pytest.raises(UserError, match="source=online"):
        rule_process_rewards(batch, delimiter="\n", checker="auto", correct=1.0, incorrect=0.0, last_step_outcome=True)


def test_grpo_process_supervision_needs_step_rewards_and_valid_config():
    from grpo_cli.algorithms.grpo import GRPO
    from grpo_cli.rewards.registry import build_reward

    kw = dict(beta=0.0, eps=0.2, eps_high=None, mu=1, aggregation="sequence", scale_rewards=True)
    batch = _batch(["2+3\n"] * 2, ["2+3=5", "2+3=6"], ["5"] * 2, [0, 0])
    batch.rewards = torch.tensor([1.0, 0.0])
    with pytest.raises(UserError, match="supervision=process needs a process reward"):
        GRPO(supervision="process", **kw).prepare(batch, policy=None)
    with pytest.raises(UserError, match="algorithm.supervision"):
        GRPO(supervision="steps", **kw)
    with pytest.raises(UserError, match="reward.checker"):
        build_reward(compose("grpo_process_arithmetic", "reward.checker=python").reward)
    # with step rewards: each row's advantage is the reverse sum, 0 on the prompt and after the last step
    batch.rewards = build_reward(compose("grpo_process_arithmetic").reward)(batch)
    adv = GRPO(supervision="process", **kw).prepare(batch, policy=None).tensors["advantages"]
    # one step each ("2+3=5" right, "2+3=6" wrong): rtilde +-1/sqrt(2) on every completion target up
    # to the step's last character; the EOS target after it gets 0, and so do the prompt targets
    a = 1 / math.sqrt(2)
    target = batch.target_mask
    assert torch.allclose(adv[:, 3:8], torch.tensor([[a] * 5, [-a] * 5]), atol=1e-6)
    assert (adv[:, 8] == 0).all() and (adv * (1 - target) == 0).all()


# ----------------------------------------------------------------------------- through the trainer


@pytest.mark.slow
def test_grpo_process_supervision_trains_through_the_loop(sft_run, tmp_path, monkeypatch):
    """reward=steps + algorithm.supervision=process: step metrics logged, advantages per token, the
    policy's parameters move."""
    import grpo_cli.trainer.loop as loop
    from grpo_cli.algorithms.grpo import GRPO

    seen = {"adv": []}
    original_prepare, original_policy = GRPO.prepare, loop.build_policy

    def spy_prepare(self, batch, policy):
        out = original_prepare(self, batch, policy)
        seen["adv"].append((out.tensors["advantages"].clone(), out.tensors["step_mask"].clone(), out.target_mask))
        return out

    def spy_policy(*args):
        policy = original_policy(*args)
        seen["policy"], seen["before"] = policy, {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        return policy

    monkeypatch.setattr(GRPO, "prepare", spy_prepare)
    monkeypatch.setattr(loop, "build_policy", spy_policy)
    # The barely trained model gets every arithmetic step wrong (no signal). The calculator checker
    # finds nothing to check in its lines (correct) while the outcome rule charges each last step:
    # step rewards then vary within groups whenever an output has more than one step.
    cfg = compose(
        "grpo_process_arithmetic",
        f"model.name_or_path={sft_run}",
        f"output_dir={tmp_path / 'p'}",
        "reward.checker=calculator",
        "trainer.steps=3",
        "source.prompts_per_step=4",
        "source.group_size=4",
        "trainer.lr=1e-3",
    )
    run = loop.train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for key in ("reward_mean", "step_accuracy", "steps_per_output", "accuracy", "kl", "gc_mean", "loss"):
        assert key in rows[-1], key
    assert all(r["steps_per_output"] >= 1 for r in rows)
    for adv, step_mask, target in seen["adv"]:
        assert (adv * (1 - target) == 0).all()  # nothing on the prompt or padding
        # after each row's last step end the advantage is 0
        last = torch.where(step_mask.any(-1), step_mask.shape[1] - 1 - step_mask.flip(-1).argmax(-1), -1)
        after = torch.arange(adv.shape[1], device=adv.device)[None, :] > last[:, None]
        assert (adv[after] == 0).all()
    assert any(bool(adv.abs().sum() > 0) for adv, _, _ in seen["adv"]), "no step reward varied within a group"
    after = {n: p.detach() for n, p in seen["policy"].model.named_parameters()}
    assert any(not torch.equal(seen["before"][n], after[n]) for n in after), "no parameter changed"
