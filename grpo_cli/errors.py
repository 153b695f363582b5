"""User-facing errors: one line, no traceback.

Raise ``UserError`` for anything the user can fix (a config key, a file, a data row); the CLI prints
``error: <message>`` and exits with code 2 (``Interrupted``: its message, exit code 130 or 143).
Bugs stay ordinary exceptions with their traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake in the user's input, reported as one line naming the key, file or line."""


class Interrupted(UserError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint: one line, exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """``"did you mean: a, b?"`` for the closest candidates, or the full list when none is close."""
    candidates = sorted(set(candidates))
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if close:
        return "did you mean: " + ", ".join(close) + "?"
    shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
    return f"valid: {shown}"
