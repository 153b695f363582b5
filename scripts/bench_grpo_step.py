#!/usr/bin/env python
"""One GRPO step, ours vs TRL's GRPOTrainer: time per phase, tokens/s and peak RSS, side by side.

    python scripts/bench_grpo_step.py                      # ours, ours@4, ours-refloop, trl; 4 steps each
    python scripts/bench_grpo_step.py --sides ours+bf16,ours@4+bf16,trl+bf16   # bf16 autocast, TRL's default
    python scripts/bench_grpo_step.py --sides ours,trl --steps 5 --threads 1
    python scripts/bench_grpo_step.py --quick              # a 1M-parameter model (hidden 128, 4 layers)
    python scripts/bench_grpo_step.py --fixed-length       # every completion exactly 128 tokens (EOS never drawn)
    python scripts/bench_grpo_step.py --shape qwen2.5-0.5b --lora --sides ours+bf16,trl+bf16 --fixed-length

``--shape qwen2.5-0.5b|qwen2.5-1.5b``: a randomly initialised Qwen2.5 of the real shape (``_bench.QWEN25``)
with the real-shaped BPE tokenizer of tests/real_model.py (prompts as plain text on both sides,
``data.chat_template=false``), 8 prompts x G=8 x 256 new tokens unless ``--prompts``, ``--group``,
``--new-tokens`` say otherwise; ``--lora``: LoRA r=16, alpha 32 on every linear layer of the blocks
(ours ``lora.enabled=true``, TRL a peft ``LoraConfig``), else full fine-tuning. ``--layers`` cuts the
layers (smoke tests).

Model and settings, the same on every side: the 23.6M-parameter Qwen2 of bench_rollout.py (hidden
512, 8 layers, character vocabulary, seed 0, fp32, full fine-tuning), the arithmetic task, 4 prompts
x G=8 completions of at most 128 new tokens at temperature 1 (top-p 1, no top-k), the outcome reward
(1 for the right final answer, else 0), GRPO with beta=0.04 (k3 KL to a frozen reference), eps=0.2,
one update per batch (mu=1), the paper's sequence-mean loss (TRL ``loss_type="grpo"``), AdamW at a
constant lr of 5e-5, gradient clipping at 1.0.

Sides, each in a fresh subprocess (peak RSS is the child's own ``ru_maxrss`` at its end: the
whole process, model, data and libraries included; on a GPU the memory compared is instead the
child's ``torch.cuda.max_memory_allocated``, and every side runs there):

* ``ours``: ``grpo train`` itself, ``train(cfg)`` on the ``grpo_arithmetic`` recipe with the overrides
  above; phases are the trainer's own timers (``time_generate``, ``time_reward``, ``time_logprob``:
  reference log-probs and advantages, ``time_train``: loss, backward, optimiser) from metrics.jsonl,
  the step time is the growth of its ``seconds`` column. ``ours@4``: with ``trainer.grad_accum=4``
  (the same update from 4 micro-batches of 8 sequences: a quarter of the activations). ``ours:2048``:
  with ``trainer.max_tokens_per_microbatch=2048`` (micro-batches of at most 2,048 tokens; ``:0`` off);
  without ``:``, the config's default.
* ``ours-ckpt``: ``ours`` with ``trainer.activation_checkpointing=true`` (each block recomputed in
  backward, as TRL's default gradient checkpointing does).
* ``ours-refloop``: ``ours`` with the rollout engine replaced by the reference loop (HF forward and
  DynamicCache per token, every row to the end): what the rollout engine adds to the step.
* ``ours-noshare``: ``ours`` with every row's tokens computed for itself in the log-prob and training
  forwards (``model.share_prefixes=false``): what running a group's common prompt once saves.
* ``ours-vllm`` (on a GPU with vllm installed): ``ours`` with ``rollout.engine=vllm`` (``--vllm-memory``,
  ``--vllm-kwargs``); its generate phase includes copying the weights into vLLM, and its first step
  building the engine. Its peak GPU memory includes the KV cache vLLM reserves (``--vllm-memory`` of
  the GPU, less its weights and activations).
* ``trl``: ``trl.GRPOTrainer`` (when installed: ``pip install -e .[bench]``) on CPU with its defaults
  except those settings and fp32 (its default is bf16 autocast); its default gradient (activation)
  checkpointing stays on. ``trl-nockpt``: with it off. The step is timed by a callback; generation,
  rewards and the no-grad log-probs by wrapping its methods (``_generate``, ``_calculate_rewards``,
  ``_get_per_token_logps_and_entropies`` without grad); "train" is the rest of the step.
* ``+bf16`` after any side: bf16 autocast with fp32 weights (ours ``trainer.precision=bf16``, TRL
  ``bf16=True``, its default); each ``+bf16`` side is compared with ``trl+bf16``.

The first ``--warmup`` steps of each side (default 1) are not counted; the table shows medians over
the timed steps. On a GPU give more (3): Triton compiles its kernels for each new combination of
dtypes and flags it meets, in the first steps. Completions end at EOS, so the tokens generated
differ between sides: tokens/s counts the completion tokens each side actually produced, and both
generate for as long as any of the 32 rows is unfinished (with this random model, almost always all
128 steps; ours drops finished rows).
The sides' step times then differ with the lengths they happen to sample (±20% between steps).
``--fixed-length`` gives both the same work: EOS is never drawn (its probability is set to 0 before
each draw: TRL ``generation_kwargs={"min_new_tokens": 128}``, ours the same mask around its sampling
rule), so every completion is 128 tokens on every side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import QWEN25, OthersCPU, machine_line, qwen25_model  # noqa: E402
from bench_rollout import BENCH_MODEL, QUICK_MODEL, VLLM, build_bench_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(
    prompts=4, group=8, new_tokens=128, beta=0.04, eps=0.2, lr=5e-5, seed=0, fixed_length=False, shape=None, lora=False
)
SHAPE_WORK = dict(prompts=8, group=8, new_tokens=256)
"""The issue's work at a real shape: 8 prompts x G=8, 256-token completions."""
LORA_R = 16
PHASES = ("generate", "reward", "logprob", "train")
MEMORY, MEMORY_NAME = "peak_rss_mb", "peak RSS"
"""The memory compared: the process's peak RSS on CPU; on a GPU, torch's peak allocated device memory."""


def run_ours(
    steps: int,
    quick: bool,
    engine: str,
    threads: int,
    grad_accum: int,
    bf16: bool,
    ckpt: bool,
    share: bool = True,
    max_tokens: int | None = None,
) -> dict:
    """``train(cfg)`` for ``steps`` steps; per-step phase times from its metrics.jsonl."""
    from grpo_cli.config.compose import compose_run
    from grpo_cli.trainer.loop import train

    if SETTINGS["fixed_length"]:
        never_eos()
    engine_overrides = [f"rollout.engine={engine}"]  # ours-refloop: the reference loop; ours-vllm: vLLM
    if engine == "vllm":
        engine_overrides += [
            f"rollout.vllm_memory={VLLM['memory']}",
            *[f"+rollout.vllm_kwargs.{k}={json.dumps(v)}" for k, v in VLLM["kwargs"].items()],
        ]
    s = SETTINGS
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_run(
            "grpo_arithmetic",
            [
                *model_overrides(quick, out),
                f"source.prompts_per_step={s['prompts']}",
                f"source.group_size={s['group']}",
                f"rollout.max_new_tokens={s['new_tokens']}",
                "rollout.temperature=1.0",
                "rollout.top_p=1.0",
                f"algorithm.beta={s['beta']}",
                f"algorithm.eps={s['eps']}",
                "algorithm.mu=1",
                "algorithm.aggregation=sequence",
                f"trainer.lr={s['lr']}",
                "trainer.schedule=constant",
                "trainer.warmup_steps=0",
                "trainer.max_grad_norm=1.0",
                f"trainer.seed={s['seed']}",
                f"trainer.grad_accum={grad_accum}",
                *([f"trainer.max_tokens_per_microbatch={max_tokens}"] if max_tokens is not None else []),
                f"trainer.steps={steps}",
                f"trainer.threads={threads}",
                f"trainer.precision={'bf16' if bf16 else 'fp32'}",
                f"trainer.activation_checkpointing={ckpt}",
                f"model.share_prefixes={share}",
                "logging.progress=false",
                "logging.plot=false",
                f"output_dir={out}/run",
                *engine_overrides,
            ],
        )
        run = train(cfg)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows]
    out = []
    for i, r in enumerate(rows):
        step = {p: r[f"time_{p}"] for p in PHASES}
        step["step"] = seconds[i] - (seconds[i - 1] if i else 0.0)
        step["completion_tokens"] = r["completion_length"] * s["prompts"] * s["group"]
        step.update({k: v for k, v in r.items() if k.startswith("gpu_mem_")})  # on a GPU: each phase's peak
        out.append(step)
    return {"steps": out}


def model_overrides(quick: bool, out: str) -> list[str]:
    """Ours: the tiny bench model's settings, or (``--shape``) the real-shaped model saved under ``out``."""
    if not SETTINGS["shape"]:
        return [
            "model.name_or_path=tiny",
            *[f"model.tiny.{k}={v}" for k, v in (QUICK_MODEL if quick else BENCH_MODEL).items()],
        ]
    model, tok = bench_model(quick)
    model.save_pretrained(f"{out}/model")
    tok.save_pretrained(f"{out}/model")
    del model
    lora = [f"lora.enabled={SETTINGS['lora']}", f"lora.r={LORA_R}", f"lora.alpha={2 * LORA_R}"]
    return [f"model.name_or_path={out}/model", "data.chat_template=false", *lora]


def bench_model(quick: bool):
    """(model, tokenizer) of every side: the real shape under ``--shape``, else the 23.6M bench model."""
    if SETTINGS["shape"]:
        return qwen25_model(SETTINGS["shape"], SETTINGS.get("layers"))
    return build_bench_model(quick)


def never_eos() -> None:
    """``--fixed-length`` for ours: EOS's logit set to -inf before every draw of either engine (what
    HF's ``min_new_tokens`` does), so every completion runs to ``new_tokens``."""
    import torch

    import grpo_cli.generation as generation
    from grpo_cli.models.tiny import build_tokenizer

    eos_id = bench_model_eos() if SETTINGS["shape"] else build_tokenizer().eos_token_id
    eos, draw = torch.tensor([eos_id]), generation.sample_next

    def sample_next(logits, *args):
        return draw(logits.index_fill(-1, eos.to(logits.device), float("-inf")), *args)

    generation.sample_next = sample_next


def bench_model_eos() -> int:
    """EOS of the real-shaped tokenizer (``<|im_end|>``, as Qwen2.5-Instruct's)."""
    from tests.real_model import train_tokenizer

    return train_tokenizer().eos_token_id


def run_trl(steps: int, quick: bool, threads: int, checkpointing: bool, bf16: bool) -> dict:
    """TRL's GRPOTrainer on the same model, data, reward and settings."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_cli.config.schema import DataConfig
    from grpo_cli.data import load_examples
    from grpo_cli.rewards.answer import outcome_rewards
    from grpo_cli.trainer.loop import sync_cuda  # so that a phase's timer holds its own kernels, as ours

    s = SETTINGS
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(s["seed"])
    model, tok = bench_model(quick)
    examples = load_examples(DataConfig(), "train")
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in examples])

    def outcome(completions, answer, **_):
        return outcome_rewards(completions, answer)

    timings: list[dict] = []
    current: dict = {}

    def timed(name, fn, only_no_grad=False):
        def wrapper(*a, **k):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **k)
            sync_cuda()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync_cuda()
                current[name] = current.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync_cuda()
            current.clear()
            current["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync_cuda()
            step = {p: current.get(p, 0.0) for p in PHASES[:3]}
            step["step"] = time.perf_counter() - current["t0"]
            step["train"] = step["step"] - sum(step[p] for p in PHASES[:3])
            timings.append(step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and timings:
                timings[-1]["completion_tokens"] = logs["completions/mean_length"] * s["prompts"] * s["group"]

    with tempfile.TemporaryDirectory() as out:
        # TRL loads its reference model (beta > 0) from the policy's path: give it one.
        model.save_pretrained(f"{out}/model")
        tok.save_pretrained(f"{out}/model")
        del model
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=s["prompts"] * s["group"],
            num_generations=s["group"],
            max_completion_length=s["new_tokens"],
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=s["beta"],
            epsilon=s["eps"],
            num_iterations=1,
            loss_type="grpo",
            scale_rewards="group",
            learning_rate=s["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            adam_beta1=0.9,
            adam_beta2=0.95,
            weight_decay=0.0,
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            bf16=bf16,
            gradient_checkpointing=checkpointing,
            seed=s["seed"],
            disable_tqdm=True,
            dataloader_num_workers=0,
            generation_kwargs={"min_new_tokens": s["new_tokens"]} if s["fixed_length"] else None,
        )
        trainer = GRPOTrainer(
            model=f"{out}/model",
            reward_funcs=outcome,
            args=args,
            train_dataset=data,
            processing_class=tok,
            callbacks=[StepTimer()],
            peft_config=trl_lora() if s["lora"] else None,
        )
        trainer._generate = timed("generate", trainer._generate)
        trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
        trainer._get_per_token_logps_and_entropies = timed(
            "logprob", trainer._get_per_token_logps_and_entropies, only_no_grad=True
        )
        trainer.train()
    return {"steps": timings, "trl": __import__("trl").__version__}


SIDE = re.compile(r"^(?P<name>[a-z-]+)(@(?P<accum>\d+))?(:(?P<tokens>\d+))?(\+(?P<precision>bf16))?$")
"""``--sides`` syntax: ours[-ckpt|-refloop|-noshare|-vllm][@ACCUM][:TOKENS][+bf16], trl[-nockpt][+bf16]."""


def trl_lora():
    """peft's LoraConfig of ours: r=16, alpha 32, no dropout, every linear layer of the blocks."""
    from peft import LoraConfig

    from grpo_cli.config.schema import LoraConfig as Ours

    return LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules=list(Ours().target_modules))


def run_in_this_process(side: str, steps: int, quick: bool = False, threads: int = 0) -> dict:
    """One side (:data:`SIDE`) here."""
    m = SIDE.match(side)
    if m is None:
        raise ValueError(f"side {side!r}: expected {SIDE.pattern}")
    name, bf16 = m["name"], m["precision"] == "bf16"
    if name.startswith("trl"):
        return run_trl(steps, quick, threads, checkpointing=name != "trl-nockpt", bf16=bf16)
    engine = {"ours-refloop": "reference", "ours-vllm": "vllm"}.get(name, "auto")
    tokens = None if m["tokens"] is None else int(m["tokens"])  # None: the config's default
    return run_ours(
        steps, quick, engine, threads, int(m["accum"] or 1), bf16, name == "ours-ckpt", name != "ours-noshare", tokens
    )


def setting_flags() -> list[str]:
    """The command-line flags that give a child this run's model and work."""
    flags = [
        f"--prompts={SETTINGS['prompts']}",
        f"--group={SETTINGS['group']}",
        f"--new-tokens={SETTINGS['new_tokens']}",
    ]
    if SETTINGS["shape"]:
        flags.append(f"--shape={SETTINGS['shape']}")
    if SETTINGS.get("layers"):
        flags.append(f"--layers={SETTINGS['layers']}")
    return flags + (["--lora"] if SETTINGS["lora"] else [])


def run_side(side: str, steps: int, quick: bool, threads: int) -> dict:
    """One side in a fresh process; adds other processes' CPU share."""
    cmd = (
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            side,
            "--steps",
            str(steps),
            "--threads",
            str(threads),
            "--vllm-memory",
            str(VLLM["memory"]),
            "--vllm-kwargs",
            json.dumps(VLLM["kwargs"]),
        ]
        + (["--quick"] if quick else [])
        + (["--fixed-length"] if SETTINGS["fixed_length"] else [])
        + setting_flags()
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    with OthersCPU(children=True) as probe:  # the child's CPU is the side's, not others'
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        return {"error": last[:200]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["others"] = probe.share
    out["wall_s"] = probe.seconds
    return out


def summarise(side: str, r: dict, ref: dict | None, warmup: int) -> str:
    if "error" in r:
        return f"| {side} | n/a | | | | | | | | | | {r['error']} |"
    timed = r["steps"][warmup:] or r["steps"]
    med = {k: statistics.median(st[k] for st in timed) for k in ("step", *PHASES)}
    tokens = statistics.median(st.get("completion_tokens", float("nan")) for st in timed)
    ratio_t = ratio_m = ""
    if ref and "error" not in ref:
        ref_step = statistics.median(st["step"] for st in (ref["steps"][warmup:] or ref["steps"]))
        ratio_t = f"{med['step'] / ref_step:.2f}x"
        ratio_m = f"{r[MEMORY] / ref[MEMORY]:.2f}x"
    steps = [st["step"] for st in timed]
    return (
        f"| {side} | {med['step']:.2f} | {ratio_t} | {med['generate']:.2f} | {med['reward']:.3f} | "
        f"{med['logprob']:.2f} | {med['train']:.2f} | {tokens / med['generate']:.0f} | "
        f"{tokens / med['step']:.0f} | {r[MEMORY]:.0f} | {ratio_m} | "
        f"{len(steps)} steps {min(steps):.2f}-{max(steps):.2f} s, others' CPU {100 * r['others']:.0f}%"
        + (f", peak RSS {r['peak_rss_mb']:.0f} MB" if MEMORY != "peak_rss_mb" else "")
        + _phase_peaks(r["steps"])
        + " |"
    )


def _phase_peaks(steps: list) -> str:
    """Ours on a GPU: the highest peak of allocated memory of each phase over the steps (trainer metrics)."""
    peaks = {p: max(st.get(f"gpu_mem_{p}_mb", 0.0) for st in steps) for p in PHASES}
    if not any(peaks.values()):
        return ""
    return ", GPU peak by phase " + " / ".join(f"{p} {mb:.0f}" for p, mb in peaks.items()) + " MB"


def model_line(quick: bool) -> str:
    if SETTINGS["shape"]:
        layers = f", {SETTINGS['layers']} layers" if SETTINGS.get("layers") else ""
        return f"random {SETTINGS['shape']}{layers}, {'LoRA r=16' if SETTINGS['lora'] else 'full fine-tuning'}"
    return f"{'quick' if quick else 'bench'} Qwen2 {QUICK_MODEL if quick else BENCH_MODEL}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sides",
        default="ours,ours@4,ours-refloop,trl",
        help="comma list of ours, ours-ckpt, ours-refloop, ours-noshare, ours-vllm (GPU), each with an optional "
        "@GRAD_ACCUM and :TOKENS (trainer.max_tokens_per_microbatch; 0 off), trl, "
        "trl-nockpt; a +bf16 suffix runs a side in bf16 autocast (fp32 weights), compared with trl+bf16",
    )
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each side left out of the medians")
    ap.add_argument("--steps", type=int, default=4, help="steps per side, the --warmup ones included")
    ap.add_argument("--quick", action="store_true", help="a 1M-parameter model (hidden 128, 4 layers)")
    ap.add_argument(
        "--fixed-length",
        action="store_true",
        help="EOS never drawn on any side: every completion has exactly the new-token budget",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every side; 0 keeps torch's default")
    ap.add_argument("--shape", choices=sorted(QWEN25), help="a random Qwen2.5 of this real shape instead")
    ap.add_argument("--layers", type=int, help="with --shape: this many layers (smoke tests)")
    ap.add_argument("--lora", action="store_true", help="LoRA r=16 on every linear layer instead of full fine-tuning")
    ap.add_argument("--prompts", type=int, help="prompts per step (default 4; 8 with --shape)")
    ap.add_argument("--group", type=int, help="completions per prompt, G (default 8)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per completion at most (default 128; 256 with --shape)")
    ap.add_argument("--vllm-memory", type=float, default=VLLM["memory"], help="rollout.vllm_memory of ours-vllm")
    ap.add_argument(
        "--vllm-kwargs", type=json.loads, default={}, help="JSON keyword arguments of vllm.LLM for ours-vllm"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    SETTINGS.update(fixed_length=args.fixed_length, shape=args.shape, layers=args.layers, lora=args.lora)
    if args.shape:
        SETTINGS.update(SHAPE_WORK)
    given = dict(prompts=args.prompts, group=args.group, new_tokens=args.new_tokens)
    SETTINGS.update({k: v for k, v in given.items() if v is not None})
    VLLM.update(memory=args.vllm_memory, kwargs=args.vllm_kwargs)
    if args.child:
        res = run_in_this_process(args.child, args.steps, args.quick, args.threads)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's peak
        import torch

        if torch.cuda.is_available():  # on a GPU the memory that matters is the device's
            res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(res))
        return 0
    global MEMORY, MEMORY_NAME
    import torch

    if torch.cuda.is_available():  # the children run there too
        MEMORY, MEMORY_NAME = "peak_gpu_mb", "peak GPU"
    print(machine_line("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"model: {model_line(args.quick)}; "
        f"{SETTINGS}; {args.steps} steps per side (first {args.warmup} warm-up); threads {args.threads or 'default'}; "
        f"load average before: {os.getloadavg()[0]:.2f}\n"
    )
    sides = args.sides.split(",")
    print(
        "| side | step s | step vs TRL | generate s | reward s | log-probs s | train s | "
        f"generate tokens/s | step tokens/s | {MEMORY_NAME} MB | {MEMORY_NAME.split()[1]} vs TRL | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    results = {}
    for side in sides:  # each row as soon as its side ends (list TRL first to get its ratios in every row)
        results[side] = run_side(side, args.steps, args.quick, args.threads)
        ref = results.get("trl+bf16" if side.endswith("+bf16") else "trl")  # TRL at the same precision
        print(summarise(side, results[side], ref, args.warmup), flush=True)
    for side, r in results.items():  # the rows that ran before their TRL side, now with its ratios
        ref = results.get("trl+bf16" if side.endswith("+bf16") else "trl")
        if ref is not None and list(results).index(side) < list(results).index(
            "trl+bf16" if side.endswith("+bf16") else "trl"
        ):
            print(summarise(side, r, ref, args.warmup), flush=True)
    versions = {r["trl"] for r in results.values() if "trl" in r}
    if versions:
        print(f"\ntrl {versions.pop()}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
