"""Which config keys each command reads, and one-line hints for the usual first mistakes.

Every command composes the whole schema, so Hydra accepts any of its keys on any command; a key the
command never reads (``grpo eval trainer.lr=1e-3``) would be silently ignored. ``USES`` names, per
command, the keys it reads (a section, or single fields of a section), found by reading the code:

* ``grpo train``: the run itself (and the recipe directories' groups, ``method=grpo``); ``iterative.*``
  drives iterative RL. Not ``eval.*`` (iterative RL evaluates its policies on ``iterative.eval_limit``
  test questions) nor ``sweep.*``.
* ``grpo eval run=...``: the task (``data``), the sampling (``rollout``), how the model loads (``model``
  except ``name_or_path``: the model is ``run=``) and runs (``trainer.precision/threads/device``).
* ``grpo eval samples=...``: the file and its fields, and the answer rule: ``data.answer_checker``, which
  follows ``data.name`` (``data=math`` scores ``\\boxed{}`` answers with math-verify).
* ``grpo export``: ``export.*`` and ``model.trust_remote_code`` (the model is ``run=``).
* ``grpo sweep``: what ``grpo train`` reads (each run is one), ``sweep.*`` and the ``eval.*`` it hands
  to each run's evaluation (``SWEEP_EVAL_KEYS``).
* ``grpo report``: ``report.*`` only (it reads a finished run's files, not its settings).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from grpo_cli.config import schema as S
from grpo_cli.config import store
from grpo_cli.config.recipes import list_recipes, recipe_dirs
from grpo_cli.errors import UserError

SWEEP_EVAL_KEYS = ("split", "limit", "n", "ks", "seed")
"""The ``eval.*`` settings a sweep hands to each run's evaluation."""

TRAIN = (
    "recipe",
    "output_dir",
    "resume",
    "model",
    "lora",
    "data",
    "reward",
    "source",
    "algorithm",
    "rollout",
    "trainer",
    "logging",
    "iterative",
)
EVAL_RUN = (
    "eval.run",
    "eval.split",
    "eval.limit",
    "eval.n",
    "eval.ks",
    "eval.seed",
    "eval.output_dir",
    "data",
    "rollout",
    "model.tiny",
    "model.dtype",
    "model.trust_remote_code",
    "trainer.precision",
    "trainer.threads",
    "trainer.device",
)
EVAL_SAMPLES = (
    "eval.samples",
    "eval.completion_field",
    "eval.answer_field",
    "eval.output_dir",
    "data.name",
    "data.answer_checker",
)
EXPORT = ("export", "model.trust_remote_code")
"""``grpo export``: ``export.*`` (``run=``, ``output_dir=``) and whether the model may run its own code."""
SWEEP = tuple(k for k in TRAIN if k != "output_dir") + ("sweep",) + tuple(f"eval.{k}" for k in SWEEP_EVAL_KEYS)

USES: Dict[str, Tuple[str, ...]] = {
    "grpo train": TRAIN,
    "grpo eval": EVAL_RUN,
    "grpo eval samples=...": EVAL_SAMPLES,
    "grpo sweep": SWEEP,
    "grpo report": ("report",),
    "grpo export": EXPORT,
}
"""Command -> the config keys it reads: a key, and every key below it, is used."""

HINTS: Dict[Tuple[str, str], str] = {
    ("grpo eval", "model.name_or_path"): "the model evaluated is run=PATH",
    ("grpo eval samples=...", "eval.run"): "pass either run= (a model to evaluate) or samples= (a file to score)",
    ("grpo eval samples=...", "eval.n"): "a samples file is scored as it is; eval.n samples a model (run=...)",
    ("grpo export", "model.name_or_path"): "the model exported is run=PATH",
}
"""What to do instead, for an unused key that a user may well try."""

SHORTHANDS = ("run", "samples", "split", "limit", "output_dir")
"""``grpo eval``'s short keys: ``run=X`` is ``eval.run=X``, ``output_dir=D`` is ``eval.output_dir=D``."""
EXPORT_SHORTHANDS = ("run", "output_dir")
"""``grpo export``'s short keys: ``run=X`` is ``export.run=X``, ``output_dir=D`` is ``export.output_dir=D``."""


REPORT_SHORTHANDS = ("run", "sweep", "output", "smoothing")
"""``grpo report``'s short keys: ``run=DIR`` is ``report.run=DIR``."""


def override_key(arg: str) -> str:
    """The dotted key an override sets: ``+a.b=1`` -> ``a.b``, ``~a`` -> ``a``, ``data=gsm8k`` -> ``data``."""
    return arg.split("=", 1)[0].strip().lstrip("+~").split("@", 1)[0]


def is_used(command: str, key: str) -> bool:
    """A key is used when it is, lies below, or holds (``model=tiny``) a key the command reads. A
    recipe directory's own group (``method=grpo``) sets whole sections of a run: train and sweep."""
    if any(key == u or key.startswith(u + ".") or u.startswith(key + ".") for u in USES[command]):
        return True
    head = key.split(".", 1)[0]
    return head == "hydra" or (command in ("grpo train", "grpo sweep") and head in recipe_groups())


def recipe_groups() -> List[str]:
    """Config groups of the recipe directories (``recipes/method/``)."""
    return sorted({d.name for root in recipe_dirs() for d in root.iterdir() if d.is_dir() and any(d.glob("*.yaml"))})


def uses_text(command: str) -> str:
    """``data, eval.{run,split}, trainer.{precision,threads}``: the used keys, grouped by section."""
    groups: Dict[str, List[str]] = {}
    for key in USES[command]:
        head, _, rest = key.partition(".")
        groups.setdefault(head, []).append(rest)
    parts = [
        h if rest == [""] else f"{h}.{{{','.join(rest)}}}" if len(rest) > 1 else f"{h}.{rest[0]}"
        for h, rest in groups.items()
    ]
    return ", ".join(parts)


def unused_message(command: str, key: str) -> str:
    hint = HINTS.get((command, key))
    if hint:
        return f"config key '{key}' is not used by '{command}': {hint}"
    return f"config key '{key}' is not used by '{command}' (it uses: {uses_text(command)})"


def check_used(command: str, overrides: Sequence[str]) -> None:
    """Refuse an override of a key ``command`` never reads: it would change nothing, silently."""
    for arg in overrides:
        key = override_key(arg)
        if key and not is_used(command, key):
            raise UserError(unused_message(command, key))


def schema_keys(node: object = S.RunConfig, prefix: str = "") -> List[str]:
    """Every dotted leaf key of the schema, group options included (``source.group_size``)."""
    keys: List[str] = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        if not prefix and f.name in store.options() and f.default is not dataclasses.MISSING:
            options = store.options()[f.name].values()  # `source`, `algorithm`: fields of every option
            keys += sorted({k for opt in options for k in schema_keys(opt, key + ".")})
        elif _nested(f) is not None:
            keys += schema_keys(_nested(f), key + ".")
        else:
            keys.append(key)
    return list(dict.fromkeys(keys))


def _nested(f: dataclasses.Field) -> Optional[type]:
    """The dataclass type of a nested section field, else None."""
    factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    value = factory() if factory is not None else None
    return type(value) if dataclasses.is_dataclass(value) else None


def nested_keys(name: str) -> List[str]:
    """The full keys of the schema whose last part is ``name`` (``steps`` -> ``trainer.steps``)."""
    return [k for k in schema_keys() if k.rsplit(".", 1)[-1] == name]


def full_key_hint(name: str, value: str) -> Optional[str]:
    """``did you mean trainer.steps=10?`` for a field named without its section; None if none has it."""
    found = nested_keys(name)
    if len(found) == 1:
        return f"did you mean {found[0]}={value}?"
    if found:
        return "did you mean one of: " + ", ".join(found) + "?"
    return None


def check_words(command: str, args: Sequence[str]) -> None:
    """Catch what is not an override before Hydra's parser does (its message names no fix): a bare
    word (``grpo train sft_arithmetic``, ``grpo eval runs/x``) or an option (``--steps 10``)."""
    for i, arg in enumerate(args):
        if arg.startswith("-") and not _is_number(arg):
            raise UserError(f"unknown option '{arg.split('=', 1)[0]}': {_option_hint(command, arg, args[i + 1 :])}")
        if "=" not in arg and not arg.startswith("~"):
            raise UserError(f"'{arg}' is not an override (key=value): {_word_hint(command, arg)}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _option_hint(command: str, arg: str, rest: Sequence[str]) -> str:
    """``--steps 10`` or ``--steps=10`` -> ``did you mean trainer.steps=10?``."""
    name, eq, value = arg.lstrip("-").partition("=")
    if not eq:
        following = rest[0] if rest else "="
        is_value = "=" not in following and (not following.startswith("-") or _is_number(following))
        value = following if is_value else "VALUE"
    if (
        name in schema_keys()
        or name in (f.name for f in dataclasses.fields(S.RunConfig))
        or (command == "grpo eval" and name in SHORTHANDS)
        or (command == "grpo report" and name in REPORT_SHORTHANDS)
        or (command == "grpo export" and name in EXPORT_SHORTHANDS)
    ):
        return f"settings are overrides without dashes: did you mean {name}={value}?"
    return full_key_hint(name, value) or "settings are overrides key=value without dashes (see --help)"


def _word_hint(command: str, word: str) -> str:
    """``did you mean run=PATH?`` for ``grpo eval``, ``did you mean recipe=NAME?`` otherwise."""
    if command == "grpo export":
        return f"did you mean run={word}?"
    if command == "grpo eval":
        return f"did you mean {'samples' if word.endswith('.jsonl') else 'run'}={word}?"
    if command == "grpo report":
        return f"did you mean run={word} (or sweep={word})?"
    close = difflib.get_close_matches(word, list(list_recipes()), n=1, cutoff=0.6)
    if close:
        return f"did you mean recipe={close[0]}?"
    return "pass recipe=NAME (see `grpo recipes`) and key=value overrides"


def made_by(path: str) -> Optional[str]:
    """The command that makes a missing ``runs/<recipe>/latest`` (a recipe's newest run with the default
    ``output_dir``, where the GRPO recipes start from), else None."""
    parts = Path(path).parts
    if len(parts) == 3 and parts[0] == "runs" and parts[2] == "latest":
        if parts[1] in list_recipes():
            return f"grpo train recipe={parts[1]}"
    return None
