"""Which environment answers a rollout, and the adapter that lets engines drive it token by token.

``rollout.tools=[python]`` picks the built-in :class:`PythonEnvironment`; ``rollout.environment=
pkg.module:Class`` a user's own :class:`~grpo_cli.tools.base.Environment` subclass. Engines never see
text: :class:`EnvironmentTurns` turns an environment and a tokenizer into the token-level
:class:`~grpo_cli.tools.base.Turns` they call.
"""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from grpo_cli.errors import UserError
from grpo_cli.tools.base import Environment, Turns, output_block, pending_code

TOOLS = ("python",)


MAX_CONCURRENT = 8
"""Most environment calls in flight at once (threads), for ``concurrent`` environments."""


class PythonEnvironment(Environment):
    """Runs each python block the model closes in the sandbox and appends its output."""

    name = "python"
    concurrent = True  # each call waits on its own sandbox process

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s

    def turn_ended(self, text: str) -> bool:
        return pending_code(text) is not None

    def respond(self, text: str) -> Optional[str]:
        code = pending_code(text)
        if code is None:
            return None
        from grpo_cli.tools.python import run_python  # deferred: the sandbox loads only for tool runs

        return output_block(*run_python(code, self.timeout_s))


def build_environment(tools: Sequence[str] = (), environment: str = "", timeout_s: float = 5.0):
    """The run's :class:`Environment`, or None for plain (single-turn) rollouts. One-line
    ``UserError`` for an unknown tool, both keys set, or an ``environment`` that does not import or
    is not an ``Environment`` subclass."""
    tools = list(tools or ())
    if tools and environment:
        raise UserError("rollout.tools and rollout.environment are exclusive: set one")
    if environment:
        return _import_environment(environment)(timeout_s=timeout_s)
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise UserError(f"rollout.tools: unknown tool(s) {unknown}; expected some of {list(TOOLS)}")
    return PythonEnvironment(timeout_s=timeout_s) if tools else None


def _import_environment(spec: str) -> type:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"rollout.environment: expected 'pkg.module:Class', got '{spec}'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"rollout.environment: cannot import '{spec}' ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise UserError(f"rollout.environment: '{spec}' is not a subclass of grpo_cli.tools.base.Environment")
    return cls


class EnvironmentTurns(Turns):
    """:class:`Turns` of one batch from an environment and a tokenizer.

    ``pauses`` runs for every sampled token, so it decodes a row's completion only when the newest
    token's text holds a backtick (a turn of the tool format ends with a fence); other environments
    whose turns end otherwise set ``trigger_chars``. A row gets at most ``max_turns`` observations:
    at the next turn end ``observe`` says done (the row stops there)."""

    def __init__(self, environment: Environment, tokenizer, max_turns: int, trigger_chars: str = "`"):
        self.env, self.tokenizer, self.max_turns = environment, tokenizer, max_turns
        self.trigger_chars = getattr(environment, "trigger_chars", trigger_chars)
        self.turns: Dict[int, int] = {}  # row -> observations appended
        self._triggers: Dict[int, bool] = {}  # token id -> its text holds a trigger character

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _triggers_on(self, token: int) -> bool:
        hit = self._triggers.get(token)
        if hit is None:
            text = self._decode([token])
            hit = self._triggers[token] = not self.trigger_chars or any(c in text for c in self.trigger_chars)
        return hit

    def pauses(self, row: int, completion_ids: Sequence[int]) -> bool:
        if not completion_ids or not self._triggers_on(int(completion_ids[-1])):
            return False
        return self.env.turn_ended(self._decode(completion_ids))

    def observe(self, row: int, completion_ids: Sequence[int]) -> Optional[List[int]]:
        return self.observe_many([row], [completion_ids])[0]

    def observe_many(self, rows: Sequence[int], completions: Sequence[Sequence[int]]) -> List[Optional[List[int]]]:
        """The rows paused at one decode step, answered together in threads when the environment is
        ``concurrent`` (a sandbox call is mostly a subprocess's start-up: dozens of rows a step)."""
        asked = [i for i, row in enumerate(rows) if self.turns.get(row, 0) < self.max_turns]
        texts = [self._decode(completions[i]) for i in asked]
        if self.env.concurrent and len(texts) > 1:
            with ThreadPoolExecutor(max_workers=min(len(texts), MAX_CONCURRENT)) as pool:
                answers = list(pool.map(self.env.respond, texts))
        else:
            answers = [self.env.respond(t) for t in texts]
        out: List[Optional[List[int]]] = [None] * len(rows)
        for i, text in zip(asked, answers):
            if text is not None:
                self.turns[rows[i]] = self.turns.get(rows[i], 0) + 1
                out[i] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return out
