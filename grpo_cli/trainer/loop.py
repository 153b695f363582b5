"""The one trainer every method runs through.

    for each step:
        batch   = source.next_batch(policy)        # D: reference data or samples from pi_old
        rewards = reward(batch)                     # pi_rf: a rule or a reward model (if any)
        batch   = algorithm.prepare(batch, policy)  # no grad: old/ref log-probs, advantages
        repeat algorithm.updates_per_batch times:   # GRPO's mu
            sum of algorithm.loss over micro-batches -> backward -> clip -> optimiser step

The loop never names a method: the (source, reward, algorithm) triple comes from the config.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List

import torch
from omegaconf import DictConfig

from grpo_cli.algorithms import Algorithm, build_algorithm
from grpo_cli.data import load_examples
from grpo_cli.errors import UserError
from grpo_cli.models.load import apply_lora, load_model_and_tokenizer, save_checkpoint_model
from grpo_cli.models.policy import Policy
from grpo_cli.rewards.registry import build_reward
from grpo_cli.trainer.batch import Batch
from grpo_cli.trainer.optim import build_optimizer
from grpo_cli.trainer.run import MetricsLog, ProgressBar, atomic_replace_dir, console, create_run_dir, plot_curves
from grpo_cli.trainer import offline  # noqa: F401  (registers the rft and pairs sources)
from grpo_cli.trainer.sources import build_source


class Timers:
    """Wall-clock seconds per phase of a step (``time_generate``, ``time_reward``, ...)."""

    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[f"time_{name}"] += time.perf_counter() - t0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def build_policy(cfg: DictConfig, algorithm: Algorithm, run: Path, device: torch.device, loaded) -> Policy:
    """The policy from an already ``loaded`` (model, tokenizer, base_ref), with LoRA and a reference."""
    model, tok, base_ref = loaded
    if cfg.lora.enabled and base_ref is None:
        # The base exists only in memory (tiny model, merged adapter): save it once so the
        # adapter checkpoints of this run reload on top of it.
        base_ref = str(run / "base_model")
        save_checkpoint_model(model, tok, Path(base_ref), None)
    model = apply_lora(model, cfg.lora).to(device)
    model.train()
    return Policy.create(
        model, tok, keep_reference=algorithm.needs_reference, logprob_backend=cfg.model.logprob_backend,
        base_ref=base_ref,
    )


def optimise(batch: Batch, algorithm: Algorithm, policy: Policy, opt, sched, micro: int, max_norm: float) -> Dict[str, float]:
    """``updates_per_batch`` optimiser steps on ``batch``, each summing the micro-batch losses."""
    sums: Dict[str, float] = defaultdict(float)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    n, norms = 0, []
    for _ in range(algorithm.updates_per_batch):
        opt.zero_grad(set_to_none=True)
        for mb in batch.micro_batches(micro):
            loss, metrics = algorithm.loss(mb, policy)
            loss.backward()
            sums["loss"] += float(loss.detach())
            for k, v in metrics.items():
                sums[k] += v
            n += 1
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        norms.append(float(norm))
        opt.step()
        sched.step()
    out = {k: v / n for k, v in sums.items()}
    out["loss"] = sums["loss"] / algorithm.updates_per_batch  # micro-batch losses add up to the batch loss
    out["grad_norm"] = sum(norms) / len(norms)
    return out


def train(cfg: DictConfig) -> Path:
    """Run the configured method; returns the run directory."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.trainer.seed)
    device = pick_device(cfg.trainer.device)
    algorithm = build_algorithm(cfg.algorithm)
    reward = build_reward(cfg.reward)
    if algorithm.needs_rewards and reward is None:
        raise UserError(f"reward: algorithm '{algorithm.name}' needs a reward function; set reward=outcome (or another)")
    examples = load_examples(cfg.data, "train")
    loaded = load_model_and_tokenizer(cfg.model)  # before the run directory: a bad path leaves nothing behind
    run = create_run_dir(cfg)
    policy = build_policy(cfg, algorithm, run, device, loaded)
    source = build_source(
        cfg.source, examples=examples, policy=policy, batch_size=cfg.trainer.batch_size,
        rollout=cfg.rollout, seed=cfg.trainer.seed, reward=reward, run=run,
    )
    if getattr(source, "skipped", 0):
        console.print(f"[yellow]warning:[/yellow] {source.skipped} training examples skipped: longer than the model's context")
    opt, sched = build_optimizer(policy.model, cfg.trainer, algorithm.updates_per_batch)
    log = MetricsLog(run)
    main_metric = cfg.logging.main_metric or algorithm.main_metric
    console.print(f"[bold]run[/bold] {run}  method={algorithm.name} source={cfg.source.name} reward={cfg.reward.name}")
    t_start, tokens = time.perf_counter(), 0
    with ProgressBar(cfg.trainer.steps, cfg.logging.progress, ["loss", main_metric]) as bar:
        for step in range(1, cfg.trainer.steps + 1):
            timers = Timers()
            with timers("generate"):
                batch = source.next_batch(policy).with_totals()
            with timers("reward"):
                if reward is not None and batch.rewards is None:  # offline sources bring stored labels
                    batch.rewards = reward(batch)
            batch = batch.to(device)
            with timers("logprob"):
                batch = algorithm.prepare(batch, policy)
            with timers("train"):
                metrics = optimise(batch, algorithm, policy, opt, sched, cfg.trainer.grad_accum, cfg.trainer.max_grad_norm)
            tokens += int(batch.attention_mask.sum())
            row = {"step": step, "lr": sched.get_last_lr()[0], "tokens": tokens,
                   "seconds": round(time.perf_counter() - t_start, 3), **batch.stats, **metrics, **timers.seconds}
            if step % cfg.logging.log_every == 0 or step == cfg.trainer.steps:
                log.write(row)
            bar.update(step, row)
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                save(policy, run, f"step_{step:06d}", cfg.trainer.keep_checkpoints)
    save(policy, run, "final", cfg.trainer.keep_checkpoints)
    if cfg.logging.plot:
        plot_curves(log.history, main_metric, run / "curves.png")
    console.print(f"[green]done[/green] {cfg.trainer.steps} steps in {time.perf_counter() - t_start:.1f}s -> {run}")
    return run


def save(policy: Policy, run: Path, name: str, keep: int) -> Path:
    """Write a checkpoint to a temp dir, fsync, rename into place; keep the last ``keep`` step ones."""
    root = run / "checkpoints"
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint_model(policy.model, policy.tokenizer, tmp, policy.base_ref)
    atomic_replace_dir(tmp, root / name)
    steps: List[Path] = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old)
    return root / name
