"""Sampling metrics: pass@k and maj@k on hand-computed values, and ``grpo eval eval.n=N`` end to end."""

import json
from fractions import Fraction
from math import comb

import pytest

from grpo_cli.cli import main
from grpo_cli.metrics import majority_vote, pass_at_k, sampling_metrics


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 1, 0.25),  # 1 - C(3,1)/C(4,1) = 1 - 3/4: pass@1 is c/n
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
        (5, 0, 3, 0.0),  # no correct sample: C(5,3)/C(5,3) = 1
        (5, 4, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
        (3, 3, 3, 1.0),  # all correct
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(200, 50, 100), (1000, 1, 1), (1000, 7, 64)])
def test_pass_at_k_product_form_equals_exact_binomials(n, c, k):
    # C(1000, 64) is ~1e100: the product form must agree with exact rational arithmetic
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    "answers, expected",
    [
        (["3", "4", "4"], "4"),  # 4 twice, 3 once
        (["5", "4", "4", "5"], "5"),  # tie 2-2: the answer seen first wins
        (["4", "5", "5", "4"], "4"),  # the same tie, other order: still the first seen
        (["72.0", "5", "72"], "72.0"),  # 72.0 and 72 are one answer (2 votes); its first spelling
        (["Yes.", "no", "yes"], "Yes."),  # text: case and a final period ignored
        ([None, None, "3"], "3"),  # no answer does not vote, even when it is most frequent
        ([None, None], None),
        ([], None),
    ],
)
def test_majority_vote(answers, expected):
    assert majority_vote(answers) == expected


def test_sampling_metrics_hand_values():
    answers = [
        ["1", "2", "2", "9"],  # reference 2: c = 2
        ["7", "7", "8", None],
    ]  # reference 8: c = 1
    got = sampling_metrics(answers, ["2", "8"], [1, 3])
    # maj@1: the first samples "1" and "7" are both wrong -> 0
    # maj@3: q1 votes 1,2,2 -> "2" right; q2 votes 7,7,8 -> "7" wrong -> 1/2
    # pass@1: mean of c/n = (2/4 + 1/4) / 2 = 0.375
    # pass@3: q1 n-c = 2 < 3 -> 1; q2 1 - C(3,3)/C(4,3) = 1 - 1/4 = 0.75 -> (1 + 0.75) / 2 = 0.875
    assert got == pytest.approx({"maj@1": 0.0, "maj@3": 0.5, "pass@1": 0.375, "pass@3": 0.875})
    assert list(got) == ["maj@1", "maj@3", "pass@1", "pass@3"]


def test_eval_with_samples_writes_maj_and_pass_at_k(sft_run, tmp_path, capsys):
    out = tmp_path / "e"
    main(
        [
            "eval",
            f"run={sft_run}",
            "eval.limit=6",
            "eval.n=4",
            "eval.ks=[1,2,4]",
            f"eval.output_dir={out}",
            "trainer.threads=1",
        ]
    )
    result = json.loads((out / "eval.json").read_text())
    for key in ("accuracy", "maj@1", "maj@2", "maj@4", "pass@1", "pass@2", "pass@4"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["pass@1"] <= result["pass@2"] <= result["pass@4"]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["sampled"]) == 4 for r in rows)
    # the summary agrees with the per-question rows it came from
    assert result["pass@1"] == pytest.approx(sum(r["sampled_correct"] for r in rows) / 24)
    assert result["n"] == 4 and result["temperature"] == 1.0
    table = capsys.readouterr().out
    assert "maj@4" in table and "pass@4" in table
    # the sampling is seeded: the same command gives the same answers
    main(
        [
            "eval",
            f"run={sft_run}",
            "eval.limit=6",
            "eval.n=4",
            "eval.ks=[1,2,4]",
            f"eval.output_dir={out}",
            "trainer.threads=1",
        ]
    )
    again = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["sampled"] for r in again] == [r["sampled"] for r in rows]


def test_eval_samples_on_a_user_jsonl(sft_run, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "answer": f"#### {a}"}) + "\n"
            for q, a in [("3+4", 7), ("2*5-1", 9), ("8-6+1", 3)]
        )
    )
    out = tmp_path / "e"
    main(
        [
            "eval",
            f"run={sft_run}",
            "data=jsonl",
            f"data.path={data}",
            "eval.n=2",
            "eval.ks=[2]",
            f"eval.output_dir={out}",
        ]
    )
    result = json.loads((out / "eval.json").read_text())
    assert result["total"] == 3 and {"maj@2", "pass@2"} <= set(result) and "pass@1" not in result


@pytest.mark.parametrize(
    "args, expected",
    [
        (["eval.n=2"], "eval.ks: each K must be in 1..eval.n=2, got [1, 4]"),
        (["eval.n=4", "eval.ks=[2,8]"], "eval.ks: each K must be in 1..eval.n=4, got [2, 8]"),
        (["eval.n=4", "eval.ks=[0]"], "config key 'eval.ks': expected integers >= 1, got [0]"),
        (["eval.n=4", "rollout.temperature=0"], "rollout.temperature, which is 0 (greedy)"),
        (["eval.n=-1"], "config key 'eval.n': expected an integer >= 0, got -1"),
    ],
)
def test_eval_sampling_mistakes_are_one_line(sft_run, capsys, args, expected):
    with pytest.raises(SystemExit) as e:
        main(["eval", f"run={sft_run}", *args])
    assert e.value.code == 2 and expected in capsys.readouterr().err
