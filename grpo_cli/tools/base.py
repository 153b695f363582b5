"""The contracts of multi-turn rollouts: the tool-call text format, environments, and turns.

A multi-turn completion interleaves the model's own tokens with observations::

    <prompt>```python
    print(123*456)
    ```                        <- the model's turn ends when it closes the code block
    ```output                 <- the observation, appended by the environment (never trained)
    56088
    ```
    #### 56088<eos>           <- the model's next turn

Two levels, so engines stay text-agnostic:

* :class:`Environment` (text): given the example it may add to the prompt; after each model turn it
  sees the completion so far and returns an observation to append, or None (done).
* :class:`Turns` (token ids, one object per batch of rows): what an engine calls. ``pauses`` says
  whether a row's turn just ended (cheap: called for every sampled token); ``observe`` gives the token
  ids to append to a paused row (prefilled into the engine's KV cache, never sampled), or None when the
  row is done. An engine returns, per row, its completion ids and which of them the model wrote.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

CODE_OPEN = "```python\n"
"""How a code block opens; the model closes it with a line holding only ```."""
CODE_CLOSE = "\n```"
OUTPUT_OPEN = "\n```output\n"
"""How an observation opens, right after the model's closing fence."""
OUTPUT_CLOSE = "```\n"
MAX_OUTPUT_CHARS = 512
"""Longest observation body; a longer output is cut and marked, so one call cannot fill the context."""

_OUTPUT_BLOCK = re.compile(re.escape(OUTPUT_OPEN) + r"[\s\S]*?" + re.escape(OUTPUT_CLOSE))


def pending_code(text: str) -> Optional[str]:
    """The code of the python block that ``text`` (a completion so far) has just closed, or None.

    The text must end with the closing fence, and its last ``CODE_OPEN`` must come after the last
    observation: a block already answered is not run again."""
    if not text.endswith(CODE_CLOSE):
        return None
    start = text.rfind(CODE_OPEN)
    if start < 0 or start < text.rfind(OUTPUT_OPEN):
        return None
    code = text[start + len(CODE_OPEN) : -len(CODE_CLOSE)]
    return None if "```" in code else code


def output_block(output: str, error: Optional[str], max_chars: int = MAX_OUTPUT_CHARS) -> str:
    """The observation appended after a code block: its output (and error line), at most ``max_chars``
    characters of body, in an ``output`` fence."""
    body = output + (f"{error}\n" if error else "")
    body = body.rstrip() or "(no output)"
    if len(body) > max_chars:
        body = body[:max_chars] + " ...(cut)"
    return f"{OUTPUT_OPEN}{body}\n{OUTPUT_CLOSE}"


def output_spans(text: str) -> List[Tuple[int, int]]:
    """Character spans [start, end) of the observations in a whole completion (or SFT solution): the
    characters no model wrote, so no loss is taken on them."""
    return [m.span() for m in _OUTPUT_BLOCK.finditer(text)]


class Environment:
    """A multi-turn environment, text level. Subclass it; ``rollout.environment=pkg.module:Class``
    plugs one in (constructed with keyword arguments ``timeout_s``)."""

    name: str = ""
    concurrent: bool = False
    """Whether :meth:`respond` may run for several rows at once, in threads (an environment whose
    calls wait on subprocesses, like the Python sandbox): the rows whose turns end at the same decode
    step are then answered together."""

    def prompt(self, prompt: str, example) -> str:
        """The prompt the model sees for ``example`` (the rendered ``prompt`` by default)."""
        return prompt

    def turn_ended(self, text: str) -> bool:
        """Whether the completion so far ends a model turn that this environment answers."""
        raise NotImplementedError

    def respond(self, text: str) -> Optional[str]:
        """The observation to append after a turn that :meth:`turn_ended`, or None: done."""
        raise NotImplementedError


class Turns:
    """What an engine drives, per batch of rows (token level). Built from an :class:`Environment`
    and a tokenizer by the sampling code; engines only call these two methods."""

    def pauses(self, row: int, completion_ids: Sequence[int]) -> bool:
        """After a sampled token: the row's turn ended and the environment answers it (the engine
        stops sampling the row until :meth:`observe`)."""
        raise NotImplementedError

    def observe(self, row: int, completion_ids: Sequence[int]) -> Optional[List[int]]:
        """Token ids to append to a paused row (the engine prefills them, then samples on), or None:
        the row is done."""
        raise NotImplementedError

    def observe_many(self, rows: Sequence[int], completions: Sequence[Sequence[int]]) -> List[Optional[List[int]]]:
        """:meth:`observe` for every row paused at the same decode step (what engines call); one after
        the other unless a subclass answers them together."""
        return [self.observe(row, ids) for row, ids in zip(rows, completions)]
