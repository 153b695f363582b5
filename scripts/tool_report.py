#!/usr/bin/env python
"""Summarise scripts/tool_results.sh: held-out greedy accuracy after SFT and after GRPO, with and without
the python tool, mean and standard deviation over seeds, and how often the evaluated completions
called the tool.

    python scripts/tool_report.py runs/tool_results
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from grpo_cli.sweep import mean_std


def called_tool(eval_dir: Path) -> float:
    """Share of the evaluation's completions with at least one tool call (``turns`` > 1)."""
    rows = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    return sum(r.get("turns", 1) > 1 for r in rows) / max(1, len(rows))


def collect(out: Path) -> Dict[str, List[dict]]:
    """variant -> per seed: SFT and GRPO accuracy, tool-call shares, GRPO training minutes."""
    runs: Dict[str, List[dict]] = defaultdict(list)
    for chain in sorted(p for p in out.iterdir() if p.is_dir() and "-seed" in p.name):
        evals = {phase: chain / phase / "eval" / "latest" for phase in ("sft", "grpo")}
        if not all((e / "eval.json").exists() for e in evals.values()):
            continue
        acc = {phase: json.loads((e / "eval.json").read_text())["accuracy"] for phase, e in evals.items()}
        metrics = [json.loads(line) for line in (chain / "grpo" / "metrics.jsonl").read_text().splitlines() if line]
        runs[chain.name.split("-seed")[0]].append(
            {
                "sft": acc["sft"],
                "grpo": acc["grpo"],
                "lift": acc["grpo"] - acc["sft"],
                "sft_calls": called_tool(evals["sft"]),
                "grpo_calls": called_tool(evals["grpo"]),
                "minutes": metrics[-1]["seconds"] / 60,
            }
        )
    return runs


def fmt(values: List[float]) -> str:
    mean, sd = mean_std(values)
    return "-" if mean is None else f"{mean:.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the directory scripts/tool_results.sh wrote")
    runs = collect(ap.parse_args().out)
    if not runs:
        raise SystemExit("error: no finished chain (SFT, GRPO and both evaluations) found")
    keys = ["sft", "grpo", "lift", "sft_calls", "grpo_calls", "minutes"]
    heads = ["SFT accuracy", "GRPO accuracy", "lift", "SFT: calls the tool", "GRPO: calls the tool", "GRPO minutes"]
    print("| variant | seeds | " + " | ".join(heads) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in heads) + " |")
    for variant, rows in sorted(runs.items(), reverse=True):
        print(f"| {variant} | {len(rows)} | " + " | ".join(fmt([r[k] for r in rows]) for k in keys) + " |")


if __name__ == "__main__":
    main()
