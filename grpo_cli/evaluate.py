"""``grpo eval``: greedy pass@1 of a run or model on a task's split, or scoring of a samples file.

Writes ``eval.json`` (``accuracy`` and counts; with ``eval.n > 0`` also ``maj@K`` and ``pass@K`` for
each K of ``eval.ks``, see :mod:`grpo_cli.metrics`) and ``samples.jsonl`` (one row per question:
prompt, greedy completion, the token it stopped at (``stopped_at``: EOS, a chat model's end of turn, or
null when cut at ``rollout.max_new_tokens``), extracted answer, reference answer, correct, and the
sampled answers) to
``eval.output_dir``, else to ``<run>/eval/<data>-<split>[-limitN][-nN]-<hash>/`` (:func:`eval_name`),
one directory per evaluation, with ``<run>/eval/latest`` pointing at the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.table import Table

from grpo_cli.console import console
from grpo_cli.data import load_examples
from grpo_cli.data.loaders import read_jsonl
from grpo_cli.errors import UserError
from grpo_cli.generation import check_rollout, rollout_options, sample_batch
from grpo_cli.metrics import sampling_metrics
from grpo_cli.models.device import pick_device
from grpo_cli.models.load import load_model_and_tokenizer, resolve_model_dir
from grpo_cli.models.policy import autocast
from grpo_cli.rewards.checkers import AnswerChecker, answer_checker

INHERITED = ("data", "rollout")
"""Sections of a run's config.yaml that ``grpo eval run=<dir>`` reuses unless overridden."""


def inherit_run_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Take the task and sampling settings of the run being evaluated, except those overridden."""
    run = Path(cfg.eval.run) if cfg.eval.run else None
    saved = run / "config.yaml" if run is not None else None
    if saved is None or not saved.is_file():
        return cfg
    prior = OmegaConf.load(saved)
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    touched = {k.split(".")[0] for k in keys}
    for section in INHERITED:
        if section not in touched and section in prior:
            cfg[section] = OmegaConf.merge(cfg[section], prior[section])
    inherit_tools(cfg, prior, keys, run)
    return cfg


TOOL_KEYS = ("tools", "environment", "max_turns", "tool_timeout_s")
"""The ``rollout`` fields of a multi-turn run that ``grpo eval`` keeps even where ``rollout.*`` is overridden."""


def inherit_tools(cfg: DictConfig, prior: DictConfig, keys: set, run: Path) -> None:
    """A run trained with tools is evaluated with them: where the command sets neither
    ``rollout.tools`` nor ``rollout.environment``, take the run's tool settings (the rest of
    ``rollout`` may be overridden), and say so in one line."""
    saved = prior.get("rollout") or {}
    if not (saved.get("tools") or saved.get("environment")):
        return
    if {"rollout.tools", "rollout.environment"} & keys:
        return
    for key in TOOL_KEYS:
        if key in saved and f"rollout.{key}" not in keys:
            cfg.rollout[key] = saved[key]
    what = f"tools={list(cfg.rollout.tools)}" if cfg.rollout.tools else f"environment={cfg.rollout.environment}"
    console.print(
        f"eval: multi-turn rollouts as the run was trained ({what}, from {run / 'config.yaml'})",
        highlight=False,
        soft_wrap=True,
    )


def evaluate_model(cfg: DictConfig) -> Dict[str, object]:
    """Greedy pass@1 of ``cfg.eval.run`` on ``cfg.data``'s ``cfg.eval.split``, plus the sampling
    metrics when ``cfg.eval.n > 0``."""
    if not cfg.eval.run:
        raise UserError("eval: pass run=<run dir, checkpoint, model dir or hub name> or samples=<file.jsonl>")
    check_sampling(cfg)
    if cfg.eval.run != "tiny":
        resolve_model_dir(cfg.eval.run, key="run")  # a missing run is named as the user wrote it
    autocast(cfg.trainer.precision, torch.device("cpu"))  # a bad value fails before the model loads
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    with open_dict(cfg):
        cfg.model.name_or_path = cfg.eval.run
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    device = pick_device(cfg.trainer.device)
    model.to(device).eval()
    check_rollout(cfg.rollout, device)
    examples = load_examples(cfg.data, cfg.eval.split, tok)[: cfg.eval.limit or None]
    checker = SafeChecker(answer_checker(cfg.data))
    t0 = time.perf_counter()
    with autocast(cfg.trainer.precision, device):
        greedy, gens = sample_batch(
            model,
            tok,
            examples,
            group=torch.arange(len(examples)),
            checker=checker.checker,
            **rollout_options(cfg.rollout, temperature=0.0),
        )
        rows = [score_row(e.prompt, text, e.answer, checker) for e, text in zip(examples, greedy.completions)]
        for row, g in zip(rows, gens):  # the token it stopped at (EOS, a chat model's end of turn), or None
            row["stopped_at"] = tok.convert_ids_to_tokens(g.completion_ids[-1]) if g.finished else None
            if g.model_written is not None:  # a multi-turn rollout: the model's turns (observations + 1)
                row["turns"] = g.turns
        sampled = sample_answers(model, tok, examples, rows, cfg, checker) if cfg.eval.n > 0 else {}
    out_dir = eval_output_dir(cfg)
    result = accuracy_summary(
        rows, checker, model=resolve_model_dir(cfg.eval.run), split=cfg.eval.split, data=cfg.data.name
    )
    result = {"accuracy": result.pop("accuracy"), **sampled, **result}  # the metrics first, then counts
    if sampled:
        result.update(n=cfg.eval.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write_results(out_dir, result, rows, latest=not cfg.eval.output_dir)
    return result


def check_sampling(cfg: DictConfig) -> None:
    """The sampling settings make sense together (checked before the model loads)."""
    n, ks = cfg.eval.n, list(cfg.eval.ks)
    if n < 0:
        raise UserError(f"eval.n: expected 0 (greedy only) or a number of samples per question, got {n}")
    if n == 0:
        return
    if not ks or any(k < 1 or k > n for k in ks):
        raise UserError(f"eval.ks: each K must be in 1..eval.n={n}, got {ks}")
    if cfg.rollout.temperature <= 0:
        # n greedy samples are n copies: maj@K and pass@K would silently equal the greedy accuracy.
        raise UserError("eval.n > 0 samples at rollout.temperature, which is 0 (greedy): set rollout.temperature=1.0")


class SafeChecker:
    """The run's answer checker for ``grpo eval``: a comparison that raises (math-verify on odd LaTeX)
    counts as incorrect and in ``checker_errors``, as the reward guard does in training, instead of
    ending the evaluation."""

    def __init__(self, checker: AnswerChecker):
        self.checker, self.errors = checker, 0

    def extract(self, text: str) -> Optional[str]:
        return self.checker.extract(text)

    def match(self, pred: Optional[str], gold: str) -> bool:
        try:
            return bool(self.checker.match(pred, gold))
        except Exception:  # whatever the verifier raises on one answer
            self.errors += 1
            return False


def sample_answers(
    model, tok, examples, rows: List[Dict[str, object]], cfg: DictConfig, checker: SafeChecker
) -> Dict[str, float]:
    """Sample ``eval.n`` completions per question; add their answers to ``rows``; maj@K and pass@K."""
    n = cfg.eval.n
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.eval.seed)
    batch, _ = sample_batch(
        model,
        tok,
        [e for e in examples for _ in range(n)],
        generator=generator,
        group=torch.arange(len(examples)).repeat_interleave(n),
        checker=checker.checker,
        **rollout_options(cfg.rollout),
    )
    texts = batch.completions
    answers = [[checker.extract(t) for t in texts[i * n : (i + 1) * n]] for i in range(len(examples))]
    for row, found in zip(rows, answers):
        row["sampled"] = found
        row["sampled_correct"] = sum(checker.match(a, str(row["answer"])) for a in found)
    return sampling_metrics(answers, [e.answer for e in examples], list(cfg.eval.ks), match=checker.match)


def score_row(prompt: str, completion: str, answer: str, checker: SafeChecker) -> Dict[str, object]:
    pred = checker.extract(completion)
    return {
        "prompt": prompt,
        "completion": completion,
        "extracted": pred,
        "answer": answer,
        "correct": checker.match(pred, answer),
    }


def score_samples(cfg: DictConfig) -> Dict[str, object]:
    """Score a JSONL of completions produced elsewhere with the same verifier (``data.answer_checker``:
    ``grpo eval samples=F data=math`` reads ``\\boxed{}`` answers and compares them with math-verify)."""
    path = Path(cfg.eval.samples)
    if cfg.eval.n:
        raise UserError("eval.n samples a model (run=...); a samples file is scored as it is: drop eval.n")
    if not path.is_file():
        raise UserError(f"eval.samples: no such file '{path}'")
    checker = SafeChecker(answer_checker(cfg.data))
    rows: List[Dict[str, object]] = []
    for where, obj in read_jsonl(path):
        for key, field in (("completion_field", cfg.eval.completion_field), ("answer_field", cfg.eval.answer_field)):
            if field not in obj:
                raise UserError(f"{where}: missing field '{field}' (eval.{key})")
        completion, answer = str(obj[cfg.eval.completion_field]), str(obj[cfg.eval.answer_field])
        rows.append(score_row(str(obj.get("prompt", "")), completion, answer, checker))
    if not rows:
        raise UserError(f"{path}: no samples")
    result = accuracy_summary(rows, checker, samples=str(path))
    write_results(eval_output_dir(cfg), result, rows, latest=not cfg.eval.output_dir)
    return result


def accuracy_summary(rows: List[Dict[str, object]], checker: SafeChecker, **info) -> Dict[str, object]:
    """Accuracy and counts; ``checker`` names the answer rule, and its errors when there were any."""
    correct = sum(bool(r["correct"]) for r in rows)
    no_answer = sum(r["extracted"] is None for r in rows)
    counts = {"correct": correct, "total": len(rows), "no_answer": no_answer, "checker": checker.checker.name}
    if checker.errors:
        counts["checker_errors"] = checker.errors
    return {"accuracy": correct / len(rows), **counts, **info}


def eval_output_dir(cfg: DictConfig) -> Path:
    """``eval.output_dir``, else ``<run>/eval/<eval_name>`` for a run or model directory, else
    ``runs/eval/<timestamp>`` (a hub model, a samples file)."""
    if cfg.eval.output_dir:
        return Path(cfg.eval.output_dir)
    if cfg.eval.run and Path(cfg.eval.run).is_dir():
        return Path(cfg.eval.run) / "eval" / eval_name(cfg)
    return Path("runs") / "eval" / datetime.now().strftime("%Y%m%d-%H%M%S")


def eval_name(cfg: DictConfig) -> str:
    """``arithmetic-test-limit200-n16-3f9a2c``: the data set, split, limit and samples, then a hash of
    every setting that changes the result. A second evaluation with other settings (another data set)
    gets its own directory and keeps the first; the same one again replaces its earlier self."""
    data = cfg.data.name
    if cfg.data.path and cfg.data.name != "arithmetic":
        stem = Path(str(cfg.data.path).rstrip("/")).stem
        data += f"-{stem}" if stem and stem != data else ""
    parts = [data, cfg.eval.split]
    parts += [f"limit{cfg.eval.limit}"] if cfg.eval.limit else []
    parts += [f"n{cfg.eval.n}"] if cfg.eval.n > 0 else []
    settings = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "split": cfg.eval.split,
        "limit": cfg.eval.limit,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "precision": cfg.trainer.precision,
        "dtype": cfg.model.dtype,
    }
    if cfg.eval.n > 0:
        settings.update(
            n=cfg.eval.n,
            ks=list(cfg.eval.ks),
            seed=cfg.eval.seed,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
        )
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(map(str, parts))) + "-" + digest


def write_results(out: Path, result: Dict[str, object], rows: List[Dict[str, object]], latest: bool = False) -> None:
    """``eval.json`` and ``samples.jsonl`` in ``out``; with ``latest``, ``out/../latest`` points at it."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if latest:
        link_latest(out)
    result["output_dir"] = str(out)


def link_latest(out: Path) -> None:
    """``<parent>/latest`` -> ``out`` (relative), swapped in one rename so readers never miss it."""
    tmp = out.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(out.name, target_is_directory=True)
    os.replace(tmp, out.parent / "latest")


def results_table(result: Dict[str, object], title: str = "evaluation") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key == "output_dir":
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table
