#!/usr/bin/env python
"""Benchmark selected-token log-probs: naive vs fused (vs Liger-Kernel), forward + backward.

Shapes: N tokens, H hidden size, V vocabulary size. The loss is ``sum(logp * adv)`` with a random
per-token ``adv``, i.e. a per-row upstream gradient as in every policy-gradient loss.

    python scripts/bench_logprob.py                 # N,H,V = 8192,512,32000 and 4096,896,151936
    python scripts/bench_logprob.py --quick         # small shapes, seconds
    python scripts/bench_logprob.py --repeats 5 --heads trainable,frozen
    python scripts/bench_logprob.py --shapes 8192x512x32000 --heads frozen

CPU: fp32, methods naive / fused-torch / liger. CUDA: bf16, plus fused-triton. ``gemm`` is the floor:
the bare LM-head GEMMs any exact method runs (logits h @ W.T, then dh = G @ W and, trainable, dW =
G.T @ h with the logits standing in for G), over 1,024-row slices, no softmax.

At a real model's shape, and the GRPO loss rather than ``sum(logp * adv)``:

    python scripts/bench_logprob.py --shape qwen2.5-0.5b --loss grpo --dtype bfloat16 --heads trainable,frozen
    python scripts/bench_logprob.py --shape qwen2.5-1.5b --tokens 4096 --loss grpo

``--shape`` takes H and V of a Qwen2.5 model (``SHAPES``: 0.5B H=896, 1.5B H=1536, both V=151,936)
with ``--tokens`` N (default 8192). ``--loss grpo``: every method computes GRPO's loss (eq. 3, the
clipped surrogate and the k3 KL at beta 0.04, eps 0.2, each row's mean over its tokens summed over
rows / B: TRL's and Liger's ``loss_type="grpo"``) over rows of ``ROW`` tokens, all of them
completion tokens, with pi_old and pi_ref log-probs near the policy's (computed once, plus noise):
``naive`` and ``fused-*`` through our ``grpo_token_loss`` and ``aggregate``, ``liger`` through
Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (its chunked torch path on a CPU, ``compiled=False``; one
row per chunk as TRL calls it; it takes frozen heads too). Before the table, ``--loss grpo`` checks
that our fused loss and Liger's agree with the naive one, loss for loss and gradient for gradient, at
the first shape's H and V on ``CHECK_TOKENS`` tokens. The naive method holds about four [N, V] fp32
buffers: a case whose estimate is above ``--naive-max-gib`` is skipped and says so.

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

from _bench import QWEN25, QWEN25_COMMON, OthersCPU, machine_line, reset_peak, status_kib  # noqa: E402  (this script's directory)

SHAPES = {name: (cfg["hidden_size"], QWEN25_COMMON["vocab_size"]) for name, cfg in QWEN25.items()}
"""(H, V) of the LM head of real Qwen2.5 models (tied to the embedding in both)."""
ROW = 256
"""Tokens per sequence under ``--loss grpo`` (the issue's 256-token completions); N must be a multiple."""
GRPO = dict(beta=0.04, eps=0.2)
CHECK_TOKENS = 512
TIMED_RUNS = {"cpu": 1, "cuda": 20}
"""Timed runs per process after the measured one: on a GPU one run is milliseconds, so take many."""
FULL_SHAPES = [(8192, 512, 32000), (4096, 896, 151936)]
QUICK_SHAPES = [(1024, 256, 8000), (512, 384, 30000)]


def _make_inputs(n, h, v, dtype, device, train_head, seed=0, loss="logprob", temperature=1.0):
    """(hidden [N, H], weight [V, H], ids [N], adv [N]), and under ``--loss grpo`` a dict ``extra``
    with rows of ``ROW`` tokens: per-row advantages [B], pi_old and pi_ref log-probs [B, ROW]."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).to(device, dtype)
    weight.requires_grad_(train_head)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    adv = torch.randn(n, generator=g).to(device)
    if loss != "grpo":
        return hidden, weight, ids, adv
    from grpo_cli.kernels import selected_logprobs

    rows = n // ROW if n >= ROW else 1
    with torch.no_grad():  # pi_old near the policy: ratios around 1, some clipped, as in training
        logp = selected_logprobs(hidden, weight, ids, temperature=temperature).view(rows, -1)
    old = logp + 0.1 * torch.randn(logp.shape, generator=g).to(device)
    ref = logp + 0.1 * torch.randn(logp.shape, generator=g).to(device)
    extra = dict(adv=torch.randn(rows, generator=g).to(device), old=old, ref=ref)
    return hidden, weight, ids, extra


def grpo_loss(logp, extra):
    """Our GRPO loss of log-probs [B, T] (all completion tokens): ``grpo_token_loss`` (eq. 3 with the k3
    KL) and the paper's ``sequence`` aggregation, as ``algorithm=grpo`` runs them."""
    import torch

    from grpo_cli.algorithms import functional as F

    adv = extra["adv"][:, None].expand_as(logp)
    per_token, _ = F.grpo_token_loss(
        logp, extra["old"], extra["ref"], adv, beta=GRPO["beta"], eps_low=GRPO["eps"], eps_high=GRPO["eps"]
    )
    mask = torch.ones_like(logp)
    B, T = logp.shape
    return F.aggregate(per_token, mask, mode="sequence", total_sequences=B, total_tokens=B * T, max_tokens=T)


def _objective(loss):
    """fn(logp [N], extra) -> the scalar to differentiate: sum(logp * adv), or the GRPO loss."""
    if loss == "grpo":
        return lambda logp, extra: grpo_loss(logp.view(extra["adv"].shape[0], -1), extra)
    return lambda logp, adv: (logp * adv).sum()


def _step_fn(method, temperature, loss="logprob"):
    """fn(hidden, weight, ids, adv_or_extra) running forward + backward of ``--loss``."""
    import torch

    objective = _objective(loss)
    if method == "naive":

        def step(hidden, weight, ids, adv):
            logits = (hidden @ weight.T).float()
            if temperature != 1.0:
                logits = logits / temperature
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(1)
            objective(logp, adv).backward()
    elif method.startswith("fused"):
        from grpo_cli.kernels import selected_logprobs

        backend = method.split("-", 1)[1] if "-" in method else "auto"

        def step(hidden, weight, ids, adv):
            logp = selected_logprobs(hidden, weight, ids, temperature=temperature, backend=backend)
            objective(logp, adv).backward()
    elif method == "gemm":
        return _gemm_floor
    elif method == "liger" and loss == "grpo":
        return _liger_grpo_step(temperature)
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


def _gemm_floor(hidden, weight, ids, adv, rows=1024):
    """The LM head's GEMMs alone, 1,024 rows at a time: logits, dh and (trainable head) dW."""
    import torch

    with torch.no_grad():
        dh = torch.empty_like(hidden)
        dw = torch.zeros_like(weight) if weight.requires_grad else None
        for i in range(0, hidden.shape[0], rows):
            h = hidden[i : i + rows]
            logits = h @ weight.T  # stands in for dL/dlogits: same shape, same GEMMs
            dh[i : i + rows] = logits @ weight
            if dw is not None:
                dw += logits.T @ h
    hidden.grad = dh
    if dw is not None:
        weight.grad = dw


def _liger_grpo_step(temperature):
    """Liger-Kernel's fused linear GRPO loss (its torch path off CUDA), forward + backward."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=GRPO["beta"],
        epsilon_low=GRPO["eps"],
        epsilon_high=GRPO["eps"],
        loss_type="grpo",
        temperature=temperature,
        compiled=False,  # its loss math under torch.compile is GPU-tuned; off a GPU the eager path
    )

    def step(hidden, weight, ids, extra):
        rows = extra["adv"].shape[0]
        loss, _ = loss_fn(
            hidden.view(rows, -1, hidden.shape[-1]),
            weight,
            ids.view(rows, -1),
            extra["old"].new_ones(extra["old"].shape),
            extra["adv"],
            ref_per_token_logps=extra["ref"],
            old_per_token_logps=extra["old"],
        )
        loss.backward()
        return loss

    return step


def compare_grpo(h: int, v: int, n: int = CHECK_TOKENS, methods=("fused-torch", "liger"), dtype="float32") -> dict:
    """GRPO loss and gradients of each method against the naive one on the same inputs (trainable head):
    {method: {"loss": value, "naive": naive's value, "dh": max |dh - dh_naive|, "dw": ...}}, or
    {"error": why} for a method that cannot run here."""
    import torch

    def run(method):
        hidden, weight, ids, extra = _make_inputs(n, h, v, getattr(torch, dtype), "cpu", True, loss="grpo")
        if method == "naive":
            logits = (hidden @ weight.T).float()
            out = grpo_loss(torch.log_softmax(logits, -1).gather(-1, ids[:, None]).view(-1, ROW), extra)
            out.backward()
        elif method == "liger":
            out = _liger_grpo_step(1.0)(hidden, weight, ids, extra)
        else:
            from grpo_cli.kernels import selected_logprobs

            out = grpo_loss(selected_logprobs(hidden, weight, ids, backend=method.split("-")[1]).view(-1, ROW), extra)
            out.backward()
        return float(out.detach()), hidden.grad.float(), weight.grad.float()

    ref = run("naive")
    res = {}
    for m in methods:
        try:
            loss, dh, dw = run(m)
        except Exception as e:  # noqa: BLE001  (not installed, or cannot run here: the row says why)
            res[m] = {"error": f"{type(e).__name__}: {e}"[:160]}
            continue
        res[m] = {
            "loss": loss,
            "naive": ref[0],
            "dh": float((dh - ref[1]).abs().max()),
            "dw": float((dw - ref[2]).abs().max()),
        }
    return res


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
    loss, temperature = cfg.get("loss", "logprob"), cfg["temperature"]
    step = _step_fn(cfg["method"], temperature, loss)
    sync = torch.cuda.synchronize if cfg["device"] == "cuda" else (lambda: None)
    tiny = _make_inputs(2 * ROW if loss == "grpo" else 64, 32, 256, dtype, cfg["device"], cfg["train_head"], 0, loss)
    step(*tiny)  # warm up kernels, thread pools and allocator paths
    del tiny
    inputs = _make_inputs(cfg["n"], cfg["h"], cfg["v"], dtype, cfg["device"], cfg["train_head"], 0, loss, temperature)
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
    (its cross-entropy kernels are Triton-only, so not on CPU), its row says why instead of a number."""
    return ["naive", "fused-torch"] + (["fused-triton"] if device == "cuda" else []) + ["liger", "gemm"]


def naive_gib(n: int, v: int) -> float:
    """The naive method's peak, estimated: about four [N, V] fp32 buffers (logits, log-softmax, and
    two of their gradients; 9.3 GiB measured at 4096x896x151936 against 9.3 estimated)."""
    return 4 * n * v * 4 / 2**30


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


def _fmt_row(shape, head, method, r, ref, floor=None):
    label = "x".join(map(str, shape))
    if "error" in r:
        return f"| {label} | {head} | {method} | n/a | | n/a | | | | {r['error']} |"
    t = statistics.median(r["times"])
    ratio_t = ratio_m = ratio_f = ""
    if ref and "error" not in ref:
        ratio_t = f"{t / statistics.median(ref['times']):.2f}x"
        ratio_m = f"{r['peak_mb'] / ref['peak_mb']:.3f}x" if ref["peak_mb"] > 0 else ""
    if floor and "error" not in floor:
        ratio_f = f"{t / statistics.median(floor['times']):.2f}x"
    return (
        f"| {label} | {head} | {method} | {1000 * t:.1f} | {ratio_t} | {ratio_f} | {r['peak_mb']:.0f} | "
        f"{ratio_m} | {100 * r['others']:.0f}% | "
        f"{len(r['times'])} runs, {1000 * min(r['times']):.1f}-{1000 * max(r['times']):.1f} ms |"
    )


def parse_shapes(args) -> list[tuple[int, int, int]]:
    """(N, H, V) cases: ``--shape`` (a model's H, V at ``--tokens`` N), else ``--shapes``, else the defaults."""
    if args.shape:
        return [(args.tokens, *SHAPES[args.shape])]
    if args.shapes:
        return [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    return QUICK_SHAPES if args.quick else FULL_SHAPES


def print_check(shape, dtype: str) -> None:
    """``--loss grpo``: our fused GRPO loss and Liger's against the naive one, before any timing."""
    _, h, v = shape
    for m, r in compare_grpo(h, v, dtype=dtype).items():
        if "error" in r:
            print(f"check {m} at {CHECK_TOKENS}x{h}x{v}: cannot run ({r['error']})")
        else:
            print(
                f"check {m} at {CHECK_TOKENS}x{h}x{v} {dtype}: GRPO loss {r['loss']:.6f} vs naive {r['naive']:.6f}, "
                f"max |dh - naive| {r['dh']:.2e}, max |dW - naive| {r['dw']:.2e}"
            )


def run_cases(shape, head, methods, args, device, dtype) -> dict:
    """{method: merged runs} for one shape and head, methods alternating over ``--repeats`` rounds."""
    runs = {m: [] for m in methods}
    for rnd in range(args.repeats):
        for m in methods:
            if m == "naive" and naive_gib(shape[0], shape[2]) > args.naive_max_gib:
                gib = naive_gib(shape[0], shape[2])
                runs[m] = [{"error": f"skipped: needs ~{gib:.1f} GiB (> --naive-max-gib {args.naive_max_gib:g})"}]
                continue
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
                loss=args.loss,
            )
            runs[m].append(run_case(cfg))
    return {m: _merge(r) for m, r in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds; each round runs every method once in a fresh process"
    )
    ap.add_argument("--heads", default="trainable", help="comma list of trainable,frozen")
    ap.add_argument("--shapes", help="comma list of NxHxV (default: the two full shapes)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a real model's H and V, at --tokens N (over --shapes)")
    ap.add_argument("--tokens", type=int, default=8192, help="N of --shape")
    ap.add_argument("--loss", choices=("logprob", "grpo"), default="logprob", help="sum(logp * adv), or GRPO's loss")
    ap.add_argument("--methods", help="comma list of naive, fused-torch, fused-triton, liger, gemm (default: all)")
    ap.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="auto: float32 on CPU, bf16 on CUDA"
    )
    ap.add_argument("--naive-max-gib", type=float, default=12.0, help="skip naive where it would need more")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    shapes = parse_shapes(args)
    if args.loss == "grpo" and any(n % ROW for n, _, _ in shapes):
        ap.error(f"--loss grpo: N must be a multiple of {ROW} (rows of {ROW} tokens)")
    print(machine_line(device))
    print(
        f"dtype {dtype}, loss {args.loss}, temperature {args.temperature}, repeats {args.repeats}, "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    if args.loss == "grpo" and device == "cpu":
        print_check(shapes[0], dtype)
    print(
        "\n| N x H x V | LM head | method | fwd+bwd ms (median) | time vs naive | time vs GEMM floor | "
        "peak extra MiB | memory vs naive | others' CPU | timed runs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for head in args.heads.split(","):
            methods = args.methods.split(",") if args.methods else _methods(device)
            # Liger's cross-entropy always produces dW: no like-for-like frozen-head case (its GRPO loss has one).
            methods = [m for m in methods if not (m == "liger" and head == "frozen" and args.loss != "grpo")]
            res = run_cases(shape, head, methods, args, device, dtype)
            for m in methods:
                print(_fmt_row(shape, head, m, res[m], res.get("naive"), res.get("gemm")), flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
