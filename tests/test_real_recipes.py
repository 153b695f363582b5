"""The real-model recipes (recipes/*_gsm8k.yaml) as they are, for a step on CPU: the real-shaped
fixture (tests/real_model.py) stands in for the hub model and local files for the hub data set;
only sizes are overridden. Nothing is downloaded: the hub path is checked for its offline error."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from grpo_cli.cli import main

ROWS = [
    ("Tom has 3 boxes of 4 pens. How many pens does he have?", "3*4 = <<3*4=12>>12\n#### 12"),
    ("A shop sold 7 cakes and then 5 more. How many cakes were sold?", "7+5 = <<7+5=12>>12\n#### 12"),
    ("Ann had 20 apples and gave away 8. How many are left?", "20-8 = <<20-8=12>>12\n#### 12"),
    ("Each of 6 kids gets 2 cards. How many cards in all?", "6*2 = <<6*2=12>>12\n#### 12"),
]
SMALL = ["logging.progress=false", "logging.plot=false", "rollout.max_new_tokens=12", "trainer.warmup_steps=0"]


@pytest.mark.slow
def test_sft_then_grpo_on_gsm8k_with_the_chat_template(real_model, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    local = [f"data.path={data}", *SMALL]
    main(
        [
            "train",
            "recipe=sft_gsm8k",
            f"model.name_or_path={real_model}",
            "trainer.steps=2",
            "trainer.batch_size=4",
            "trainer.grad_accum=2",
            f"output_dir={tmp_path / 'sft'}",
            *local,
        ]
    )
    main(
        [
            "train",
            "recipe=grpo_gsm8k",
            f"model.name_or_path={tmp_path / 'sft'}",
            "trainer.steps=1",
            "source.prompts_per_step=2",
            "source.group_size=2",
            "trainer.grad_accum=2",
            f"output_dir={tmp_path / 'grpo'}",
            *local,
        ]
    )
    main(["eval", f"run={tmp_path / 'grpo'}", "eval.limit=4"])
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "eval" / "latest" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("<|im_start|>system\n") and rows[0]["prompt"].endswith(
        "<|im_start|>assistant\n"
    )
    config = (tmp_path / "grpo" / "config.yaml").read_text()
    assert "precision: bf16" in config and "enabled: true" in config  # the recipe's own settings ran


def test_the_hub_model_offline_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": ROWS[0][0], "answer": ROWS[0][1]}) + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_cli",
            "train",
            "recipe=sft_gsm8k",
            f"data.path={data}",
            "trainer.steps=1",
            f"output_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model.name_or_path: cannot load 'Qwen/Qwen2.5-0.5B-Instruct'"), lines
    assert not (tmp_path / "run").exists()


MATH_ROWS = [
    ("What is $\\frac{1}{2} + \\frac{1}{4}$?", "Add them: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."),
    ("Compute $\\sqrt{12}$ in simplest form.", "$\\sqrt{12} = \\sqrt{4 \\cdot 3} = \\boxed{2\\sqrt{3}}$."),
    ("Solve $2x + 3 = 7$.", "Then $2x = 4$, so $x = \\boxed{2}$."),
    ("What is $3^2$?", "$3^2 = \\boxed{9}$."),
]


@pytest.mark.slow
def test_grpo_on_math_with_math_verify(real_model, tmp_path):
    data = tmp_path / "math"
    data.mkdir()
    for split in ("train", "test"):
        rows = "".join(json.dumps({"problem": q, "solution": s}) + "\n" for q, s in MATH_ROWS)
        (data / f"{split}.jsonl").write_text(rows)
    main(
        [
            "train",
            "recipe=grpo_math",
            f"model.name_or_path={real_model}",
            f"data.path={data}",
            "trainer.steps=1",
            "source.prompts_per_step=2",
            "source.group_size=2",
            "trainer.grad_accum=2",
            f"output_dir={tmp_path / 'grpo'}",
            *SMALL,
        ]
    )
    main(["eval", f"run={tmp_path / 'grpo'}", "eval.limit=4"])
    result = json.loads((tmp_path / "grpo" / "eval" / "latest" / "eval.json").read_text())
    assert result["data"] == "math" and result["checker"] == "math" and result["total"] == 4
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "eval" / "latest" / "samples.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["\\frac{3}{4}", "2\\sqrt{3}", "2", "9"]  # the references' boxes
    assert "within \\boxed{}" in rows[0]["prompt"] and rows[0]["prompt"].startswith("<|im_start|>")


@pytest.mark.slow
def test_grpo_gsm8k_tool_runs_a_step_with_the_python_tool(real_model, tmp_path):
    """recipe=grpo_gsm8k_tool as it is (LoRA, bf16, the chat template, the python tool), for a step."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    main(
        [
            "train",
            "recipe=grpo_gsm8k_tool",
            f"model.name_or_path={real_model}",
            "trainer.steps=1",
            "source.prompts_per_step=2",
            "source.group_size=2",
            f"output_dir={tmp_path / 'grpo'}",
            f"data.path={data}",
            *SMALL,
        ]
    )
    config = (tmp_path / "grpo" / "config.yaml").read_text()
    assert "- python" in config and "max_turns: 4" in config
    assert (tmp_path / "grpo" / "completions" / "step_000001.jsonl").exists()
