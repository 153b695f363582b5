"""The ways to start the command line: ``grpo``, ``python -m grpo_cli`` (what ``torchrun -m``
runs) and the older ``python -m grpo_cli.cli``."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("module", ["grpo_cli", "grpo_cli.cli"])
def test_python_dash_m(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "train", "recipe=sft_arithmetic", "trainer.steps=7", "--print-config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "steps: 7" in proc.stdout
