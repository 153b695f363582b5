"""Shared fixtures: a tiny model and a small task so integration tests run in seconds on CPU."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A model and task small enough for a few seconds per run, on any 2-core machine.
TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "data.arithmetic.num_train=300",
    "data.arithmetic.num_test=16",
    "rollout.max_new_tokens=24",
    "logging.progress=false",
    "logging.plot=false",
    "trainer.warmup_steps=0",
]
TINY_EVAL = [o for o in TINY if o.split(".")[0] in ("model", "data", "rollout")]
"""The part of TINY that ``grpo eval`` reads (it refuses keys it would ignore)."""


@pytest.fixture(autouse=True)
def _torch_threads(monkeypatch):
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and immune to oversubscription
    monkeypatch.chdir(REPO)  # recipes/ are found from the repository root


def compose(recipe, *overrides):
    from grpo_cli.config.compose import compose_run

    return compose_run(recipe, [*TINY, *overrides])


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """A finished tiny SFT run (shared by the tests that need a trained checkpoint)."""
    from grpo_cli.trainer.loop import train

    out = tmp_path_factory.mktemp("sft")
    torch.set_num_threads(1)
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        run = train(compose("sft_arithmetic", "trainer.steps=30", "trainer.batch_size=16", "trainer.lr=3e-3", f"output_dir={out}"))
    finally:
        os.chdir(cwd)
    return run
