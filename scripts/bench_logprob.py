#!/usr/bin/env python
"""Benchmark selected-token log-probs: naive vs fused (vs Liger-Kernel), forward + backward.

Shapes: N tokens, H hidden size, V vocabulary size. The loss is ``sum(logp * adv)`` with a random
per-token ``adv``, i.e. a per-row upstream gradient as in every policy-gradient loss.

    python scripts/bench_logprob.py                 # N,H,V = 8192,512,32000 and 4096,896,151936
    python scripts/bench_logprob.py --quick         # small shapes, seconds
    python scripts/bench_logprob.py --repeats 5 --heads trainable,frozen
    python scripts/bench_logprob.py --shapes 8192x512x32000 --heads frozen

CPU: fp32, methods naive / fused-torch / liger. CUDA: bf16, plus fused-triton.

Method: every measurement runs in a fresh subprocess. It allocates the inputs, warms the
libraries up on a tiny problem, records a baseline (CPU: resets the kernel's RSS high-water mark
via /proc/self/clear_refs and reads VmRSS; CUDA: ``torch.cuda.memory_allocated``) and runs
forward + backward once: the high-water mark over the baseline (CPU: VmHWM) is the "peak extra"
memory. It includes the gradients, for every method alike. Then forward + backward is timed once more
(on a GPU, 20 more times: one run is milliseconds).
``--repeats`` rounds run the methods alternately (naive, fused, ...) so that load from other
processes on a shared machine hits them alike; the table shows medians over rounds, and the load
average before and after. "others' CPU" is the largest share of the machine that other processes
used during any run of that row (from /proc/stat minus this benchmark's own CPU time): numbers
taken while it is well above 0% are not representative.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _bench import OthersCPU, machine_line, reset_peak, status_kib  # noqa: E402  (this script's directory)

TIMED_RUNS = {"cpu": 1, "cuda": 20}
"""Timed runs per process after the measured one: on a GPU one run is milliseconds, so take many."""
FULL_SHAPES = [(8192, 512, 32000), (4096, 896, 151936)]
QUICK_SHAPES = [(1024, 256, 8000), (512, 384, 30000)]


def _make_inputs(n, h, v, dtype, device, train_head, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).to(device, dtype)
    weight.requires_grad_(train_head)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    adv = torch.randn(n, generator=g).to(device)
    return hidden, weight, ids, adv


def _step_fn(method, temperature):
    """fn(hidden, weight, ids, adv) running forward + backward of sum(logp * adv)."""
    import torch

    if method == "naive":

        def step(hidden, weight, ids, adv):
            logits = (hidden @ weight.T).float()
            if temperature != 1.0:
                logits = logits / temperature
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(1)
            (logp * adv).sum().backward()
    elif method.startswith("fused"):
        from grpo_cli.kernels import selected_logprobs

        backend = method.split("-", 1)[1] if "-" in method else "auto"

        def step(hidden, weight, ids, adv):
            logp = selected_logprobs(hidden, weight, ids, temperature=temperature, backend=backend)
            (logp * adv).sum().backward()
    elif method == "liger":
        # Liger computes a scalar cross-entropy (sum of -logp): same GEMMs, no per-row adv.
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def step(hidden, weight, ids, adv):
            x = hidden / temperature if temperature != 1.0 else hidden
            loss_fn(weight, x, ids).backward()
    else:
        raise ValueError(method)
    return step


def _peak_probe(device):
    """(baseline(), peak_since_baseline_mib(base)) for the device.

    CPU: writing 5 to /proc/self/clear_refs resets the kernel's RSS high-water mark (VmHWM) to
    the current RSS, so the peak is VmHWM - VmRSS(at reset) even when earlier work (building the
    inputs) left a higher mark. Without clear_refs, falls back to the ru_maxrss delta, which can
    under-report a peak that stays below an earlier high-water mark.
    """
    import torch

    if device == "cuda":

        def baseline():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def peak(base):
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20

        return baseline, peak

    def baseline():
        gc.collect()
        rss = status_kib("VmRSS")
        if rss is not None and reset_peak():
            return ("VmHWM", rss)
        return ("ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def peak(base):
        kind, kib = base
        now = status_kib("VmHWM") if kind == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (now - kib) / 1024

    return baseline, peak


def run_child(cfg: dict) -> dict:
    """One case in this (fresh) process: peak extra memory of the first run, then timings."""
    import torch

    dtype = getattr(torch, cfg["dtype"])
    step = _step_fn(cfg["method"], cfg["temperature"])
    sync = torch.cuda.synchronize if cfg["device"] == "cuda" else (lambda: None)
    tiny = _make_inputs(64, 32, 256, dtype, cfg["device"], cfg["train_head"])
    step(*tiny)  # warm up kernels, thread pools and allocator paths
    del tiny
    inputs = _make_inputs(cfg["n"], cfg["h"], cfg["v"], dtype, cfg["device"], cfg["train_head"])
    baseline, peak = _peak_probe(cfg["device"])
    base = baseline()
    t0 = time.perf_counter()
    step(*inputs)
    sync()
    first = time.perf_counter() - t0
    peak_mb = peak(base)
    times = []
    for _ in range(TIMED_RUNS[cfg["device"]]):
        for t in inputs[:2]:
            t.grad = None
        t0 = time.perf_counter()
        step(*inputs)
        sync()
        times.append(time.perf_counter() - t0)
    return {"peak_mb": peak_mb, "first_s": first, "times": times}


def run_case(cfg: dict) -> dict:
    """Run one measurement in a fresh process; also report how busy *other* processes were."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    with OthersCPU(children=True) as probe:  # the child's CPU is the measurement's, not others'
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        return {"error": last[:160]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["others"] = probe.share
    return out


def _methods(device: str) -> list[str]:
    """Methods to compare. Liger is always tried: when it is not installed, or cannot run here
    (its kernels are Triton-only, so not on CPU), its row says why instead of a number."""
    return ["naive", "fused-torch"] + (["fused-triton"] if device == "cuda" else []) + ["liger"]


def _merge(runs: list[dict]) -> dict:
    """Rounds of one case -> median peak, all timed runs; the first error if any round failed."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    return {
        "peak_mb": statistics.median(r["peak_mb"] for r in runs),
        "times": [t for r in runs for t in r["times"]],
        "others": max((r.get("others", 0.0) for r in runs), default=0.0),
    }


def _fmt_row(shape, head, method, r, ref):
    label = "x".join(map(str, shape))
    if "error" in r:
        return f"| {label} | {head} | {method} | n/a | | n/a | | | {r['error']} |"
    t = statistics.median(r["times"])
    ratio_t = ratio_m = ""
    if ref and "error" not in ref:
        ratio_t = f"{t / statistics.median(ref['times']):.2f}x"
        ratio_m = f"{r['peak_mb'] / ref['peak_mb']:.3f}x"
    return (
        f"| {label} | {head} | {method} | {1000 * t:.1f} | {ratio_t} | {r['peak_mb']:.0f} | "
        f"{ratio_m} | {100 * r['others']:.0f}% | "
        f"{len(r['times'])} runs, {1000 * min(r['times']):.1f}-{1000 * max(r['times']):.1f} ms |"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds; each round runs every method once in a fresh process"
    )
    ap.add_argument("--heads", default="trainable", help="comma list of trainable,frozen")
    ap.add_argument("--shapes", help="comma list of NxHxV (default: the two full shapes)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device == "cuda" else "float32"
    print(machine_line(device))
    print(
        f"dtype {dtype}, temperature {args.temperature}, repeats {args.repeats}, "
        f"load average before: {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| N x H x V | LM head | method | fwd+bwd ms (median) | time vs naive | "
        "peak extra MiB | memory vs naive | others' CPU | timed runs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    for shape in shapes:
        for head in args.heads.split(","):
            # Liger's loss always produces dW: no like-for-like frozen-head case.
            methods = [m for m in _methods(device) if not (m == "liger" and head == "frozen")]
            runs = {m: [] for m in methods}
            for rnd in range(args.repeats):
                for m in methods:
                    if rnd and runs[m] and "error" in runs[m][-1]:
                        continue  # a method that cannot run here will not start to
                    cfg = dict(
                        method=m,
                        n=shape[0],
                        h=shape[1],
                        v=shape[2],
                        dtype=dtype,
                        device=device,
                        train_head=head == "trainable",
                        temperature=args.temperature,
                    )
                    runs[m].append(run_case(cfg))
            ref = _merge(runs["naive"])
            for m in methods:
                print(_fmt_row(shape, head, m, _merge(runs[m]), ref), flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
