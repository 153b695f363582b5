#!/usr/bin/env python
"""What is alive at the peak of allocated GPU memory during one side of bench_grpo_step.py.

    python scripts/gpu_memory_at_peak.py ours-ckpt            # 4 steps of ours with activation checkpointing
    python scripts/gpu_memory_at_peak.py trl --steps 4        # TRL's GRPOTrainer on the same settings

Records torch's allocator history (``torch.cuda.memory._record_memory_history``) from before the
model is built, replays its alloc/free events to the highest total, and prints the blocks alive
then, grouped by where they were allocated (the innermost frames of grpo_cli, transformers, peft
or trl; blocks from autograd's backward have no Python frame and show an empty place), with each
phase's peak from the trainer's metrics for ours. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_grpo_step import run_in_this_process  # noqa: E402

OWN = ("grpo_cli", "transformers/", "peft/", "trl/", "bench_grpo")


def alive_at_peak(trace: list) -> tuple[int, int, dict]:
    """(peak bytes, index of the event that reached it, {address: alloc event} alive then)."""
    frees = "free_completed" if any(e["action"] == "free_completed" for e in trace) else "free_requested"
    alive, total, peak, at_peak, when = {}, 0, 0, {}, 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            alive[e["addr"]] = e
            total += e["size"]
        elif e["action"] == frees and e["addr"] in alive:
            total -= alive.pop(e["addr"])["size"]
        else:
            continue
        if total > peak:
            peak, at_peak, when = total, dict(alive), i
    return peak, when, at_peak


def place(frames: list, depth: int = 3) -> str:
    own = [f for f in frames if any(k in f["filename"] for k in OWN)] or frames
    return " < ".join(f"{f['filename'].split('site-packages/')[-1]}:{f['line']}:{f['name']}" for f in own[:depth])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("side", help="a bench_grpo_step.py side: ours, ours-ckpt, ours@4, trl, ... (+bf16)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25, help="places to print, largest first")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_memory_at_peak.py: needs a CUDA device", file=sys.stderr)
        return 2
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    res = run_in_this_process(args.side, args.steps)
    trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, when, at_peak = alive_at_peak(trace)
    groups = collections.defaultdict(lambda: [0, 0])
    for e in at_peak.values():
        g = groups[place(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    print(
        f"{args.side}: {peak / 2**20:.1f} MB alive at event {when} of {len(trace)} "
        f"(torch.cuda.max_memory_allocated {torch.cuda.max_memory_allocated() / 2**20:.1f} MB)"
    )
    for where, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{size / 2**20:9.1f} MB {n:5d} blocks  {where}")
    phases = {k: max(st.get(k, 0.0) for st in res["steps"]) for k in res["steps"][0] if k.startswith("gpu_mem_")}
    if phases:
        print("each phase's peak over the steps (MB):", json.dumps({k: round(v, 1) for k, v in phases.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
