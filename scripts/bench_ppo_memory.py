#!/usr/bin/env python
"""PPO's memory with the two value models, on the same policy, batch and settings, side by side.

``separate``: a full copy of the policy with a scalar head, every weight trained (the paper's
setting). ``lora``: a second LoRA adapter and a head on the policy's frozen base. The policy is the
same in both (LoRA r=16 on a frozen base, the reference = adapter disabled). Each row runs one PPO
step (prepare + loss + backward + AdamW step, the trainer's own code) in a fresh subprocess and
reports the process's peak RSS, the growth of the peak over the RSS after the policy is built,
the value model's parameters and trainable parameters, and the optimiser state.

    python scripts/bench_ppo_memory.py            # Qwen2 H=512, 8 layers, V=32000, B=32, T=160
    python scripts/bench_ppo_memory.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import random_batch, random_qwen2, reset_peak, status_mb  # noqa: E402


def one(value_model: str, vocab: int, hidden: int, layers: int, batch: int, tokens: int) -> dict:
    import torch

    from grpo_cli.algorithms.ppo import PPO
    from grpo_cli.config.schema import LoraConfig
    from grpo_cli.models.load import apply_lora
    from grpo_cli.models.policy import Policy
    from grpo_cli.trainer.optim import param_groups

    model = apply_lora(
        random_qwen2(vocab, hidden, layers, tokens), LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0)
    )
    policy = Policy.create(model, tokenizer=None, keep_reference=True, logprob_backend="fused")
    b = random_batch(vocab, batch, tokens, group=1)
    base = status_mb("VmRSS")
    reset_peak()
    algo = PPO(
        beta=0.04,
        eps=0.2,
        mu=1,
        gamma=1.0,
        lam=0.95,
        whiten_advantages=True,
        value_model=value_model,
        value_clip=0.2,
        vf_coef=0.5,
        value_lr_scale=10.0,
    )
    policy = algo.setup(policy)
    opt = torch.optim.AdamW(param_groups(policy.trainable(), 1e-5))
    b = algo.prepare(b, policy)
    loss, _ = algo.loss(b, policy)
    loss.backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    value_params = sum(p.numel() for p in algo.value.parameters())
    return {
        "value_model": value_model,
        "peak_mb": status_mb("VmHWM"),
        "growth_mb": status_mb("VmHWM") - base,
        "value_params": value_params,
        "trainable": sum(p.numel() for p in policy.trainable().parameters() if p.requires_grad),
        "opt_state_mb": state / 2**20,
        "policy_params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (activations grow with it)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(**json.loads(args.child))))
        return
    shape = (
        dict(vocab=4096, hidden=128, layers=2, batch=8, tokens=64)
        if args.quick
        else dict(vocab=32000, hidden=512, layers=8, batch=args.batch, tokens=160)
    )
    rows = []
    for value_model in ("separate", "lora"):
        spec = json.dumps(dict(value_model=value_model, **shape))
        out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"PPO step, policy LoRA r=16 on Qwen2 V={shape['vocab']} H={shape['hidden']} layers={shape['layers']} "
        f"({rows[0]['policy_params'] / 1e6:.1f}M), B={shape['batch']} T={shape['tokens']}, fp32, CPU"
    )
    print(
        f"{'value model':>12} {'value params':>13} {'trainable':>11} {'opt state MB':>13} {'peak RSS MB':>12} "
        f"{'growth MB':>10} {'growth x':>9}"
    )
    for r in rows:
        print(
            f"{r['value_model']:>12} {r['value_params'] / 1e6:>12.2f}M {r['trainable'] / 1e6:>10.2f}M "
            f"{r['opt_state_mb']:>13.1f} {r['peak_mb']:>12.0f} {r['growth_mb']:>10.0f} "
            f"{r['growth_mb'] / rows[0]['growth_mb']:>9.2f}"
        )


if __name__ == "__main__":
    main()
