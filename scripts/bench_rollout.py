#!/usr/bin/env python
"""Rollout throughput: our engine vs Hugging Face ``generate``, same model, batch and lengths.

    python scripts/bench_rollout.py                          # B=32 x 128 new tokens, greedy + sampled
    python scripts/bench_rollout.py --quick                  # a 1M-parameter model (hidden 128, 4 layers)
    python scripts/bench_rollout.py --engines hf,fast,reference --repeats 5 --modes greedy
    python scripts/bench_rollout.py --shape qwen2.5-0.5b --batch 8 --new-tokens 64 --precision bf16

``--shape qwen2.5-0.5b|qwen2.5-1.5b``: instead, a randomly initialised Qwen2.5 of the real shape (hidden,
layers, heads, 2 KV heads, MLP, tied embeddings, 151,936-row vocabulary; ``_bench.QWEN25``) with the
real-shaped byte-level BPE tokenizer of tests/real_model.py; ``--layers`` cuts the layers (smoke tests).

The model: a randomly initialised Qwen2 (hidden 512, 8 layers, 8 heads, MLP 1232: 23.6M parameters)
with the tiny model's character tokenizer, built by ``grpo_cli.models.tiny``; prompts are the first B
questions of the arithmetic task (different lengths, so left padding is exercised). EOS is disabled
on every side so each engine generates exactly B x N tokens (checked); greedy outputs are compared
token for token with HF's.

Engines: ``hf`` (``model.generate``), ``hf-static`` (``generate`` with ``cache_implementation="static"``,
which transformers compiles with ``torch.compile``), ``fast`` (our rollout engine: ``grpo_cli.generation``
with ``engine="fast"``; on a GPU each decode step is a CUDA graph replay, on a CPU each decode step is
compiled), ``fast-eager`` (on a GPU, the engine without CUDA graphs), ``fast-sdpa`` (on a CPU, the
engine uncompiled, with SDPA), ``fast-attn`` (on a CPU, each layer's attention compiled instead of
the whole step: the engine before the step was compiled whole), ``reference`` (our simple loop over ``model(...)``
and a DynamicCache, the engine before the rollout engine existed), ``vllm`` (on a GPU with vllm installed:
``rollout.engine=vllm``, an in-process ``vllm.LLM`` in the run's dtype; each run first copies the
weights into it, as every trainer rollout does, and that copy is timed; ``--vllm-kwargs`` go to
``vllm.LLM``). All run in one process after one warm-up run each, alternately in ``--repeats``
rounds so that load from other processes hits them alike; the table shows medians. "first run s" is
the warm-up run: it includes what an engine does once per process (``torch.compile`` of the decode
step, cached on disk across processes). "others' CPU" is the largest share of the machine that other
processes used during any run of that row (/proc/stat minus this process's CPU time): rows taken
while it is well above 0% are not representative.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import QWEN25, OthersCPU, machine_line, qwen25_model  # noqa: E402

BENCH_MODEL = dict(
    hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1232, max_position_embeddings=512, seed=0
)
"""The issue's 23.6M-parameter Qwen2 (``TinyModelConfig`` fields)."""
QUICK_MODEL = dict(
    hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_position_embeddings=512, seed=0
)


def build_bench_model(quick: bool = False):
    """(model in eval mode, tokenizer): the benchmark Qwen2, drawn from a seed."""
    from grpo_cli.config.schema import TinyModelConfig
    from grpo_cli.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    cfg = TinyModelConfig(**(QUICK_MODEL if quick else BENCH_MODEL))
    return build_tiny_model(cfg, len(tok), tok.pad_token_id, tok.eos_token_id).eval(), tok


def bench_prompts(n: int) -> list[str]:
    """The first ``n`` questions of the arithmetic task, as prompts."""
    from grpo_cli.config.schema import DataConfig
    from grpo_cli.data import load_examples

    return [e.prompt for e in load_examples(DataConfig(), "train")[:n]]


def engine_fn(name: str, model, tok, prompt_ids, new_tokens: int, mode: str, precision: str = "fp32"):
    """fn() -> [B, N] new token ids as a list of lists, for one engine, sampling mode and precision."""
    from grpo_cli.models.policy import autocast

    fn = _engine_fn(name, model, tok, prompt_ids, new_tokens, mode)
    device = next(model.parameters()).device

    def run():
        with autocast(precision, device):  # the same context for every engine
            return fn()

    return run


VLLM = {"memory": 0.2, "kwargs": {}}
"""``rollout.vllm_memory`` and ``rollout.vllm_kwargs`` of the ``vllm`` engine (``--vllm-memory``, ``--vllm-kwargs``)."""
FAST_VARIANTS = {
    "fast-eager": ("fast", dict(cuda_graphs=False)),
    "fast-sdpa": ("fast", dict(compile_decode_step=False)),
    "fast-attn": ("fast", dict(whole_step=False)),
}
"""Our engine with one rollout option off (``rollout.cuda_graphs``, ``rollout.compile_decode_step``), or
(``fast-attn``) with the engine's ``whole_step`` off: each layer's attention compiled alone."""


def _engine_fn(name: str, model, tok, prompt_ids, new_tokens: int, mode: str):
    import torch

    from grpo_cli.generation import generate_ids

    temperature = 0.0 if mode == "greedy" else 1.0
    if name in ("hf", "hf-static"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id)  # no EOS: fixed length
        static = dict(cache_implementation="static") if name == "hf-static" else {}  # compiled by generate
        gen_cfg = GenerationConfig(
            max_new_tokens=new_tokens,
            do_sample=mode != "greedy",
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=tok.pad_token_id,
            **static,
        )
        device = next(model.parameters()).device
        batch = tok.pad({"input_ids": prompt_ids}, return_tensors="pt").to(device)  # left-padded

        def run():
            out = model.generate(**batch, generation_config=gen_cfg)
            return out[:, batch["input_ids"].shape[1] :].tolist()

        return run
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)

    engine, options = FAST_VARIANTS.get(name, (name, {}))
    if name == "vllm":
        options = dict(vllm_memory=VLLM["memory"], vllm_kwargs=VLLM["kwargs"])

    def run():
        return generate_ids(
            model,
            prompt_ids,
            pad_id=tok.pad_token_id,
            eos_id=None,
            max_new_tokens=new_tokens,
            temperature=temperature,
            generator=gen,
            engine=engine,
            **options,
        )

    return run


def measure(engines, model, tok, prompt_ids, new_tokens, mode, repeats, precision="fp32"):
    """{engine: {"times": [...], "others": max share, "tokens": generated, "rows": greedy output}}."""
    fns = {e: engine_fn(e, model, tok, prompt_ids, new_tokens, mode, precision) for e in engines}
    res = {e: {"times": [], "others": 0.0} for e in engines}
    for e, fn in fns.items():  # warm-up: thread pools, allocator, lazy imports, compiling
        start = time.perf_counter()
        rows = fn()
        res[e]["first"] = time.perf_counter() - start
        res[e]["rows"], res[e]["tokens"] = rows, sum(len(r) for r in rows)
    for _ in range(repeats):
        for e, fn in fns.items():
            with OthersCPU() as probe:
                fn()
            res[e]["times"].append(probe.seconds)
            res[e]["others"] = max(res[e]["others"], probe.share)
    return res


def print_table(res, mode, batch, new_tokens, ref="hf"):
    base = statistics.median(res[ref]["times"]) if ref in res else None
    for e, r in res.items():
        t = statistics.median(r["times"])
        same = ""
        if mode == "greedy" and ref in res:
            pairs = [(a, b) for ra, rb in zip(r["rows"], res[ref]["rows"]) for a, b in zip(ra, rb)]
            equal = sum(a == b for a, b in pairs) / len(pairs)
            same = "yes" if r["rows"] == res[ref]["rows"] else f"NO ({100 * equal:.0f}% of tokens)"
        ratio = f"{base / t:.2f}x" if base else ""
        print(
            f"| {mode} | {batch}x{new_tokens} | {e} | {r['tokens'] / t:.0f} | {ratio} | {t:.2f} | "
            f"{1000 * t / new_tokens:.1f} | {min(r['times']):.2f}-{max(r['times']):.2f} | {r['first']:.2f} | "
            f"{100 * r['others']:.0f}% | {same} |",
            flush=True,
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; each runs every engine once")
    ap.add_argument(
        "--engines",
        default="hf,fast",
        help="comma list of hf, hf-static (HF's static cache, which generate compiles), fast, "
        "fast-eager (on a GPU: without CUDA graphs), fast-sdpa (on a CPU: uncompiled, SDPA), "
        "fast-attn (on a CPU: each layer's attention compiled, not the whole step), reference, "
        "vllm (on a GPU, with vllm installed)",
    )
    ap.add_argument("--modes", default="greedy,sample", help="comma list of greedy, sample (temperature 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    ap.add_argument("--quick", action="store_true", help="a 1M-parameter model (hidden 128, 4 layers)")
    ap.add_argument("--shape", choices=sorted(QWEN25), help="a random Qwen2.5 of this real shape instead")
    ap.add_argument("--layers", type=int, help="with --shape: this many layers (smoke tests)")
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="bf16: every engine runs under bf16 autocast (trainer.precision=bf16), weights fp32",
    )
    ap.add_argument("--vllm-memory", type=float, default=VLLM["memory"], help="rollout.vllm_memory of the vllm engine")
    ap.add_argument(
        "--vllm-kwargs",
        type=json.loads,
        default={},
        help='JSON keyword arguments of vllm.LLM, e.g. \'{"attention_backend": "TRITON_ATTN"}\'',
    )
    args = ap.parse_args(argv)
    VLLM.update(memory=args.vllm_memory, kwargs=args.vllm_kwargs)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = qwen25_model(args.shape, args.layers) if args.shape else build_bench_model(args.quick)
    if torch.cuda.is_available():
        model = model.to("cuda")  # fp32 weights, as the trainer keeps them; --precision bf16 autocasts
    prompt_ids = tok(bench_prompts(args.batch), add_special_tokens=False)["input_ids"]
    print(machine_line("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"model: {args.shape or 'Qwen2'} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{model.config.num_hidden_layers} layers, vocabulary {model.config.vocab_size}, "
        f"{next(model.parameters()).dtype}; batch {args.batch}, {args.new_tokens} new tokens (EOS off), "
        f"prompts {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens; precision {args.precision}; "
        f"repeats {args.repeats}; "
        f"load average before: {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| mode | B x N | engine | tokens/s | speed vs hf | s (median) | ms/token step | range s | "
        "first run s | others' CPU | same tokens as hf |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    engines = args.engines.split(",")
    for mode in args.modes.split(","):
        res = measure(engines, model, tok, prompt_ids, args.new_tokens, mode, args.repeats, args.precision)
        for e, r in res.items():
            if r["tokens"] != args.batch * args.new_tokens:
                print(f"warning: {e} generated {r['tokens']} tokens, not {args.batch * args.new_tokens}")
        print_table(res, mode, args.batch, args.new_tokens)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
