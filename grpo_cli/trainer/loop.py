"""The one trainer every method runs through.

    for each step:
        batch   = source.next_batch(policy)        # D: reference data or samples from pi_old
        rewards = reward(batch)                     # pi_rf: a rule or a reward model (if any)
        batch   = algorithm.prepare(batch, policy)  # no grad: old/ref log-probs, advantages
        repeat algorithm.updates_per_batch times:   # GRPO's mu
            sum of algorithm.loss over micro-batches -> backward -> clip -> optimiser step
        every trainer.save_every steps, and on SIGINT/SIGTERM: checkpoint (checkpoint.py)

The loop never names a method: the (source, reward, algorithm) triple comes from the config.
Under torchrun every rank runs it on its slice of the global batch (distributed.py): the ranks'
losses are normalised by the global batch's totals, their gradients summed, their metrics averaged.
An update whose loss or gradient is not finite is skipped and counted (``skipped_steps``);
``trainer.max_bad_steps`` such steps in a row stop the run. ``resume`` continues a run exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import signal
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from grpo_cli.algorithms import Algorithm, build_algorithm
from grpo_cli.batch import Batch
from grpo_cli.data import load_examples
from grpo_cli.data.chat import chat_enabled
from grpo_cli.errors import Interrupted, UserError
from grpo_cli.models.device import pick_device
from grpo_cli.models.load import (
    apply_lora,
    enable_activation_checkpointing,
    load_model_and_tokenizer,
    resolve_start,
    save_checkpoint_model,
)
from grpo_cli.models.policy import Policy, autocast, bf16_warning
from grpo_cli.rewards.base import Reward
from grpo_cli.rewards.checkers import answer_checker
from grpo_cli.rewards.registry import build_reward, score_batch
from grpo_cli.tracking import RunLog, check_backends, open_run_log
from grpo_cli.trainer.checkpoint import (
    Checkpointer,
    RunState,
    StopOnSignal,
    already_complete,
    finished_step,
    interrupted_message,
    latest_checkpoint,
    recorded_start,
    resolve_resume,
)
from grpo_cli.trainer.distributed import LOCAL, Dist, init_distributed, is_main, on_main
from grpo_cli.trainer.memory import HeapTrimmer, bound_onednn_cache
from grpo_cli.trainer.optim import build_optimizer
from grpo_cli.trainer.run import ProgressBar, atomic_replace_dir, console, create_run_dir, plot_curves
from grpo_cli.trainer.source_registry import build_source
from grpo_cli.trainer.sources import Source


class Timers:
    """Wall-clock seconds per phase of a step (``time_generate``, ``time_reward``, ...) and, on a GPU,
    the phase's peak of allocated GPU memory in MiB (``gpu_mem_generate_mb``, ...): where a step's
    memory peak is, which is what to shrink when memory is short."""

    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)
        self.gpu_mem: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        gpu = sync_cuda()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        sync_cuda()  # GPU work is asynchronous: charge it to the phase that queued it
        self.seconds[f"time_{name}"] += time.perf_counter() - t0
        if gpu:
            key = f"gpu_mem_{name}_mb"
            self.gpu_mem[key] = max(self.gpu_mem[key], torch.cuda.max_memory_allocated() / 2**20)


def sync_cuda() -> bool:
    """Wait for the GPU's queued work; whether there is a GPU in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        return True
    return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_policy(cfg: DictConfig, algorithm: Algorithm, run: Path, device: torch.device, loaded) -> Policy:
    """The policy from an already ``loaded`` (model, tokenizer, base_ref), with LoRA and a reference."""
    model, tok, base_ref = loaded
    if cfg.lora.enabled and base_ref is None:
        # The base exists only in memory (tiny model, merged adapter): save it once so the
        # adapter checkpoints of this run reload on top of it (atomically: they all depend on it).
        base_ref = str((run / "base_model").resolve())  # absolute: the adapters load from any directory
        if is_main() and not (cfg.get("resume") and (run / "base_model" / "config.json").exists()):
            tmp = run / ".tmp-base_model"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_checkpoint_model(model, tok, tmp, None)
            atomic_replace_dir(tmp, Path(base_ref))
    if cfg.trainer.activation_checkpointing:  # the flag every block carries (the padding-free forward reads it)
        enable_activation_checkpointing(model)
    model = apply_lora(model, cfg.lora).to(device)
    model.train()
    return Policy.create(
        model,
        tok,
        keep_reference=algorithm.needs_reference,
        logprob_backend=cfg.model.logprob_backend,
        base_ref=base_ref,
        precision=cfg.trainer.precision,
        share_prefixes=cfg.model.share_prefixes,
        compact_reference=cfg.trainer.distributed != "fsdp",  # FSDP2 shards a block's weights in one dtype
    )


def start_model(name_or_path: str, resume_from: Optional[Path]) -> Optional[str]:
    """The run's start as an absolute, link-free directory: a resumed run's recorded start, else
    ``name_or_path`` resolved now; None for ``tiny`` and hub names."""
    start = (recorded_start(resume_from, name_or_path) if resume_from else None) or resolve_start(name_or_path)
    return start if Path(start).is_absolute() else None


def record_start(cfg: DictConfig, resume_from: Optional[Path]) -> None:
    """Set ``model.resolved_path`` (saved in config.yaml beside what was typed): the model loads from
    it, and LoRA adapters name it as their base, so a ``latest`` link that moves later changes nothing."""
    start = on_main(start_model, cfg.model.name_or_path, resume_from)
    with open_dict(cfg):
        cfg.model.resolved_path = start


CPU_TOKEN_BUDGET = 1024
CPU_BUDGET_ACTIVATIONS = 2**22
"""``trainer.max_tokens_per_microbatch`` when it is None and the model is on a CPU: about
CPU_BUDGET_ACTIVATIONS / (hidden size x layers) tokens, never fewer than CPU_TOKEN_BUDGET. That is
1,024 tokens on the step benchmark's model (hidden 512 x 8 layers), where it put the peak under TRL's
at no cost in time, and more on narrower, shallower models, whose activations are small and whose
micro-batches' fixed costs weigh more (the tiny default model: 8,192, so the quickstart's batches
stay whole; docs/performance.md, "Token-budget micro-batches")."""


def token_budget(setting: Optional[int], device: torch.device, width_x_depth: int) -> int:
    """The micro-batch token budget in force: ``setting`` when given (0: off); else off on a GPU and,
    on a CPU, the default above for a model of ``width_x_depth`` = hidden size x layers (0: unknown)."""
    if setting is not None:
        return setting
    if device.type != "cpu":
        return 0
    if width_x_depth <= 0:
        return CPU_TOKEN_BUDGET
    return max(CPU_TOKEN_BUDGET, CPU_BUDGET_ACTIVATIONS // width_x_depth)


def width_x_depth(model: torch.nn.Module) -> int:
    """A transformers model's hidden size x layers, 0 where its config does not say."""
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "hidden_size", 0) or 0) * int(getattr(cfg, "num_hidden_layers", 0) or 0)


def micro_batches(batch: Batch, grad_accum: int, max_tokens: int = 0, unit: int = 1) -> List[Batch]:
    """The micro-batches of one update: ``grad_accum`` contiguous splits by rows, each packed again
    by ``max_tokens`` real tokens when that is set (``trainer.max_tokens_per_microbatch``; ``unit``:
    the algorithm's ``rows_together``). Both bound a micro-batch: rows by the first, tokens by the second."""
    parts = batch.micro_batches(grad_accum)
    if not max_tokens:
        return parts
    return [mb for part in parts for mb in part.token_micro_batches(max_tokens, unit)]


def optimise(
    batch: Batch,
    algorithm: Algorithm,
    policy: Policy,
    opt,
    sched,
    micro: int,
    max_norm: float,
    dist: Dist = LOCAL,
    max_tokens: int = 0,
) -> Dict[str, float]:
    """``updates_per_batch`` optimiser steps on ``batch``, each summing the micro-batch losses (and,
    data parallel, the ranks' losses and gradients: the global batch's). Micro-batches: ``micro``
    (``trainer.grad_accum``) and ``max_tokens`` (``trainer.max_tokens_per_microbatch``), :func:`micro_batches`.

    An update whose loss or gradient norm is not finite is skipped: its gradients are dropped, the
    weights and optimiser state stay as they were, the schedule still advances; ``skipped`` counts them.
    """
    sums: Dict[str, float] = defaultdict(float)
    params = [p for p in policy.trainable().parameters() if p.requires_grad]
    n, norms, skipped = 0, [], 0
    parts = micro_batches(batch, micro, max_tokens, algorithm.rows_together)
    for _ in range(algorithm.updates_per_batch):
        opt.zero_grad(set_to_none=True)
        update_loss = 0.0
        for mb in parts:
            with policy.autocast():  # the forward only: backward follows the forward's dtypes
                loss, metrics = algorithm.loss(mb, policy)
            loss.backward()
            update_loss += float(loss.detach())
            for k, v in metrics.items():
                sums[k] += v
            n += 1
        update_loss = dist.sum(update_loss)  # the same on every rank: all skip an update or none does
        sums["loss"] += update_loss
        dist.sync_gradients(params)
        norm = dist.clip_grad_norm(params, max_norm)
        norms.append(norm)
        if math.isfinite(update_loss) and math.isfinite(norm):
            opt.step()
            sched.step()
        else:
            skipped += 1
            with warnings.catch_warnings():  # torch warns when the schedule steps before any optimiser step
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
        # free the gradients now, not at the next update: the next rollout and log-probs run without them
        opt.zero_grad(set_to_none=True)
    out = {k: v / n for k, v in sums.items()}
    out["loss"] = sums["loss"] / algorithm.updates_per_batch  # micro-batch losses add up to the batch loss
    out["grad_norm"] = sum(norms) / len(norms)
    out["skipped"] = skipped
    return out


def stop_if_diverging(progress: RunState, metrics: Dict[str, float], step: int, max_bad: int, run: Path) -> None:
    """``max_bad`` steps in a row with a skipped (non-finite) update stop the run with a clear message."""
    if not max_bad or progress.bad_in_row < max_bad:
        return
    latest = latest_checkpoint(run)
    raise UserError(
        f"stopping at step {step}: {max_bad} non-finite losses/gradients in a row (last: loss={metrics['loss']:.4g}, "
        f"grad_norm={metrics['grad_norm']:.4g}); lower trainer.lr, check the data or use model.dtype=float32; "
        + (f"the latest checkpoint is {latest}" if latest else "no checkpoint was saved")
    )


def reward_batch(reward: Optional[Reward], batch: Batch, tokenizer) -> None:
    """``batch.rewards`` from the run's reward (pi_rf): for a batch without stored rewards, and for
    every batch under a per-step reward (stored rewards are per-output summaries, without the step
    labels it sets). The only place the trainer calls the reward, besides the ``score`` it hands an
    offline source for its samples."""
    if reward is not None and (batch.rewards is None or reward.per_step):
        batch.rewards = score_batch(reward, batch, tokenizer)


@torch.no_grad()
def evaluate_heldout(
    source: Source, reward, algorithm: Algorithm, policy: Policy, device: torch.device
) -> Dict[str, float]:
    """The algorithm's metrics on the source's held-out batches (if any), averaged, ``heldout_`` prefixed."""
    sums: Dict[str, float] = defaultdict(float)
    batches = source.heldout_batches()
    for batch in batches:
        with policy.autocast():
            reward_batch(reward, batch, policy.tokenizer)
            for k, v in algorithm.evaluate(batch.with_totals().to(device), policy).items():
                sums[k] += v / len(batches)
    return {f"heldout_{k}": v for k, v in sums.items()}


def train_step(
    cfg: DictConfig,
    source: Source,
    reward,
    algorithm: Algorithm,
    policy: Policy,
    opt,
    sched,
    device: torch.device,
    dist: Dist = LOCAL,
    trimmer: Optional[HeapTrimmer] = None,
) -> Tuple[Batch, Dict[str, float], Timers]:
    """One step of the loop: batch, rewards, prepare, optimise; the heap trimmed before or after the
    update (trainer/memory.py)."""
    timers = Timers()
    with timers("generate"), dist.full_weights(policy.model), policy.autocast():  # fsdp: sampling needs the whole model
        batch = source.next_batch(policy).with_totals()
    with timers("reward"), policy.autocast():  # offline sources bring stored rewards
        reward_batch(reward, batch, policy.tokenizer)
    batch = batch.to(device)
    with timers("logprob"), policy.autocast():
        batch = dist.global_totals(algorithm.prepare(batch, policy))
    if trimmer:
        trimmer.before_update()
    with timers("train"):
        tr = cfg.trainer
        budget = token_budget(tr.max_tokens_per_microbatch, device, width_x_depth(policy.model))
        metrics = optimise(batch, algorithm, policy, opt, sched, tr.grad_accum, tr.max_grad_norm, dist, budget)
    if trimmer:
        trimmer.after_update()
    return batch, metrics, timers


WARNED: set = set()
"""Warnings about the machine already printed by this process (each is printed once)."""


def train(cfg: DictConfig) -> Path:
    """Run the configured method; returns the run directory. Launched by torchrun, every rank runs
    it as one process of a data-parallel run (docs/distributed.md)."""
    bound_onednn_cache(cfg.trainer.onednn_cache)  # before any CPU matmul of the process
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.trainer.seed)
    with init_distributed(cfg.trainer.distributed, pick_device(cfg.trainer.device)) as dist:
        return train_on(cfg, dist)


def check_precision(precision: str, device: torch.device, rank: int) -> None:
    """A bad ``trainer.precision`` fails before the run directory exists; bf16 emulated on this CPU is
    warned about once per process (iterative GRPO trains many times in one)."""
    autocast(precision, device)
    slow = bf16_warning(precision, device)
    if slow and rank == 0 and slow not in WARNED:
        WARNED.add(slow)
        console.print(f"[yellow]warning:[/yellow] {slow}")


def advance(progress: RunState, step: int, skipped: int, tokens: int, t_start: float) -> None:
    """The run's state after ``step``: a skipped update counts toward ``trainer.max_bad_steps``."""
    progress.skipped_steps += skipped
    progress.bad_in_row = progress.bad_in_row + 1 if skipped else 0
    progress.step, progress.tokens = step, progress.tokens + tokens
    progress.seconds = time.perf_counter() - t_start


def metrics_row(step: int, lr: float, progress: RunState, batch: Batch, metrics, timers: Timers) -> Dict:
    """One line of metrics.jsonl: the step, the run's counters, the batch's and the update's metrics,
    the phases' times (and GPU memory peaks)."""
    return {
        "step": step,
        "lr": lr,
        "tokens": progress.tokens,
        "seconds": round(progress.seconds, 3),
        "skipped_steps": progress.skipped_steps,
        **batch.stats,
        **metrics,
        **timers.seconds,
        **timers.gpu_mem,
    }


def make_source(cfg: DictConfig, examples, policy: Policy, reward, checker, run: Path, dist: Dist) -> Source:
    """The run's data source over ``examples``; an offline one samples now, scored by the run's reward."""
    source = build_source(
        cfg.source,
        examples=examples,
        policy=policy,
        batch_size=cfg.trainer.batch_size,
        rollout=cfg.rollout,
        checker=checker,
        seed=cfg.trainer.seed,
        run=run,
        rank=dist.rank,
        world_size=dist.world_size,
        chat=chat_enabled(cfg.data.chat_template, policy.tokenizer),
        score=functools.partial(score_batch, reward, tokenizer=policy.tokenizer) if reward is not None else None,
        sync=dist.any,  # dynamic sampling: every rank draws as many rounds as the rank that needs most
    )
    if source.skipped:
        console.print(
            f"[yellow]warning:[/yellow] {source.skipped} training examples skipped: longer than the model's context"
        )
    return source


def run_log(cfg: DictConfig, run: Path, resume_step: Optional[int], dist: Dist, sampled: bool) -> RunLog:
    """metrics.jsonl, the completion tables and the chosen trackers (rank 0 only), given the config."""
    lg = cfg.logging
    return open_run_log(
        run,
        backends=lg.backends,
        project=lg.project,
        name=lg.run_name,
        config=OmegaConf.to_container(cfg, resolve=True),
        resume_step=resume_step,
        enabled=dist.is_main,
        completions_every=lg.completions_every,
        completions_max=lg.completions_max,
        samples_each_step=sampled,
    )


def train_on(cfg: DictConfig, dist: Dist) -> Path:
    """The run as one rank sees it (the only one, without torchrun); rank 0 writes the run directory."""
    device = dist.device
    algorithm = build_algorithm(cfg.algorithm)
    checker = answer_checker(cfg.data)  # the run's answer rule: its outcome reward and its accuracy
    reward = build_reward(cfg.reward, device, checker=checker)
    if algorithm.needs_rewards and reward is None:
        raise UserError(f"reward: algorithm '{algorithm.name}' needs a reward function; set reward=outcome")
    check_precision(cfg.trainer.precision, device, dist.rank)
    check_backends(cfg.logging.backends)  # a missing tracker package fails before anything is written
    resume_from = on_main(resolve_resume, cfg)  # the checkpoint to continue from; output_dir becomes its run
    if resume_from is not None and finished_step(resume_from, cfg.trainer.steps) is not None:
        return already_complete(resume_from, cfg.trainer.steps)  # nothing written: config.yaml, metrics, checkpoints
    record_start(cfg, resume_from)
    loaded = load_model_and_tokenizer(cfg.model)  # before the run directory: a bad path leaves nothing behind
    examples = load_examples(cfg.data, "train", loaded[1])  # prompts rendered for this tokenizer
    run = on_main(create_run_dir, cfg)
    with open_dict(cfg):
        cfg.output_dir = str(run)  # every rank's config names rank 0's run directory
    policy = build_policy(cfg, algorithm, run, device, loaded)
    source = make_source(cfg, examples, policy, reward, checker, run, dist)
    # after sampling: a reward model's head, PPO's value model; then the replicas start equal (fsdp: sharded)
    policy = dist.prepare(algorithm.setup(policy))
    opt, sched = build_optimizer(policy.trainable(), cfg.trainer, algorithm.updates_per_batch)
    keep, seed = cfg.trainer.keep_checkpoints, cfg.trainer.seed
    ckpt = Checkpointer(run, policy, opt, sched, source, algorithm, keep, seed, dist)
    progress = ckpt.restore(resume_from) if resume_from else RunState()  # RNG states last: nothing may draw after
    main_metric = cfg.logging.main_metric or algorithm.main_metric
    console.print(f"[bold]run[/bold] {run}  method={algorithm.name} source={cfg.source.name} reward={cfg.reward.name}")
    t_start = time.perf_counter() - progress.seconds
    show = cfg.logging.progress and dist.is_main
    log = run_log(cfg, run, progress.step if resume_from else None, dist, source.samples_each_step)
    trimmer = HeapTrimmer(source.samples_each_step) if cfg.trainer.trim_memory and device.type == "cpu" else None
    with StopOnSignal() as stop, ProgressBar(cfg.trainer.steps, show, ["loss", main_metric]) as bar, log:
        for step in range(progress.step + 1, cfg.trainer.steps + 1):
            batch, metrics, timers = train_step(
                cfg, source, reward, algorithm, policy, opt, sched, device, dist, trimmer
            )
            advance(progress, step, metrics.pop("skipped"), int(dist.sum(float(batch.attention_mask.sum()))), t_start)
            row = metrics_row(step, sched.get_last_lr()[0], progress, batch, metrics, timers)
            if step == cfg.trainer.steps or (cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0):
                row.update(evaluate_heldout(source, reward, algorithm, policy, device))
            row = dist.mean_metrics(row)  # each rank measured its slice
            if step % cfg.logging.log_every == 0 or step == cfg.trainer.steps:
                log.write(row)
            log.completions(batch, step)  # after prepare: the rows' advantages exist
            bar.update(step, row)
            stop_if_diverging(progress, metrics, step, cfg.trainer.max_bad_steps, run)
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                ckpt.save(f"step_{step:06d}", progress)
            # all ranks stop at the same step; a saved checkpoint is not rewritten
            if dist.any(stop.signum is not None):
                path = ckpt.save(f"step_{step:06d}", progress)
                raise Interrupted(interrupted_message(step, path, run), stop.signum or signal.SIGTERM)
        ckpt.save("final", progress)
    if cfg.logging.plot and dist.is_main:
        plot_curves(log.history, main_metric, run / "curves.png")
    console.print(f"[green]done[/green] {cfg.trainer.steps} steps in {time.perf_counter() - t_start:.1f}s -> {run}")
    return run
