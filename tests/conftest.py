"""Shared fixtures and helpers: a tiny model and a small task so integration tests run in seconds on
CPU, the test rewards, and readers of a run's metrics.jsonl.

``@pytest.mark.slow`` marks a test that trains a model (runs the training loop, in this process or
another, a sweep included) or takes more than ~10 s on 2 cores (torch.compile's Inductor tests):
``pytest -m "not slow"`` is the quick loop, ``./scripts/test.sh`` runs everything. Tests that only read
the session's finished ``sft_run`` are not slow: the one SFT run is shared by all of them.
"""

import json
import re
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
        run = train(
            compose(
                "sft_arithmetic", "trainer.steps=30", "trainer.batch_size=16", "trainer.lr=3e-3", f"output_dir={out}"
            )
        )
    finally:
        os.chdir(cwd)
    return run


# --- test rewards: a barely trained model gets every answer wrong, so the answer rule would give
# every completion 0 and every advantage 0; completion length varies within a group instead ---


def length_mod_3(batch) -> torch.Tensor:
    """Reward ``len(completion) % 3`` (0, 1 or 2): graded, varies within a group."""
    return torch.tensor([len(c) % 3 for c in batch.completions], dtype=torch.float32)


def length_mod_3_is_0(batch) -> torch.Tensor:
    """Reward 1 where ``len(completion) % 3 == 0``, else 0: a right/wrong label (RFT's filter, DPO's
    pairs, a reward model's training labels)."""
    return torch.tensor([float(len(c) % 3 == 0) for c in batch.completions], dtype=torch.float32)


def register_length_rewards(monkeypatch) -> None:
    """``reward.name=length_mod_3`` and ``reward.name=length_mod_3_is_0``, for this test only."""
    from grpo_cli.rewards.registry import REWARDS

    monkeypatch.setitem(REWARDS, "length_mod_3", lambda cfg: length_mod_3)
    monkeypatch.setitem(REWARDS, "length_mod_3_is_0", lambda cfg: length_mod_3_is_0)


@pytest.fixture
def length_rewards(monkeypatch):
    """The test rewards registered by name (:func:`register_length_rewards`)."""
    register_length_rewards(monkeypatch)


# --- a run's metrics.jsonl ---

WALL_CLOCK = re.compile(r"^(seconds|time_.*|gpu_mem_.*)$")
"""Metrics that measure the machine (wall-clock seconds, GPU memory peaks): the only ones a resumed or
a multi-process run may change."""


def metrics(run: Path):
    """Every row of ``run/metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rows(run: Path):
    """metrics.jsonl without the wall-clock fields (:data:`WALL_CLOCK`)."""
    return [{k: v for k, v in row.items() if not WALL_CLOCK.match(k)} for row in metrics(run)]


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """A real-shaped local model (tests/real_model.py): Qwen2, byte-level BPE, ChatML; small vocabulary."""
    from real_model import build_real_shaped

    return build_real_shaped(tmp_path_factory.mktemp("real") / "qwen2-bpe")
