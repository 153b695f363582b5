"""Iterative RL with GRPO (DeepSeekMath section 4.2, Algorithm 1), as a driver around the one loop.

    policy <- start model;  reward model <- reward.path (or trained now on the start model's samples)
    for iteration k = 1..I:
        policy run:  trainer.steps GRPO steps from the current policy, scored by the reward model;
                     the run starts from the current policy, so pi_ref = the current policy
        reward data: the new policy's samples, labelled by the rule, plus `replay` of them drawn from
                     the historical buffer (<run>/rm_buffer.jsonl, every earlier iteration's data)
        reward model: continue training it (its LM and its head) on that data

Layout: ``<run>/rm_0`` (the initial reward model, if trained here), ``<run>/iter_K/policy``,
``<run>/iter_K/rm_data.jsonl``, ``<run>/iter_K/rm``, ``<run>/iterations.jsonl`` (one row per finished
iteration) and ``<run>/checkpoints/final`` (a link to the last policy). ``resume=true`` skips the
finished iterations. With LoRA every iteration loads the previous policy with its adapter merged into
the base and trains a fresh adapter: the merged weights are both the new start and the new pi_ref.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from pathlib import Path
from typing import Dict, List

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from grpo_cli.config.compose import compose_run
from grpo_cli.config.schema import ModelConfig
from grpo_cli.data import load_examples
from grpo_cli.data.loaders import read_jsonl
from grpo_cli.errors import UserError
from grpo_cli.evaluate import evaluate_model
from grpo_cli.models.device import pick_device
from grpo_cli.models.load import load_model_and_tokenizer
from grpo_cli.models.policy import Policy
from grpo_cli.rewards.checkers import answer_checker
from grpo_cli.rewards.registry import build_reward, score_batch
from grpo_cli.trainer.loop import train
from grpo_cli.trainer.offline import choose_questions, make_pairs, sample_questions, write_samples
from grpo_cli.trainer.run import console, create_run_dir, last_row

RM_RECIPES = {"outcome_rm": "rm_arithmetic", "process_rm": "prm_arithmetic"}
CARRIED = ("data", "rollout", "logging")  # sections the reward-model phases take from the iterative run


def run_iterative(cfg: DictConfig) -> Path:
    it = cfg.iterative
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "iterative.iterations: iterative RL runs in one process (its phases and files are not "
            "rank-aware); launch it without torchrun"
        )
    if cfg.reward.name not in RM_RECIPES:
        raise UserError(
            f"iterative.iterations: iterative RL refreshes a learned reward; set reward=outcome_rm or "
            f"process_rm (got reward={cfg.reward.name})"
        )
    resume = bool(cfg.resume)
    with open_dict(cfg):
        cfg.resume = False
    run = create_run_dir(cfg)
    done = finished_iterations(run, resume)
    rm = cfg.reward.path or (str(run / "rm_0") if (run / "rm_0" / "checkpoints" / "final").is_dir() else None)
    if rm is None:
        rm = str(train_reward_model(cfg, run / "rm_0", start=cfg.model.name_or_path, head_from=None, samples=None))
        append_samples(run / "rm_buffer.jsonl", read_jsonl_rows(run / "rm_0" / "samples.jsonl"))
    if done:  # resume: continue from the last finished iteration's policy and reward model
        policy, rm = done[-1]["policy"], done[-1]["reward_model"]
    else:
        policy = cfg.model.name_or_path
    for k in range(len(done) + 1, it.iterations + 1):
        t0 = time.perf_counter()
        policy, rm, row = iteration(cfg, run, k, policy, rm)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        with open(run / "iterations.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = {a: b for a, b in row.items() if a not in ("policy", "reward_model")}
        console.print(f"[bold]iteration {k}/{it.iterations}[/bold] " + " ".join(f"{a}={b}" for a, b in shown.items()))
    link_final(run, Path(policy))
    return run


def iteration(cfg: DictConfig, run: Path, k: int, policy: str, rm: str):
    """One iteration: policy steps against the current reward model, then the reward model's update."""
    here = run / f"iter_{k}"
    policy_cfg = derived(cfg, output_dir=here / "policy", **{"model.name_or_path": policy, "reward.path": rm})
    with open_dict(policy_cfg):
        policy_cfg.iterative.iterations = 0
    new_policy = train(policy_cfg)
    data = here / "rm_data.jsonl"
    fresh = sample_for_reward_model(cfg, str(new_policy), seed=cfg.trainer.seed + k)
    mix = with_replay(fresh, read_jsonl_rows(run / "rm_buffer.jsonl"), cfg.iterative.replay, seed=cfg.trainer.seed + k)
    write_rows(data, mix)
    append_samples(run / "rm_buffer.jsonl", fresh)
    row = {
        "iteration": k,
        **metrics_of(new_policy, "reward_mean", "accuracy", "kl"),
        "rm_samples": len(mix),
        "rm_replayed": len(mix) - len(fresh),
    }
    if trainable_pairs(cfg, mix):
        new_rm = train_reward_model(cfg, here / "rm", start=rm, head_from=rm, samples=str(data))
        row.update({f"rm_{a}": b for a, b in metrics_of(new_rm, "heldout_").items()})
    else:  # every sample right (or every one wrong): nothing to compare, keep the reward model
        console.print(
            f"[yellow]warning:[/yellow] iteration {k}: no (correct, incorrect) pair among the policy's "
            f"{len(mix)} samples; the reward model is kept as it was"
        )
        new_rm, row["rm_skipped"] = Path(rm), 1
    if cfg.iterative.eval_limit:
        row["eval_accuracy"] = evaluate_policy(cfg, new_policy, here / "eval")
    row.update(policy=str(new_policy), reward_model=str(new_rm))
    return str(new_policy), str(new_rm), row


def trainable_pairs(cfg: DictConfig, rows: List[Dict]) -> bool:
    """A pairwise reward model needs at least one question with a correct and an incorrect sample."""
    rm = reward_model_config(cfg)
    return rm.source.name != "pairs" or bool(make_pairs(rows, rm.source.threshold, 1))


def derived(cfg: DictConfig, *, output_dir: Path, **keys) -> DictConfig:
    """A copy of ``cfg`` writing to ``output_dir`` with the dotted ``keys`` replaced."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(out):
        out.output_dir = str(output_dir)
        for key, value in keys.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


def reward_model_config(cfg: DictConfig) -> DictConfig:
    """The reward-model recipe, with the iterative run's data, rollout, logging, model and trainer basics."""
    recipe = cfg.iterative.rm_recipe or RM_RECIPES[cfg.reward.name]
    rm = compose_run(recipe, [])
    with open_dict(rm):
        for section in CARRIED:
            rm[section] = cfg[section]
        rm.model.tiny, rm.model.dtype = cfg.model.tiny, cfg.model.dtype
        rm.trainer.threads, rm.trainer.device, rm.trainer.seed = (
            cfg.trainer.threads,
            cfg.trainer.device,
            cfg.trainer.seed,
        )
        rm.trainer.steps = cfg.iterative.rm_steps
        rm.source.questions, rm.source.samples_per_question = (
            cfg.iterative.questions,
            cfg.iterative.samples_per_question,
        )
    return rm


def train_reward_model(cfg: DictConfig, out: Path, *, start: str, head_from, samples) -> Path:
    rm = reward_model_config(cfg)
    with open_dict(rm):
        rm.output_dir, rm.model.name_or_path = str(out), start
        rm.algorithm.head_from, rm.source.samples = head_from, samples
    return train(rm)


def sample_for_reward_model(cfg: DictConfig, policy_dir: str, seed: int) -> List[Dict]:
    """``questions x samples_per_question`` outputs of the policy, labelled by the reward-model recipe's rule."""
    rm = reward_model_config(cfg)
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=policy_dir, dtype=cfg.model.dtype))
    # sampled as the loop samples: on the run's device, at trainer.precision
    policy = Policy(model.to(pick_device(cfg.trainer.device)).eval(), tok, precision=cfg.trainer.precision)
    examples = load_examples(cfg.data, "train", tok)
    questions = choose_questions(examples, policy, cfg.rollout.max_new_tokens, cfg.iterative.questions, seed)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    reward = build_reward(rm.reward, policy.device, checker=answer_checker(cfg.data))
    with torch.no_grad():
        return sample_questions(
            policy,
            examples,
            questions,
            k=cfg.iterative.samples_per_question,
            rollout=cfg.rollout,
            generator=generator,
            score=functools.partial(score_batch, reward, tokenizer=tok),
        )


def with_replay(fresh: List[Dict], history: List[Dict], share: float, seed: int) -> List[Dict]:
    """``fresh`` plus historical rows making up ``share`` of the result (as many as the buffer has)."""
    want = round(share / (1 - share) * len(fresh)) if share < 1 else len(history)
    return fresh + random.Random(seed).sample(history, min(want, len(history)))


def finished_iterations(run: Path, resume: bool) -> List[Dict]:
    path = run / "iterations.jsonl"
    if not path.exists():
        return []
    if not resume:
        raise UserError(
            f"output_dir: {run} already holds iterations; pass resume=true to continue it, or another output_dir"
        )
    return read_jsonl_rows(path)


def metrics_of(run: Path, *keys: str) -> Dict[str, float]:
    """The last metrics row's values of ``keys`` (a key ending in ``_`` is a prefix)."""
    last = last_row(run)
    return {
        k: round(v, 4)
        for k, v in last.items()
        if any(k == key or (key.endswith("_") and k.startswith(key)) for key in keys) and isinstance(v, float)
    }


def evaluate_policy(cfg: DictConfig, policy: Path, out: Path) -> float:
    ev = derived(cfg, output_dir=out)
    with open_dict(ev):
        ev.eval.run, ev.eval.output_dir, ev.eval.limit, ev.eval.n = str(policy), str(out), cfg.iterative.eval_limit, 0
        ev.eval.split = "test"  # held-out questions: `grpo train` reads no eval.* key (grpo_cli.config.usage)
    return float(evaluate_model(ev)["accuracy"])


def read_jsonl_rows(path: Path) -> List[Dict]:
    """The rows of a JSONL file of this run (none when it does not exist yet)."""
    return [row for _, row in read_jsonl(path)] if path.exists() else []


def write_rows(path: Path, rows: List[Dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_samples(rows, path)


def append_samples(path: Path, rows: List[Dict]) -> None:
    write_rows(path, read_jsonl_rows(path) + rows)  # rewritten atomically: a kill never truncates the buffer


def link_final(run: Path, policy: Path) -> None:
    """``<run>/checkpoints/final`` -> the last policy, so ``grpo eval run=<run>`` evaluates it."""
    link = run / "checkpoints" / "final"
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to((policy / "checkpoints" / "final").resolve(), target_is_directory=True)
