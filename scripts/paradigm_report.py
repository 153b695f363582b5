#!/usr/bin/env python
"""Summarise a method sweep (recipes/paradigm_arithmetic.yaml, recipes/family_arithmetic.yaml) as the
tables and plots of docs/results.md.

    python scripts/paradigm_report.py runs/sweeps/paradigm_arithmetic-<hash> [--png docs/results.png]
    python scripts/paradigm_report.py runs/sweeps/family_arithmetic-<hash> --metrics accuracy,pass@1,pass@4 \
        --samples [--png docs/results_family.png]

Reads every finished run's ``done.json`` (its eval.json and last metrics line) and prints, per method,
the mean and standard deviation over seeds of greedy accuracy, maj@K and pass@K (``--metrics``: which),
plus the mean training time; ``--samples`` adds what each online run drew (outputs sampled in all,
counting dynamic sampling's extra rounds, from its metrics.jsonl and config.yaml) and the mean share of
zero-variance groups; ``--png`` draws the metrics as bars.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from grpo_cli.sweep import mean_std

METRICS = ["accuracy", "maj@4", "maj@8", "pass@1", "pass@4", "pass@8"]


def collect(sweep: Path) -> Dict[str, List[dict]]:
    """method -> the done.json of each of its finished runs (in seed order)."""
    by_method: Dict[str, List[dict]] = defaultdict(list)
    for done in sorted(sweep.glob("*/done.json")):
        row = json.loads(done.read_text())
        if row.get("eval"):
            by_method[row["swept"]["method"]].append(row)
    return by_method


def values_of(rows: List[dict], metric: str) -> List[float]:
    """The metric of each run that reported it (a sweep with other eval.ks lacks maj@8/pass@8)."""
    return [r["eval"][metric] for r in rows if metric in r["eval"]]


def fmt(values: List[float]) -> str:
    mean, sd = mean_std(values)
    return "-" if mean is None else f"{mean:.3f} ± {sd:.3f}"


def drawn(run: Path) -> Dict[str, float]:
    """An online run's outputs sampled in all (P x G per round, ``sample_rounds`` rounds a step, 1 without
    dynamic sampling) and its mean ``zero_std_groups`` (before any filtering)."""
    import yaml

    source = yaml.safe_load((run / "config.yaml").read_text())["source"]
    per_round = source["prompts_per_step"] * source["group_size"]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "samples": sum(per_round * r.get("sample_rounds", 1.0) for r in steps),
        "zero_std": statistics.mean(r["zero_std_groups"] for r in steps),
    }


def table(by_method: Dict[str, List[dict]], metrics: List[str] = METRICS, sweep: Optional[Path] = None) -> str:
    """The markdown table; with ``sweep`` (``--samples``) the samples drawn and zero-variance groups too."""
    extra = ["samples drawn", "zero-std groups"] if sweep else []
    lines = [
        "| method | seeds | " + " | ".join(metrics + extra) + " | minutes per run |",
        "| --- | --- | " + " | ".join("---" for _ in metrics + extra) + " | --- |",
    ]
    for method, rows in by_method.items():
        cells = [fmt(values_of(rows, m)) for m in metrics]
        if sweep:
            runs = [drawn(next(sweep.glob(f"{r['index']:03d}-*"))) for r in rows]
            cells += [f"{statistics.mean(d['samples'] for d in runs):.0f}", fmt([d["zero_std"] for d in runs])]
        minutes = statistics.mean(r.get("seconds", 0.0) for r in rows) / 60
        lines.append(f"| {method} | {len(rows)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines)


def plot(
    by_method: Dict[str, List[dict]], out: Path, metrics: List[str] = METRICS, title: str = "paradigm sweep"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(by_method)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        stats = [mean_std(values_of(by_method[m], metric)) for m in methods]
        means, sds = [mu if mu is not None else 0.0 for mu, _ in stats], [sd for _, sd in stats]
        ax.bar([i + j * width for i in range(len(methods))], means, width, yerr=sds, label=metric, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=20)
    ax.set_ylabel("held-out (500 questions)")
    ax.set_title(f"{title}: mean and std over seeds")
    ax.legend(ncol=len(metrics), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, help="the sweep directory")
    ap.add_argument("--png", type=Path, help="write the bar plot here")
    ap.add_argument("--metrics", default=",".join(METRICS), help="eval.json keys to show, comma-separated")
    ap.add_argument("--samples", action="store_true", help="add the outputs each online run sampled")
    ap.add_argument("--title", help="the plot's title (default: the sweep directory's recipe)")
    args = ap.parse_args()
    metrics = args.metrics.split(",")
    by_method = collect(args.sweep)
    if not by_method:
        raise SystemExit(f"error: no finished, evaluated run under {args.sweep}")
    print(table(by_method, metrics, args.sweep if args.samples else None))
    if args.png:
        title = args.title or args.sweep.name.split("-")[0].replace("_arithmetic", "") + " sweep"
        plot(by_method, args.png, metrics, title)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
