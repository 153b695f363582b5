"""scripts/paradigm_report.py on a hand-made sweep directory: the table's numbers, samples drawn included."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_run(sweep: Path, index: int, method: str, accuracy: float, rounds) -> None:
    run = sweep / f"{index:03d}-method_{method}-seed_{index}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("source:\n  prompts_per_step: 2\n  group_size: 4\n")
    rows = [{"step": i + 1, "zero_std_groups": 0.5} for i in range(len(rounds))]
    for row, r in zip(rows, rounds):
        if r:
            row["sample_rounds"] = r
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = {"index": index, "swept": {"method": method}, "eval": {"accuracy": accuracy, "pass@1": 0.25}, "seconds": 60}
    (run / "done.json").write_text(json.dumps(done))


def test_family_table_counts_the_samples_each_run_drew(tmp_path):
    fake_run(tmp_path, 0, "grpo", 0.4, [None, None, None])
    fake_run(tmp_path, 1, "grpo", 0.5, [None, None, None])
    fake_run(tmp_path, 2, "dapo", 0.6, [2.0, 1.0, 3.0])
    script = str(ROOT / "scripts/paradigm_report.py")
    out = subprocess.run(
        [sys.executable, script, str(tmp_path), "--metrics", "accuracy,pass@1", "--samples"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    # grpo: 3 steps x 2 prompts x 4 outputs = 24; accuracy mean (0.4 + 0.5) / 2 = 0.45, sample std 0.071
    assert lines["grpo"].startswith("| grpo | 2 | 0.450 ± 0.071 | 0.250 ± 0.000 | 24 | 0.500 ± 0.000 | 1.0 |")
    # dapo: (2 + 1 + 3) rounds x 8 outputs = 48
    assert "| 48 |" in lines["dapo"]
