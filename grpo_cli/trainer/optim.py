"""Optimiser and learning-rate schedule (linear warmup, then constant, linear or cosine decay)."""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from grpo_cli.errors import UserError

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based)."""
    if schedule not in SCHEDULES:  # checked first: a warmup step must not let a misspelt name through
        raise UserError(f"trainer.schedule: expected constant, linear or cosine, got '{schedule}'")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine: decays to 10% of the peak


def param_groups(modules: torch.nn.ModuleList, lr: float) -> List[Dict]:
    """One parameter group per module, at ``lr * module.lr_scale`` (1 when unset); a parameter shared
    by several modules belongs to the last one (an algorithm's extra module claims its own share)."""
    seen, groups = set(), []
    for module in reversed(list(modules)):
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": lr * getattr(module, "lr_scale", 1.0)})
    return groups[::-1]


def fused_adamw_supported(params) -> bool:
    """torch's fused AdamW (one kernel over all tensors; the default loop's arithmetic to float rounding)
    for plain CPU/CUDA float tensors: far faster than the default on CPU (docs/performance.md, "A GRPO
    step, ours and TRL") and no [P]-sized temporaries on CUDA, where the default is the foreach loop.
    FSDP's sharded DTensors keep the default."""
    flat = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else list(params)
    return bool(flat) and all(
        type(p) is torch.nn.Parameter
        and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in flat
    )


def build_optimizer(model: torch.nn.Module, cfg, updates_per_batch: int):
    params = (
        param_groups(model, cfg.lr)
        if isinstance(model, torch.nn.ModuleList)
        else [p for p in model.parameters() if p.requires_grad]
    )
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            fused=fused_adamw_supported(params),
        )
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise UserError(f"trainer.optimizer: expected adamw or sgd, got '{cfg.optimizer}'")
    total = cfg.steps * updates_per_batch
    lr_factor(0, warmup=cfg.warmup_steps, total=total, schedule=cfg.schedule)  # validate the name now
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=total, schedule=cfg.schedule)
    )
    return opt, sched
