"""Data parallel on CPU with gloo (docs/distributed.md): 2 processes equal 1 process at the same global batch.

The slow tests share one ``torchrun --nproc_per_node=2`` launch of tests/distributed_worker.py (one
start-up for every job); each compares its job with the same run in this process. Rollouts in the
compared GRPO runs are deterministic (``fake_generate``): real sampling gives each rank its own random
stream, so a 2-process GRPO run equals a 1-process one in distribution only (test_sampling_...).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose, register_length_rewards, rows
from distributed_worker import PROMPTS, fake_generate, fixed_batch

from grpo_cli.algorithms import build_algorithm
from grpo_cli.errors import UserError
from grpo_cli.models.device import pick_device
from grpo_cli.trainer import loop
from grpo_cli.trainer.distributed import LOCAL, rank_seed, shard

CPU = ["trainer.device=cpu", "trainer.threads=1"]  # gloo on CPU, also on a machine with a GPU
GRPO = [
    "model.name_or_path=tiny",
    "reward.name=length_mod_3",
    "source.prompts_per_step=4",
    "source.group_size=4",
    "trainer.lr=1e-2",
    *CPU,
]
RUNS = {  # name: (recipe, fake rollouts, overrides); the same in both processes and in this one
    "sft_ddp": ("sft_arithmetic", False, ["trainer.steps=3", "trainer.batch_size=8", *CPU]),
    "sft_fsdp": (
        "sft_arithmetic",
        False,
        ["trainer.steps=3", "trainer.batch_size=8", *CPU, "trainer.distributed=fsdp"],
    ),
    # SGD: LoRA's lora_A gradients are 0 at step 1 (B = 0) and tiny after, and AdamW's per-coordinate
    # normalisation turns float-summation-order noise there into updates of up to lr (measured: 2 of 1024
    # weights 4.7e-5 apart after 3 steps at lr 3e-2, every loss equal to 1e-5)
    "grpo_ddp_lora": (
        "grpo_arithmetic",
        True,
        [
            *GRPO,
            "trainer.steps=3",
            "lora.enabled=true",
            "trainer.optimizer=sgd",
            "trainer.lr=0.5",
            "trainer.grad_accum=2",
            "algorithm.aggregation=token",
        ],
    ),
    "grpo_fsdp": ("grpo_arithmetic", True, [*GRPO, "trainer.steps=3", "trainer.distributed=fsdp"]),
    # PPO's value model trains beside the policy; whitening would use each rank's slice only: off here
    "ppo_ddp": ("ppo_arithmetic", True, [*GRPO, "trainer.steps=3", "algorithm.whiten_advantages=false"]),
}
SAMPLED = [
    "grpo_arithmetic",
    [*GRPO, "source.group_size=2", "trainer.steps=4", "trainer.save_every=2", "trainer.keep_checkpoints=4"],
]
GRADIENT_CASES = {  # name: (recipe, strategy, overrides) for one SGD step on a fixed batch
    "grpo_sequence": ("grpo_arithmetic", "ddp", "algorithm.aggregation=sequence"),
    "grpo_token_micro": ("grpo_arithmetic", "ddp", "algorithm.aggregation=token", "trainer.grad_accum=2"),
    "grpo_constant": ("grpo_arithmetic", "ddp", "algorithm.aggregation=constant"),
    "grpo_lora": ("grpo_arithmetic", "ddp", "lora.enabled=true"),
    "dpo_sft_weight": ("dpo_arithmetic", "ddp", "algorithm.sft_weight=1.0"),
    "sft": ("sft_arithmetic", "ddp"),
    "grpo_fsdp_token": ("grpo_arithmetic", "fsdp", "algorithm.aggregation=token"),
    "grpo_fsdp_lora": ("grpo_arithmetic", "fsdp", "lora.enabled=true"),
}


def weights(run: Path):
    from safetensors.torch import load_file

    final = run / "checkpoints" / "final"
    return load_file(
        final / ("adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors")
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every 2-process job, in one torchrun launch; returns its output directory."""
    out = tmp_path_factory.mktemp("dist")
    jobs = [
        {"kind": "train", "recipe": recipe, "fake_rollouts": fake, "args": [*args, f"output_dir={out / name}"]}
        for name, (recipe, fake, args) in RUNS.items()
    ]
    jobs += [
        {"kind": "train", "recipe": SAMPLED[0], "args": [*SAMPLED[1], f"output_dir={out / 'sampled'}"]},
        {
            "kind": "train",
            "recipe": SAMPLED[0],
            "args": [
                *GRPO,
                "trainer.steps=2",
                "trainer.distributed=fsdp",
                "lora.enabled=true",
                f"output_dir={out / 'sampled_fsdp'}",
            ],
        },
        {
            "kind": "copy",
            "src": str(out / "sampled"),
            "dst": str(out / "cut"),
            "remove": ["checkpoints/final", "checkpoints/step_000004"],
        },
        {"kind": "train", "recipe": SAMPLED[0], "args": [*SAMPLED[1], f"output_dir={out / 'cut'}", "resume=true"]},
        {"kind": "gradients", "cases": GRADIENT_CASES},
        {"kind": "fsdp_generation"},
    ]
    (out / "spec.json").write_text(json.dumps({"out": str(out), "jobs": jobs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "distributed_worker.py"),
            str(out / "spec.json"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def one_process(name: str, tmp_path: Path, monkeypatch) -> Path:
    """The same run as the 2-process job ``name``, in this process."""
    import grpo_cli.generation as generation

    recipe, fake, args = RUNS[name]
    register_length_rewards(monkeypatch)
    if fake:
        monkeypatch.setattr(generation, "generate", fake_generate)
    return loop.train(compose(recipe, *args, f"output_dir={tmp_path / name}"))


# ----------------------------------------------------------------------------- without processes


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("grpo_arithmetic", ["algorithm.aggregation=sequence"]),
        ("grpo_arithmetic", ["algorithm.aggregation=token"]),
        ("grpo_arithmetic", ["algorithm.aggregation=constant"]),
        ("dpo_arithmetic", ["algorithm.sft_weight=1.0"]),
        ("sft_arithmetic", []),
    ],
)
def test_rank_losses_normalised_by_global_totals_add_up_to_the_global_gradient(tmp_path, recipe, overrides):
    """The normalisation the ranks use, without processes: the gradients of two slices of whole groups,
    each normalised by the whole batch's totals (what ``global_totals`` gives), sum to the batch's."""
    from grpo_cli.models.load import load_model_and_tokenizer

    cfg = compose(recipe, "model.name_or_path=tiny", f"output_dir={tmp_path}", *overrides)
    algorithm = build_algorithm(cfg.algorithm)
    policy = loop.build_policy(cfg, algorithm, tmp_path, torch.device("cpu"), load_model_and_tokenizer(cfg.model))
    G = 2 if cfg.algorithm.name == "dpo" else 4

    def gradient(prompts, totals=None):
        policy.model.zero_grad()
        batch = algorithm.prepare(fixed_batch(policy.tokenizer, prompts, G, pairs=G == 2), policy)
        batch.totals.update(totals or {})
        algorithm.loss(batch, policy)[0].backward()
        return [p.grad.clone() for p in policy.model.parameters() if p.grad is not None], batch.totals

    whole, totals = gradient(PROMPTS)
    counts = {k: v for k, v in totals.items() if k not in ("temperature", "max_tokens")}
    halves = [gradient(shard(PROMPTS, r, 2), counts)[0] for r in range(2)]
    for w, a, b in zip(whole, *halves):
        torch.testing.assert_close(a + b, w, rtol=1e-5, atol=1e-7)


def test_each_rank_takes_its_slice_of_the_same_global_batch(tmp_path, monkeypatch):
    import grpo_cli.generation as generation
    from grpo_cli.data import load_examples
    from grpo_cli.models.load import load_model_and_tokenizer
    from grpo_cli.trainer.source_registry import build_source

    monkeypatch.setattr(generation, "generate", fake_generate)
    for recipe, key in [("sft_arithmetic", "trainer.batch_size"), ("grpo_arithmetic", "source.prompts_per_step")]:
        cfg = compose(recipe, "model.name_or_path=tiny", f"{key}=4")
        algorithm = build_algorithm(cfg.algorithm)
        policy = loop.build_policy(cfg, algorithm, tmp_path, torch.device("cpu"), load_model_and_tokenizer(cfg.model))
        examples = load_examples(cfg.data, "train")

        def source(rank, world):
            return build_source(
                cfg.source,
                examples=examples,
                policy=policy,
                batch_size=4,
                rollout=cfg.rollout,
                seed=0,
                reward=None,
                run=None,
                rank=rank,
                world_size=world,
            )

        whole, rank0, rank1 = [
            [s.next_batch(policy) for _ in range(2)] for s in (source(0, 1), source(0, 2), source(1, 2))
        ]
        for step in range(2):
            assert rank0[step].prompts + rank1[step].prompts == whole[step].prompts
        with pytest.raises(UserError, match=rf"^{re.escape(key)}=4: must be a multiple of the 3 processes"):
            source(0, 3)


def test_ranks_sample_from_their_own_streams():
    assert rank_seed(7, 0) == 7  # one process samples exactly as before
    seeds = {rank_seed(s, r) for s in range(4) for r in range(4)} | {rank_seed(0, 1, step) for step in range(3)}
    assert len(seeds) == 16 + 3


def test_one_process_is_the_local_no_op():
    row = {"step": 1, "loss": 0.5}
    assert pick_device("cpu") == LOCAL.device and LOCAL.mean_metrics(row) is row and LOCAL.sum(2.0) == 2.0
    assert not LOCAL.any(False) and not LOCAL.enabled and LOCAL.is_main


# ----------------------------------------------------------------------------- 2 processes (gloo)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_two_process_update_equals_the_one_process_update_of_the_global_batch(two_processes, case):
    """One SGD step (lr 1, so weights before - after = the gradient) on a fixed batch of 4 groups: 2
    ranks with 2 groups each, gradients summed (ddp) or reduce-scattered (fsdp), against 1 process."""
    gap = json.loads((two_processes / "gradients.json").read_text())[case]
    assert gap["same_keys"] and gap["max_abs_grad"] > 1e-4, gap
    assert gap["max_abs_gap"] <= 1e-6 * max(1.0, gap["max_abs_grad"]), gap


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_process_run_equals_the_one_process_run(two_processes, tmp_path, monkeypatch, name):
    """SFT and GRPO (deterministic rollouts; LoRA with micro-batches; fsdp): the loss of every step and
    the final weights equal the 1-process run's at the same global batch."""
    single = one_process(name, tmp_path, monkeypatch)
    two, one = rows(two_processes / name), rows(single)
    assert [r["step"] for r in two] == [1, 2, 3] and [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for key in ("loss", "grad_norm", "lr", *(["reward_mean", "accuracy"] if "grpo" in name else [])):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-7), key
    a, b = weights(two_processes / name), weights(single)
    assert sorted(a) == sorted(b) and all(r["grad_norm"] > 1e-3 for r in two)  # every step trained
    assert not any("lora_B" in k and not bool(v.any()) for k, v in a.items())  # LoRA: B moved off its zero init
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sampling_runs_resume_exactly_at_the_same_world_size_and_at_another(
    two_processes, tmp_path, capsys, monkeypatch
):
    """Real sampling (each rank its own stream): the resumed 2-process run repeats the uninterrupted one;
    one process can continue it (new streams for the missing rank, the data order kept)."""
    full, cut = two_processes / "sampled", two_processes / "cut"
    assert len(rows(full)) == 4 and rows(cut) == rows(full)
    state = torch.load(full / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=True)
    assert len(state["ranks"]) == 2 and not torch.equal(*(r["source"]["generator"] for r in state["ranks"]))
    import shutil

    shutil.copytree(full, tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "checkpoints" / "final")
    shutil.rmtree(tmp_path / "one" / "checkpoints" / "step_000004")
    register_length_rewards(monkeypatch)
    again = loop.train(compose(SAMPLED[0], *SAMPLED[1], f"output_dir={tmp_path / 'one'}", "resume=true"))
    assert rows(again)[:2] == rows(full)[:2] and len(rows(again)) == 4
    assert "was saved by 2 processes, this run has 1" in capsys.readouterr().err


@pytest.mark.slow
def test_fsdp_lora_run_with_sampling_trains_and_saves_its_adapter(two_processes):
    """fsdp in the loop with real sampling: rollouts from the gathered blocks, then sharded updates."""
    got = rows(two_processes / "sampled_fsdp")
    assert len(got) == 2 and all(r["grad_norm"] > 0 for r in got) and got[-1]["kl"] > 0
    adapter = weights(two_processes / "sampled_fsdp")
    assert (
        adapter
        and all("lora_" in k for k in adapter)
        and any(bool(v.any()) for k, v in adapter.items() if "lora_B" in k)
    )


@pytest.mark.slow
def test_fsdp_rollouts_with_gathered_weights_equal_the_unsharded_model(two_processes):
    assert json.loads((two_processes / "fsdp_generation.json").read_text()) == {"equal": True, "rows": len(PROMPTS)}
