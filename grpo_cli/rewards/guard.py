"""Reward calls that can neither crash nor hang a run, and user reward functions from a config.

Every reward function built by :func:`grpo_cli.rewards.registry.build_reward` is wrapped in
:class:`GuardedReward`: a call that raises, returns something that is not one finite number per
completion, or takes longer than ``reward.timeout_s`` scores ``reward.incorrect`` for its completions
and is counted in the batch's ``reward_errors`` / ``reward_timeouts`` (logged every step). After a
raising call each completion is retried alone, so one bad completion costs only its own reward.

The time limit runs each call in a daemon thread and stops waiting at the deadline. Python cannot kill
a thread: a late call runs on in the background and its result is dropped; a call stuck inside one C
call that never releases the GIL cannot be interrupted this way at all. Too many late calls still
running (``MAX_ABANDONED``) stop the run with a message instead of piling up threads.

``reward.function=module:function`` imports a user's function: that is trusted code, run inside the
trainer with the user's permissions, exactly like a recipe's own Python. Model output is only ever
passed to it as data; nothing here evaluates text.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch

from grpo_cli.console import console
from grpo_cli.errors import UserError
from grpo_cli.rewards.base import Reward

MAX_ABANDONED = 8
"""Late reward calls allowed to run on in the background before the run stops."""


def import_function(spec: Optional[str], key: str = "reward.function") -> Callable:
    """``module:function`` (importable from the working directory) or ``path/to/file.py:function``;
    errors name the config ``key`` the spec came from."""
    if not spec or ":" not in spec:
        raise UserError(f"{key}: expected module:function or path/to/file.py:function, got {spec!r}")
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise UserError(f"{key}: no such file '{module_name}'")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # the `grpo` script does not put the working directory there
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # anything the user's module raises while importing
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{key}: cannot import '{module_name}': {type(e).__name__}: {first}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{key}: '{module_name}' has no function '{attr}'")
    return fn


def as_rewards(value: Any, n: int) -> List[float]:
    """A reward call's result as ``n`` floats (non-finite ones kept, to be counted); else ValueError."""
    t = value.detach().float().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float32)
    if t.numel() != n:
        raise ValueError(f"returned {t.numel()} rewards for {n} completions")
    return t.flatten().tolist()


class GuardedReward(Reward):
    """``reward(batch)`` with a time limit and error isolation; counts go to ``batch.stats``. It
    declares what the reward it wraps declares. ``optional``: a NaN reward means "not applicable"
    (``reward=functions``) and is passed on as NaN, not counted as an error."""

    def __init__(self, reward: Reward, *, timeout_s: float, incorrect: float, optional: bool = False):
        self.fn, self.timeout_s, self.incorrect, self.optional = reward, timeout_s, incorrect, optional
        self.name, self.per_step, self.modules = reward.name, reward.per_step, reward.modules
        self.abandoned: List[threading.Thread] = []
        self.warned: set = set()

    def bind(self, tokenizer) -> None:
        self.fn.bind(tokenizer)

    def __call__(self, batch) -> torch.Tensor:
        rewards, errors, timeouts = self.score(batch)
        batch.stats["reward_errors"] = errors
        batch.stats["reward_timeouts"] = timeouts
        return torch.tensor(rewards, dtype=torch.float32)

    def score(self, batch) -> Tuple[List[float], int, int]:
        """(rewards, completions scored ``incorrect`` for an error, ... for a timeout)."""
        n = len(batch.completions)
        deadline = time.monotonic() + self.timeout_s if self.timeout_s > 0 else None
        status, value = self.call(batch, deadline)
        if status == "timeout":
            return [self.incorrect] * n, 0, n
        if status == "ok":
            try:
                rewards = as_rewards(value, n)
            except Exception as e:  # a wrong length or type: retried one by one below
                self.warn(f"{type(e).__name__}: {e}")
            else:
                bad = [not self.valid(r) for r in rewards]
                if any(bad):
                    self.warn("non-finite reward")
                return [self.incorrect if b else r for r, b in zip(rewards, bad)], sum(bad), 0
        out, errors, timeouts = [], 0, 0
        for i in range(n):
            status, value = self.call(batch.select([i]), deadline)
            reward = self.single(status, value)
            timeouts += status == "timeout"
            errors += status != "timeout" and reward is None
            out.append(self.incorrect if reward is None else reward)
        return out, errors, timeouts

    def single(self, status: str, value: Any) -> Optional[float]:
        """The one finite reward of a one-completion call, else None."""
        if status != "ok":
            return None
        try:
            reward = as_rewards(value, 1)[0]
        except Exception as e:
            self.warn(f"{type(e).__name__}: {e}")
            return None
        if not self.valid(reward):
            self.warn("non-finite reward")
            return None
        return reward

    def valid(self, reward: float) -> bool:
        return math.isfinite(reward) or (self.optional and math.isnan(reward))

    def call(self, arg, deadline: Optional[float]) -> Tuple[str, Any]:
        """("ok", value), ("error", exception) or ("timeout", None)."""
        if deadline is None:
            try:
                return "ok", self.fn(arg)
            except UserError:  # a mistake in the config, not in one completion: stop the run
                raise
            except Exception as e:
                self.warn(f"{type(e).__name__}: {e}")
                return "error", e
        self.check_abandoned()
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", None
        box: dict = {}

        def target() -> None:
            try:
                box["value"] = self.fn(arg)
            except BaseException as e:  # reported in the caller's thread
                box["error"] = e

        thread = threading.Thread(target=target, daemon=True, name=f"reward-{self.name}")
        thread.start()
        thread.join(left)
        if thread.is_alive():
            self.abandoned.append(thread)
            self.warn(f"a call took longer than reward.timeout_s={self.timeout_s:g}s", kind="timeout")
            return "timeout", None
        if isinstance(box.get("error"), (UserError, KeyboardInterrupt)):
            raise box["error"]
        if "error" in box:
            self.warn(f"{type(box['error']).__name__}: {box['error']}")
            return "error", box["error"]
        return "ok", box["value"]

    def check_abandoned(self) -> None:
        self.abandoned = [t for t in self.abandoned if t.is_alive()]
        if len(self.abandoned) >= MAX_ABANDONED:
            raise UserError(
                f"reward '{self.name}': {len(self.abandoned)} calls are still running long past "
                f"reward.timeout_s={self.timeout_s:g}s: the function hangs; fix it or raise reward.timeout_s"
            )

    def warn(self, what: str, kind: str = "error") -> None:
        """One line the first time each kind of problem happens; every occurrence is counted."""
        if kind in self.warned:
            return
        self.warned.add(kind)
        counter = "reward_timeouts" if kind == "timeout" else "reward_errors"
        console.print(
            f"[yellow]warning:[/yellow] reward '{self.name}': {what}; those completions score "
            f"reward.incorrect (counted in {counter})",
            highlight=False,
            soft_wrap=True,
        )
