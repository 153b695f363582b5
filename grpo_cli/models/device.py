"""Which torch device a run uses (``trainer.device``)."""

from __future__ import annotations

import torch

from grpo_cli.errors import UserError


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without a GPU is the user's mistake."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)
