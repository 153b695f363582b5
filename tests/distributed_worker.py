"""The multi-process side of tests/test_distributed.py, one process per rank:

    torchrun --nproc_per_node=2 tests/distributed_worker.py SPEC.json

SPEC holds ``jobs``, run in order by every rank in one process group (one start-up for all):
``train`` (``grpo train`` through the CLI entry point), ``copy`` (rank 0 copies a run directory) and
``gradients`` (one optimiser step on a fixed batch, compared with one process on the whole batch).
``fake_rollouts`` replaces sampling by :func:`fake_generate`, so the global batch does not depend on
how the questions are split over ranks and the 2-process run can equal the 1-process one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as torch_dist
from conftest import TINY, compose, length_mod_3

PROMPTS = ["3+4\n", "12-5*2\n", "7*8\n", "9-1+2\n"]


def fake_generate(model, tokenizer, prompts: List[str], *, max_new_tokens: int, **_):
    """Deterministic 'samples': member j of a prompt's group gets j + 1 copies of a digit, then an
    answer; lengths (so ``length_mod_3`` rewards) differ within a group. No randomness, no model."""
    from grpo_cli.generation import Generation

    out = []
    for i, prompt in enumerate(prompts):
        j = prompts[:i].count(prompt)  # members of a group are contiguous
        text = str(len(prompt) % 10) * (j + 1) + f"\n#### {j}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_new_tokens - 1] + [tokenizer.eos_token_id]
        out.append(Generation(tokenizer(prompt, add_special_tokens=False)["input_ids"], ids, text, True))
    return out


def install(fake_rollouts: bool) -> None:
    """The test reward (registered by name) and, if asked, the deterministic rollouts."""
    import grpo_cli.generation as generation
    from grpo_cli.rewards.registry import REWARDS

    REWARDS["length_mod_3"] = lambda cfg: length_mod_3
    if not hasattr(generation, "_real_generate"):
        generation._real_generate = generation.generate
    generation.generate = fake_generate if fake_rollouts else generation._real_generate


def fixed_batch(tok, prompts: List[str], group_size: int, pairs: bool):
    """The batch an online source (or, ``pairs``, a pairs source) would serve for ``prompts``."""
    from grpo_cli.batch import Batch, pack

    chosen = [p for p in prompts for _ in range(group_size)]
    gens = fake_generate(None, tok, chosen, max_new_tokens=24)
    ids, attn, comp = pack([g.prompt_ids for g in gens], [g.completion_ids for g in gens], tok.pad_token_id)
    batch = Batch(
        ids,
        attn,
        comp,
        chosen,
        [g.text for g in gens],
        ["0"] * len(gens),
        torch.arange(len(prompts)).repeat_interleave(group_size),
    )
    batch.rewards = torch.tensor([1.0, 0.0] * len(prompts)) if pairs else length_mod_3(batch)
    batch.totals.update(temperature=1.0, max_tokens=24.0)
    return batch.with_totals()


def one_update(cfg, dist, prompts: List[str], pairs: bool) -> Dict[str, torch.Tensor]:
    """SGD (lr 1, no clipping) on the batch of ``prompts``: returns the full weights before - after,
    i.e. the gradient (rank 0; every rank takes part)."""
    from grpo_cli.algorithms import build_algorithm
    from grpo_cli.models.load import load_model_and_tokenizer
    from grpo_cli.trainer import loop
    from grpo_cli.trainer.optim import build_optimizer

    torch.manual_seed(0)
    algorithm = build_algorithm(cfg.algorithm)
    policy = loop.build_policy(
        cfg, algorithm, Path(cfg.output_dir), torch.device("cpu"), load_model_and_tokenizer(cfg.model)
    )
    with torch.no_grad():  # move off the reference so the KL term has a gradient
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    policy = dist.prepare(policy)
    before = full_weights(dist, policy.model)
    opt, sched = build_optimizer(policy.trainable(), cfg.trainer, algorithm.updates_per_batch)
    batch = algorithm.prepare(fixed_batch(policy.tokenizer, prompts, 2 if pairs else 4, pairs), policy)
    loop.optimise(dist.global_totals(batch), algorithm, policy, opt, sched, cfg.trainer.grad_accum, 0.0, dist)
    after = full_weights(dist, policy.model)
    return {k: before[k] - after[k] for k in after}


def full_weights(dist, model) -> Dict[str, torch.Tensor]:
    gathered = dist.gathered_state(model)
    state = gathered if gathered is not None else model.state_dict()
    return {k: v.detach().clone() for k, v in state.items() if v.dtype.is_floating_point}


def gradients(job: dict, out: Path) -> None:
    """The 2-process gradient of the global batch against one process's, for each case."""
    from grpo_cli.trainer.distributed import LOCAL, init_distributed

    gaps = {}
    for name, (recipe, strategy, *overrides) in job["cases"].items():
        cfg = compose(
            recipe,
            "model.name_or_path=tiny",
            "trainer.optimizer=sgd",
            "trainer.lr=1.0",
            "trainer.weight_decay=0",
            "trainer.schedule=constant",
            f"output_dir={out / 'grads'}",
            *overrides,
        )
        pairs = cfg.algorithm.name == "dpo"
        dist = init_distributed(strategy, torch.device("cpu"))
        mine = PROMPTS[dist.rank * 2 : (dist.rank + 1) * 2]
        split = one_update(cfg, dist, mine, pairs)
        single = one_update(cfg, LOCAL, PROMPTS, pairs)
        if dist.is_main:
            scale = max(float(g.abs().max()) for g in single.values())
            gaps[name] = {
                "max_abs_gap": max(float((split[k] - single[k]).abs().max()) for k in single),
                "max_abs_grad": scale,
                "tensors": len(single),
                "same_keys": sorted(split) == sorted(single),
            }
    if torch_dist.get_rank() == 0:
        (out / "gradients.json").write_text(json.dumps(gaps, indent=1))


def fsdp_generation(out: Path) -> None:
    """Greedy rollouts of an FSDP-sharded model (full weights gathered) equal the unsharded model's."""
    from grpo_cli.generation import generate
    from grpo_cli.models.load import load_model_and_tokenizer
    from grpo_cli.trainer.distributed import init_distributed, shard_blocks

    install(False)
    model, tok, _ = load_model_and_tokenizer(compose("sft_arithmetic").model)
    expected = [g.completion_ids for g in generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0)]
    shard_blocks(model)
    with init_distributed("fsdp", torch.device("cpu")).full_weights(model):
        got = [g.completion_ids for g in generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0)]
    if torch_dist.get_rank() == 0:
        (out / "fsdp_generation.json").write_text(json.dumps({"equal": got == expected, "rows": len(got)}))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo")
    from grpo_cli.cli import main as cli

    for job in spec["jobs"]:
        if job["kind"] == "train":
            install(job.get("fake_rollouts", False))
            cli(["train", f"recipe={job['recipe']}", *TINY, *job["args"]])
        elif job["kind"] == "copy" and torch_dist.get_rank() == 0:
            shutil.copytree(job["src"], job["dst"])
            for name in job.get("remove", []):
                shutil.rmtree(Path(job["dst"]) / name)
        elif job["kind"] == "gradients":
            gradients(job, out)
        elif job["kind"] == "fsdp_generation":
            fsdp_generation(out)
        torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
