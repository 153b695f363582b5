"""Reliability (docs/reliability.md): exact resume, signals, kill -9 during saves, NaN guards, rewards
that raise or hang, bad input, and the security rules. Tiny models on CPU, a few seconds each."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, TINY_EVAL, compose, rows

from grpo_cli.algorithms import build_algorithm
from grpo_cli.algorithms.sft import SFT
from grpo_cli.batch import Batch, pack
from grpo_cli.cli import main
from grpo_cli.data import load_examples
from grpo_cli.errors import Interrupted, UserError
from grpo_cli.models.load import load_model_and_tokenizer, load_weights
from grpo_cli.rewards.registry import build_reward
from grpo_cli.trainer import loop, memory
from grpo_cli.trainer.checkpoint import STATE_FILE, Checkpointer, RunState, latest_checkpoint, list_checkpoints, recover
from grpo_cli.trainer.optim import build_optimizer
from grpo_cli.trainer.source_registry import build_source


def tiny_checkpointer(run: Path, *overrides: str) -> Checkpointer:
    """The pieces of a tiny SFT run, without training: a Checkpointer over them."""
    cfg = compose("sft_arithmetic", "trainer.batch_size=4", f"output_dir={run}", *overrides)
    algorithm = build_algorithm(cfg.algorithm)
    policy = loop.build_policy(cfg, algorithm, run, torch.device("cpu"), load_model_and_tokenizer(cfg.model))
    source = build_source(
        cfg.source,
        examples=load_examples(cfg.data, "train"),
        policy=policy,
        batch_size=4,
        rollout=cfg.rollout,
        seed=0,
        reward=None,
        run=run,
    )
    opt, sched = build_optimizer(policy.model, cfg.trainer, 1)
    return Checkpointer(run, policy, opt, sched, source, algorithm, keep=2)


# ----------------------------------------------------------------------------- 1. exact resume


@pytest.mark.slow
def test_sft_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    common = ["trainer.steps=6", "trainer.batch_size=8", "trainer.save_every=3", "trainer.keep_checkpoints=5"]
    full = loop.train(compose("sft_arithmetic", *common, f"output_dir={tmp_path / 'full'}"))
    # The same run "interrupted" after step 3: its later checkpoints and metrics rows must go.
    shutil.copytree(full, tmp_path / "cut")
    resumed = loop.train(compose("sft_arithmetic", *common, f"resume={tmp_path / 'cut/checkpoints/step_000003'}"))
    assert resumed == (tmp_path / "cut").resolve()
    assert len(rows(resumed)) == 6 and rows(resumed) == rows(full)
    assert sorted(p.name for _, p in list_checkpoints(resumed / "checkpoints")) == [
        "final",
        "step_000003",
        "step_000006",
    ]
    for a, b in zip(_weights(full), _weights(resumed)):
        assert torch.equal(a, b)


def _weights(run: Path):
    from safetensors.torch import load_file

    return list(load_file(run / "checkpoints" / "final" / "model.safetensors").values())


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_grpo_resume_with_sampling_equals_the_uninterrupted_run(sft_run, tmp_path, lora, length_rewards):
    """Online sampling (temperature 1), a reward that varies within groups, the reference model (KL)."""
    common = [
        f"model.name_or_path={sft_run}",
        f"lora.enabled={lora}",
        "reward.name=length_mod_3",
        "trainer.steps=4",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "trainer.lr=1e-2",
        "trainer.save_every=2",
        "trainer.keep_checkpoints=4",
    ]
    full = loop.train(compose("grpo_arithmetic", *common, f"output_dir={tmp_path / 'full'}"))
    shutil.copytree(full, tmp_path / "cut")
    for name in ("final", "step_000004"):  # as if killed after the step-2 checkpoint
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / name)
    resumed = loop.train(compose("grpo_arithmetic", *common, f"output_dir={tmp_path / 'cut'}", "resume=true"))
    assert rows(resumed) == rows(full)
    assert rows(full)[-1]["kl"] > 0  # the resumed steps are measured against the start model


@pytest.mark.slow
def test_resume_true_continues_the_recipes_latest_run_and_warns_about_changed_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(REPO / "recipes"))
    first = loop.train(compose("sft_arithmetic", "trainer.steps=2", "trainer.batch_size=4", "trainer.save_every=1"))
    again = loop.train(
        compose("sft_arithmetic", "trainer.steps=3", "trainer.batch_size=4", "trainer.lr=0.01", "resume=true")
    )
    assert again == first.resolve() and [r["step"] for r in rows(again)] == [1, 2, 3]
    err = capsys.readouterr().err
    assert re.search(r"resume from \S+ \(step 2\)", err), err
    assert re.search(r"resuming with a config that differs from .*: trainer\.lr=0\.01 \(was 0\.003\)", err), err


@pytest.mark.slow
def test_resume_from_a_checkpoint_left_as_old_by_a_kill_between_renames(tmp_path):
    # A save replaces <name> by renaming it to <name>.old, then the new copy in; killed in between,
    # <name>.old is the only copy. resume=true must restore it, not a path renamed under its feet.
    common = ["trainer.batch_size=4", "trainer.save_every=1", f"output_dir={tmp_path}"]
    loop.train(compose("sft_arithmetic", "trainer.steps=2", *common))
    ckpts = tmp_path / "checkpoints"
    for name in ("final", "step_000002"):
        (ckpts / name).rename(ckpts / f"{name}.old")
    again = loop.train(compose("sft_arithmetic", "trainer.steps=3", *common, "resume=true"))
    assert [r["step"] for r in rows(again)] == [1, 2, 3]


@pytest.mark.slow
def test_a_fresh_run_in_a_used_directory_sets_the_old_run_aside(tmp_path):
    common = ["trainer.batch_size=4", "trainer.save_every=1", f"output_dir={tmp_path}"]
    loop.train(compose("sft_arithmetic", "trainer.steps=3", *common))
    loop.train(compose("sft_arithmetic", "trainer.steps=1", *common))  # no resume: a new run
    (previous,) = tmp_path.glob("previous-*")
    assert [r["step"] for r in rows(previous)] == [1, 2, 3] and latest_checkpoint(previous).name == "step_000003"
    assert [r["step"] for r in rows(tmp_path)] == [1] and list_checkpoints(tmp_path / "checkpoints")[-1][0] == 1


def test_resume_errors_are_one_line(tmp_path, capsys):
    for resume, expected in [
        (tmp_path / "nothing", "resume: no run or checkpoint directory"),
        (tmp_path, "resume: no complete checkpoint in"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["train", "recipe=sft_arithmetic", *TINY, f"resume={resume}"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_resume_of_a_finished_run_leaves_it_untouched_and_more_steps_train_on(sft_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run, symlinks=True)  # the fixture is shared: resume a copy
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    main(
        [
            "train",
            "recipe=sft_arithmetic",
            *TINY,
            "trainer.steps=30",
            "trainer.batch_size=16",
            "trainer.lr=0.05",
            f"output_dir={run}",
            "resume=true",
        ]
    )
    err = capsys.readouterr().err
    assert f"already complete (30/30 steps): {run.resolve()}" in err and "done" not in err and "warning" not in err, err
    assert {
        p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
    } == before  # config.yaml, metrics, checkpoints
    again = loop.train(
        compose(
            "sft_arithmetic",
            "trainer.steps=31",
            "trainer.batch_size=16",
            "trainer.lr=3e-3",
            f"output_dir={run}",
            "resume=true",
        )
    )  # trainer.steps may grow
    assert [r["step"] for r in rows(again)] == list(range(1, 32)) and latest_checkpoint(again).name == "final"
    assert "\n  steps: 31\n" in (run / "config.yaml").read_text()


def _noisy_copy(src: Path, dest: Path, model: str = "model.safetensors") -> None:
    """A copy of the model (or run) directory ``src`` with other weights (as if retrained, same shapes)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(dest / model)
    save_file({k: v + 0.5 * torch.randn_like(v) for k, v in weights.items()}, dest / model)


def _lora_run(out: str, start: str, steps: int = 2, *overrides: str) -> Path:
    return loop.train(
        compose(
            "sft_arithmetic",
            "lora.enabled=true",
            "trainer.batch_size=4",
            f"trainer.steps={steps}",
            "trainer.save_every=1",
            f"model.name_or_path={start}",
            f"output_dir={out}",
            *overrides,
        )
    )


def _merged(run) -> dict:
    from grpo_cli.config.schema import ModelConfig

    model, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(run)))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_lora_run_keeps_its_base_when_the_latest_link_moves(sft_run, tmp_path, monkeypatch):
    import yaml

    runs = tmp_path / "runs" / "sft_arithmetic"
    shutil.copytree(sft_run, runs / "a", symlinks=True)
    _noisy_copy(runs / "a", runs / "b", "checkpoints/final/model.safetensors")
    (runs / "latest").symlink_to("a", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(REPO / "recipes"))
    lora = _lora_run("runs/g16", "runs/sft_arithmetic/latest")
    final = lora / "checkpoints" / "final"
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((runs / "a" / "checkpoints" / "final").resolve()) == os.path.realpath(base)
    model = yaml.safe_load((lora / "config.yaml").read_text())["model"]
    assert model["name_or_path"] == "runs/sft_arithmetic/latest" and model["resolved_path"] == base
    before = _merged("runs/g16")
    (runs / "latest").unlink()
    (runs / "latest").symlink_to("b", target_is_directory=True)  # the next run of the recipe
    for cwd, run in [(tmp_path, "runs/g16"), (REPO, str(tmp_path / "runs" / "g16"))]:  # and from elsewhere
        monkeypatch.chdir(cwd)
        after = _merged(run)
        assert all(torch.equal(before[k], after[k]) for k in before)
    main(["eval", f"run={tmp_path / 'runs' / 'g16'}", *TINY_EVAL, "eval.limit=2", f"eval.output_dir={tmp_path / 'ev'}"])
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["total"] == 2
    monkeypatch.chdir(tmp_path)  # resume as typed at the start: from the recorded base, not the moved link
    again = _lora_run("runs/g16", "runs/sft_arithmetic/latest", 3, "resume=true")
    assert (
        json.loads((again / "checkpoints" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == base
    )
    assert [r["step"] for r in rows(again)] == [1, 2, 3]


def test_a_lora_adapter_whose_base_is_gone_or_changed_fails_in_one_line(sft_run, tmp_path, capsys):
    from grpo_cli.models.load import BASE_FILE, base_fingerprint

    shutil.copytree(sft_run / "checkpoints" / "final", tmp_path / "base")
    lora = _lora_run(str(tmp_path / "lora"), str(tmp_path / "base"))
    final = lora / "checkpoints" / "final"
    record = json.loads((final / BASE_FILE).read_text())
    copy_print = base_fingerprint(str(sft_run / "checkpoints" / "final"))  # content, not file times: a copy matches
    assert record["fingerprint"] == base_fingerprint(str(tmp_path / "base")) == copy_print
    _merged(lora)
    shutil.rmtree(tmp_path / "base")
    _noisy_copy(sft_run / "checkpoints" / "final", tmp_path / "base")  # overwritten by another model
    capsys.readouterr()
    for argv, expected in [
        (
            ["eval", f"run={lora}", *TINY_EVAL],
            f"the base model {tmp_path / 'base'} changed since the LoRA adapter in {final}",
        ),
        (
            [
                "train",
                "recipe=sft_arithmetic",
                *TINY,
                "lora.enabled=true",
                "trainer.batch_size=4",
                "trainer.steps=3",
                f"model.name_or_path={tmp_path / 'base'}",
                f"output_dir={lora}",
                "resume=true",
            ],
            f"resume: the base model {tmp_path / 'base'} is not the one the adapter in",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and expected in err and len(err.splitlines()) == 1, err
    (final / BASE_FILE).unlink()  # an adapter saved before fingerprints: loaded unchecked
    _merged(lora)
    shutil.rmtree(tmp_path / "base")
    gone = f"trained on the base model {re.escape(str(tmp_path / 'base'))}, which no longer exists"
    with pytest.raises(UserError, match=gone):
        _merged(lora)


def test_a_lora_run_on_its_own_saved_base_loads_after_the_run_moves(tmp_path):
    lora = _lora_run(str(tmp_path / "here"), "tiny")  # the tiny base exists only in memory: saved in the run
    base = json.loads((lora / "checkpoints" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((tmp_path / "here" / "base_model").resolve())
    before = _merged(lora)
    shutil.move(str(lora), str(tmp_path / "there"))  # copied to another machine, renamed
    after = _merged(tmp_path / "there")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- 2. signals and kill -9


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_resume_continues_exactly(tmp_path):
    common = [*TINY, "trainer.batch_size=4", "trainer.schedule=constant", "trainer.threads=1"]
    run = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grpo_cli.cli",
            "train",
            "recipe=sft_arithmetic",
            *common,
            "trainer.steps=100000",
            f"output_dir={run}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(
        r"interrupted at step (\d+): checkpoint saved to (\S+); resume with resume=true \(or resume=\S+\)", last
    )
    assert m and "Traceback" not in err, err
    step = int(m.group(1))
    assert Path(m.group(2)) == run / "checkpoints" / f"step_{step:06d}" and latest_checkpoint(run) == Path(m.group(2))
    resumed = loop.train(
        compose("sft_arithmetic", *common, f"trainer.steps={step + 2}", f"output_dir={run}", "resume=true")
    )
    full = loop.train(
        compose("sft_arithmetic", *common, f"trainer.steps={step + 2}", f"output_dir={tmp_path / 'full'}")
    )
    assert len(rows(resumed)) == step + 2 and rows(resumed) == rows(full)


@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_restores_the_handlers(tmp_path, monkeypatch):
    original, calls = loop.optimise, []

    def optimise(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step still completes
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "optimise", optimise)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match=r"^interrupted at step 2: checkpoint saved to .*step_000002") as e:
        loop.train(compose("sft_arithmetic", "trainer.steps=50", "trainer.batch_size=4", f"output_dir={tmp_path}"))
    assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert len(rows(tmp_path)) == 2 and latest_checkpoint(tmp_path).name == "step_000002"


def _save_forever(ckpt: Checkpointer, start: int, done) -> None:
    """The writer killed by the test: a restarted run that saves step and final checkpoints non-stop."""
    recover(ckpt.root)
    step = start
    while True:
        step += 1
        ckpt.save(f"step_{step:06d}", RunState(step=step))
        if step % 3 == 0:
            ckpt.save("final", RunState(step=step))  # replaces an existing directory: the .old path
        done.value = step


def test_kill_9_during_saves_never_corrupts_the_latest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ckpt = tiny_checkpointer(tmp_path)
    ctx = multiprocessing.get_context("fork")
    done, last = ctx.RawValue("i", 0), 0  # no lock: a killed writer must not hold one
    for seed in range(10):
        writer = ctx.Process(target=_save_forever, args=(ckpt, last, done), daemon=True)
        writer.start()
        deadline = time.time() + 30
        while done.value <= last:  # at least one save of this writer completed
            assert writer.is_alive() and time.time() < deadline, "the writer died or never saved"
            time.sleep(0.005)
        time.sleep(random.Random(seed).uniform(0.0, 0.25))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        last = done.value
        latest = latest_checkpoint(tmp_path)
        assert latest is not None and list_checkpoints(latest.parent)[-1][0] >= last
        load_weights(ckpt.policy.model, latest)  # complete and loadable, whatever the kill interrupted
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
        assert state["progress"]["step"] >= last and (latest / "tokenizer.json").is_file()
        last = state["progress"]["step"]


# ----------------------------------------------------------------------------- 3. NaN / inf guard


def _batch(policy):
    tok = policy.tokenizer
    ids, attn, comp = pack([tok("3+4\n")["input_ids"]], [tok("3+4=7\n#### 7")["input_ids"]], tok.pad_token_id)
    return Batch(ids, attn, comp, ["3+4\n"], ["3+4=7\n#### 7"], ["7"], torch.zeros(1, dtype=torch.long)).with_totals()


class _Broken(SFT):
    """SFT whose loss is NaN, or finite with a NaN gradient (sqrt of a negative in a dead branch)."""

    def __init__(self, mode):
        self.mode = mode

    def loss(self, batch, policy):
        loss, metrics = super().loss(batch, policy)
        if self.mode == "loss":
            return loss * float("nan"), metrics
        w = next(policy.model.parameters())
        return loss + torch.where(torch.tensor(True), torch.zeros(()), torch.sqrt(-(w.sum() ** 2) - 1)), metrics


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_a_non_finite_update_is_skipped(tmp_path, mode):
    ckpt = tiny_checkpointer(tmp_path)
    policy, opt, sched = ckpt.policy, ckpt.opt, ckpt.sched
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    out = loop.optimise(_batch(policy), _Broken(mode), policy, opt, sched, 1, 1.0)
    assert out["skipped"] == 1 and not (out["loss"] == out["loss"] and out["grad_norm"] == out["grad_norm"])
    assert all(torch.equal(before[n], p) for n, p in policy.model.named_parameters())
    assert not opt.state and sched.last_epoch == 1  # no optimiser state touched; the schedule advanced
    assert ckpt.save("step_000001", RunState(step=1)).is_dir()  # the weights stayed finite


@pytest.mark.parametrize("mode", [None, "loss"])
def test_gradients_are_freed_after_every_update(tmp_path, mode):
    """The rollout and log-probs of the next step run without the last update's gradients in memory."""
    ckpt = tiny_checkpointer(tmp_path)
    algorithm = SFT() if mode is None else _Broken(mode)
    out = loop.optimise(_batch(ckpt.policy), algorithm, ckpt.policy, ckpt.opt, ckpt.sched, 1, 1.0)
    assert out["skipped"] == (mode is not None)
    assert mode is not None or ckpt.opt.state  # a real update happened
    assert all(p.grad is None for p in ckpt.policy.model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("recipe, sampled", [("sft_arithmetic", False), ("grpo_arithmetic", True)])
@pytest.mark.parametrize("enabled", [True, False])
def test_the_heap_is_trimmed_around_cpu_updates_when_enabled(tmp_path, monkeypatch, enabled, recipe, sampled):
    calls = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(memory.HeapTrimmer, "growth", 0)
    monkeypatch.setattr(memory.HeapTrimmer, "sampled_growth", 0)
    init = memory.HeapTrimmer.__init__
    monkeypatch.setattr(memory.HeapTrimmer, "__init__", lambda self, sampled: init(self, sampled, share=1e9))
    small = (
        ["model.name_or_path=tiny", "source.prompts_per_step=2", "source.group_size=2", "rollout.max_new_tokens=8"]
        if sampled
        else []
    )
    loop.train(
        compose(
            recipe,
            "trainer.steps=3",
            "trainer.batch_size=4",
            *small,
            f"trainer.trim_memory={enabled}",
            f"output_dir={tmp_path}",
        )
    )
    # no growth needed and a share this large: once a step, before the update when the step sampled
    assert len(calls) == (3 if enabled else 0)


def test_trimming_spends_at_most_its_share_of_the_time(monkeypatch):
    clock = [0.0]

    def trim():  # each trim takes 0.05 s of the clock
        clock[0] += 0.05
        return True

    monkeypatch.setattr(memory.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(memory, "trim_heap", trim)
    trimmer, done = memory.HeapTrimmer(sampled=False, share=0.02), []
    for _ in range(100):  # steps of 0.2 s: 20 s of steps
        clock[0] += 0.2
        done.append(trimmer.trim(0))
    # after a trim of 0.05 s the next waits 0.05 / 0.02 = 2.5 s, i.e. 13 steps of 0.2 s (+ the trim):
    # trims at steps 1, 14, 27, ..., 92: 8 trims, 0.4 s in 20.4 s of the clock, under 2%
    assert [i for i, d in enumerate(done) if d] == list(range(0, 100, 13))
    assert 0.05 * sum(done) / clock[0] <= 0.02


def test_trimming_waits_for_the_rss_to_grow(monkeypatch):
    rss = [1000 << 20]
    monkeypatch.setattr(memory, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(memory, "trim_heap", lambda: rss.__setitem__(0, rss[0] - (30 << 20)) or True)  # frees 30 MB
    trimmer = memory.HeapTrimmer(sampled=False, share=1e9)  # no waiting: the RSS rule alone
    assert trimmer.trim(64 << 20) and trimmer.level == 970 << 20  # the first call trims
    rss[0] += 40 << 20  # 1010 MB: grown 40 MB since the trim
    assert not trimmer.trim(64 << 20)
    rss[0] += 30 << 20  # 1040 MB: grown 70 MB
    assert trimmer.trim(64 << 20) and trimmer.level == 1010 << 20


def test_sampled_steps_trim_before_the_update_and_from_less_growth(monkeypatch):
    rss = [1000 << 20]
    monkeypatch.setattr(memory, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(memory, "trim_heap", lambda: True)  # frees nothing: the level stays at 1000 MB
    unsampled, sampled = memory.HeapTrimmer(sampled=False, share=1e9), memory.HeapTrimmer(sampled=True, share=1e9)
    assert unsampled.after_update() and unsampled.level == 1000 << 20
    assert sampled.before_update() and sampled.level == 1000 << 20
    rss[0] += 100 << 20  # grown 100 MB: over sampled_growth (64 MB), under growth (256 MB)
    assert not unsampled.before_update()  # unsampled batches: after the update only
    assert not unsampled.after_update()
    assert not sampled.after_update()  # sampled ones: before it only
    assert sampled.before_update() and sampled.level == 1100 << 20


@pytest.mark.slow
def test_training_bounds_onednn_cache_and_a_value_in_the_environment_wins(tmp_path, monkeypatch):
    env = memory.ONEDNN_CACHE_ENV
    monkeypatch.setenv(env, "x")
    monkeypatch.delenv(env)  # absent during the test, as it was before it afterwards
    memory.bound_onednn_cache(0)
    assert env not in os.environ  # 0: oneDNN's own default
    loop.train(
        compose(
            "sft_arithmetic",
            "trainer.steps=1",
            "trainer.batch_size=4",
            "trainer.onednn_cache=8",
            f"output_dir={tmp_path}",
        )
    )
    assert os.environ[env] == "8"
    memory.bound_onednn_cache(32)
    assert os.environ[env] == "8"
    with pytest.raises(UserError, match="trainer.onednn_cache: expected 0"):
        memory.bound_onednn_cache(-1)


ONEDNN_SHAPES = """
import sys
from grpo_cli.trainer.memory import bound_onednn_cache
bound_onednn_cache(int(sys.argv[1]))
import torch
w = torch.randn(64, 64, dtype=torch.bfloat16)
for _ in range(3):
    for m in (3, 5, 7):  # three GEMM shapes, three times
        torch.nn.functional.linear(torch.randn(m, 64, dtype=torch.bfloat16), w)
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_onednn_keeps_only_as_many_primitives_as_the_bound_set_from_python():
    env = {k: v for k, v in os.environ.items() if k != memory.ONEDNN_CACHE_ENV}
    misses = {}
    for capacity in (2, 0):
        out = subprocess.run(
            [sys.executable, "-c", ONEDNN_SHAPES, str(capacity)],
            capture_output=True,
            text=True,
            env=dict(env, ONEDNN_VERBOSE="all", PYTHONPATH=str(REPO)),
            check=True,
        )
        misses[capacity] = (out.stdout + out.stderr).count("create:cache_miss")
    if not misses[0]:
        pytest.skip("bf16 GEMMs do not run on oneDNN on this CPU")
    # room for 2 of 3 shapes cycled in order: every call compiles (LRU), 9; oneDNN's default: 3
    assert misses == {2: 9, 0: 3}


def test_trim_heap_calls_glibc_where_there_is_one():
    import platform

    assert memory.trim_heap() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


@pytest.mark.slow
def test_nan_steps_are_counted_and_k_in_a_row_stop_the_run(tmp_path, monkeypatch):
    original, calls = SFT.loss, []

    def loss(self, batch, policy):
        calls.append(1)
        value, metrics = original(self, batch, policy)
        return (value * float("nan") if len(calls) in bad else value), metrics

    monkeypatch.setattr(SFT, "loss", loss)
    bad = {2, 3}
    run = loop.train(
        compose("sft_arithmetic", "trainer.steps=5", "trainer.batch_size=4", f"output_dir={tmp_path / 'a'}")
    )
    got = rows(run)
    assert [r["skipped_steps"] for r in got] == [0, 1, 2, 2, 2]
    assert got[1]["loss"] is None and got[3]["loss"] is not None
    calls.clear()
    bad = set(range(3, 100))
    with pytest.raises(
        UserError, match=r"^stopping at step 5: 3 non-finite losses/gradients in a row \(last: loss=nan"
    ):
        loop.train(
            compose(
                "sft_arithmetic",
                "trainer.steps=20",
                "trainer.batch_size=4",
                "trainer.max_bad_steps=3",
                "trainer.save_every=1",
                f"output_dir={tmp_path / 'b'}",
            )
        )
    assert latest_checkpoint(tmp_path / "b").name == "step_000004"  # every checkpoint is of finite weights


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    ckpt = tiny_checkpointer(tmp_path)
    ckpt.save("step_000001", RunState(step=1))
    with torch.no_grad():
        next(ckpt.policy.model.parameters())[0, 0] = float("inf")
    with pytest.raises(UserError, match="refusing to save checkpoint step_000002: weight '.*' is not finite"):
        ckpt.save("step_000002", RunState(step=2))
    assert latest_checkpoint(tmp_path).name == "step_000001"


# ----------------------------------------------------------------------------- 4. rewards that raise or hang


def _reward(tmp_path, body: str, *overrides: str):
    (tmp_path / "user_reward.py").write_text(body)
    cfg = compose(
        "grpo_arithmetic", "reward=custom", f"reward.function={tmp_path / 'user_reward.py'}:score", *overrides
    )
    return build_reward(cfg.reward)


def _texts(completions, answers=None):
    n = len(completions)
    return Batch(
        torch.zeros(n, 2, dtype=torch.long),
        torch.ones(n, 2, dtype=torch.long),
        torch.ones(n, 2, dtype=torch.long),
        ["q"] * n,
        completions,
        answers or ["1"] * n,
        torch.arange(n),
    )


def test_custom_reward_function_from_a_config(tmp_path):
    reward = _reward(
        tmp_path, "def score(completions, answers, prompts):\n    return [float(len(c)) for c in completions]\n"
    )
    batch = _texts(["a", "bbb"])
    assert reward(batch).tolist() == [1.0, 3.0]
    assert batch.stats == {"reward_errors": 0, "reward_timeouts": 0}


def test_a_reward_that_raises_scores_incorrect_for_its_completions_and_is_counted(tmp_path):
    body = "def score(completions, answers, prompts):\n    return [1.0 / (len(c) - 3) for c in completions]\n"
    reward = _reward(tmp_path, body, "reward.incorrect=-1")
    batch = _texts(["ab", "abc", "abcd", "abcde"])  # len 3 divides by zero: only that completion fails
    assert reward(batch).tolist() == [-1.0, -1.0, 1.0, 0.5]
    assert batch.stats == {"reward_errors": 1, "reward_timeouts": 0}
    nan = _reward(tmp_path, "def score(completions, answers, prompts):\n    return [float('nan'), 1.0]\n")
    batch = _texts(["a", "b"])
    assert nan(batch).tolist() == [0.0, 1.0] and batch.stats["reward_errors"] == 1
    short = _reward(tmp_path, "def score(completions, answers, prompts):\n    return [1.0]\n")
    batch = _texts(["a", "b"])  # a wrong length: retried one by one, where it is right
    assert short(batch).tolist() == [1.0, 1.0] and batch.stats["reward_errors"] == 0


def test_a_reward_that_hangs_is_timed_out_scored_incorrect_and_counted(tmp_path, monkeypatch):
    release = threading.Event()
    monkeypatch.setitem(sys.modules, "hang_release", release)
    body = (
        "import sys\ndef score(completions, answers, prompts):\n"
        "    sys.modules['hang_release'].wait(30)\n    return [1.0] * len(completions)\n"
    )
    reward = _reward(tmp_path, body, "reward.timeout_s=0.2")
    try:
        batch = _texts(["a", "b", "c"])  # unguarded, this would wait 30 s and score [1, 1, 1]
        assert reward(batch).tolist() == [0.0, 0.0, 0.0]
        assert batch.stats == {"reward_errors": 0, "reward_timeouts": 3}
        monkeypatch.setattr("grpo_cli.rewards.guard.MAX_ABANDONED", 2)
        reward(_texts(["a"]))
        with pytest.raises(
            UserError, match="calls are still running long past reward.timeout_s=0.2s: the function hangs"
        ):
            reward(_texts(["a"]))
    finally:
        release.set()  # let the abandoned threads finish


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("no_colon", "expected module:function"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
        ("json:no_such_function", "'json' has no function 'no_such_function'"),
        ("/no/such/file.py:f", "no such file '/no/such/file.py'"),
    ],
)
def test_custom_reward_config_errors_are_one_line(spec, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "recipe=grpo_arithmetic", *TINY, "reward=custom", f"reward.function={spec}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"reward.function: {expected}" in err and len(err.splitlines()) == 1, err


@pytest.mark.timeout(60)  # a hang guard (catastrophic regex or int parsing), not a speed check
@pytest.mark.parametrize(
    "text, expected",
    [
        ("1e99999", 0.0),
        ("#### 1e99999", 0.0),  # never parsed as a float (inf): no match
        ("9" * 10_000, 1.0),
        ("#### " + "9" * 10_000, 1.0),  # the answer itself, 10,000 digits
        ("9" * 100_000, 0.0),
        ("The answer is " + "9" * 100_000, 0.0),  # 100,000 digits: a different number
    ],
    ids=range(6),
)
def test_pathological_answers_are_scored_exactly_through_the_reward(text, expected):
    reward = build_reward(compose("grpo_arithmetic").reward)
    batch = _texts([text], ["9" * 10_000])
    assert reward(batch).tolist() == [expected] and batch.stats["reward_errors"] == 0


# ---------------------------------------------------------------- 4. bad input: prompts longer than the context


@pytest.mark.slow
def test_an_example_longer_than_the_context_is_skipped_with_a_warning(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"question": "1+1", "answer": "1+1=2\n#### 2"})
        + "\n"
        + json.dumps({"question": "1+" * 200 + "1", "answer": "#### 201"})
        + "\n"
    )
    loop.train(
        compose(
            "sft_arithmetic",
            "data=jsonl",
            f"data.path={data}",
            "trainer.steps=1",
            "trainer.batch_size=2",
            f"output_dir={tmp_path / 'run'}",
        )
    )
    assert "1 training examples skipped: longer than the model's context" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("sft_arithmetic", "data: no training example has a solution that fits the model's context of 8 tokens"),
        ("grpo_arithmetic", "data: no prompt fits the context minus rollout.max_new_tokens"),
    ],
)
def test_a_dataset_longer_than_the_context_is_one_line(recipe, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "train",
                f"recipe={recipe}",
                *TINY,
                "model.name_or_path=tiny",
                "model.tiny.max_position_embeddings=8",
                f"output_dir={tmp_path}",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and expected in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- 5. security

PACKAGE = REPO / "grpo_cli"


def _code_lines():
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield f"{path.relative_to(REPO)}:{number}", code


def test_no_eval_exec_or_pickle_in_the_package():
    bad = [
        where
        for where, code in _code_lines()
        if re.search(r"(?<![\w.])(eval|exec)\s*\(|\bimport pickle\b|\bpickle\.loads?\(", code)
    ]
    assert not bad, bad


def test_torch_load_only_with_weights_only():
    calls = [(where, code) for where, code in _code_lines() if "torch.load(" in code]
    assert calls, "the checkpoint loader uses torch.load"
    assert all("weights_only=True" in code for _, code in calls), calls


def test_models_load_without_remote_code_and_through_safetensors(tmp_path, monkeypatch):
    from grpo_cli.config.schema import ModelConfig
    from grpo_cli.models import load

    assert ModelConfig().trust_remote_code is False
    model, tok, _ = load_model_and_tokenizer(compose("sft_arithmetic").model)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen = {}
    original = load.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        load.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: seen.update(kw) or original(*a, **kw)
    )
    load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
