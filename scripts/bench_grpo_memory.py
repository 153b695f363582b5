#!/usr/bin/env python
"""Peak memory and time of one GRPO update (reference log-probs + loss + backward), naive vs fused.

The update is the trainer's own code path (GRPO.prepare and GRPO.loss on a Policy); only
``model.logprob_backend`` differs. Each measurement runs in a fresh subprocess and reports the
growth of its peak RSS over the RSS after the model and batch are built, so the two backends are
compared side by side on the same machine in one run.

    python scripts/bench_grpo_memory.py                  # V=32000 and V=151936, H=512, 4 layers
    python scripts/bench_grpo_memory.py --quick          # small shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _bench import random_batch, random_qwen2, reset_peak, status_mb  # this script's directory


def one(backend: str, vocab: int, hidden: int, layers: int, batch: int, tokens: int) -> dict:

    from grpo_cli.algorithms.grpo import GRPO
    from grpo_cli.models.policy import Policy

    model = random_qwen2(vocab, hidden, layers, tokens)
    policy = Policy.create(model, tokenizer=None, keep_reference=True, logprob_backend=backend)
    b = random_batch(vocab, batch, tokens, group=8)
    algo = GRPO(beta=0.04, eps=0.2, eps_high=None, mu=1, aggregation="sequence", scale_rewards=True)
    base = status_mb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    b = algo.prepare(b, policy)
    loss, _ = algo.loss(b, policy)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {
        "backend": backend,
        "vocab": vocab,
        "seconds": seconds,
        "peak_mb": status_mb("VmHWM") - base,
        "loss": float(loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(**json.loads(args.child))))
        return
    shape = (
        dict(hidden=128, layers=2, batch=8, tokens=64)
        if args.quick
        else dict(hidden=512, layers=4, batch=32, tokens=160)
    )
    vocabs = [4096] if args.quick else [32000, 151936]
    rows = []
    for vocab in vocabs:
        for backend in ("naive", "fused"):
            spec = json.dumps(dict(backend=backend, vocab=vocab, **shape))
            out = subprocess.run(
                [sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"GRPO update (ref log-probs + loss + backward), B={shape['batch']} T={shape['tokens']} "
        f"H={shape['hidden']} layers={shape['layers']}, fp32, {__import__('os').cpu_count()} CPU cores"
    )
    print(f"{'V':>7} {'backend':>8} {'time s':>8} {'peak +MB':>9} {'time x':>7} {'mem x':>7} {'loss':>10}")
    for r in rows:
        naive = next(x for x in rows if x["vocab"] == r["vocab"] and x["backend"] == "naive")
        print(
            f"{r['vocab']:>7} {r['backend']:>8} {r['seconds']:>8.2f} {r['peak_mb']:>9.0f} "
            f"{r['seconds'] / naive['seconds']:>7.2f} {r['peak_mb'] / max(naive['peak_mb'], 1e-9):>7.2f} "
            f"{r['loss']:>10.6f}"
        )


if __name__ == "__main__":
    main()
