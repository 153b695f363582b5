"""File and hub loaders: ``gsm8k``, ``math`` and ``jsonl`` (any local JSONL/Parquet file or directory, or a hub
dataset).

Local JSONL is read line by line with the ``json`` module rather than through ``datasets``: every
error then names its file and line (``data.jsonl:17: missing field 'question'``), and rows whose
fields change type do not hit Arrow's schema unification. Parquet is read with ``pyarrow`` (what
``datasets`` reads it with, minus the cache), hub datasets with ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from grpo_cli.data.types import Example
from grpo_cli.errors import UserError
from grpo_cli.rewards.checkers import NUMERIC, answer_checker

GSM8K_HUB = ("openai/gsm8k", "main")
"""Hub name and config of GSM8K, used when ``data.path`` is unset."""
MATH_HUB = {"train": "DigitalLearningGmbH/MATH-lighteval", "test": "HuggingFaceH4/MATH-500"}
"""Hub datasets of ``data=math`` when ``data.path`` is unset: MATH's 7,500 training problems (the
original ``hendrycks/competition_math`` is no longer served; this copy keeps its rows), and the
MATH-500 test subset, the usual held-out set."""
DATA_SUFFIXES = (".jsonl", ".parquet")

Row = Tuple[str, Dict[str, Any]]
"""A row and where it came from, for error messages: ``("data.jsonl:17", {...})``."""


def _split_name(cfg, split: str) -> str:
    return cfg.train_split if split == "train" else cfg.test_split


def read_jsonl(path: Path) -> Iterator[Row]:
    """Rows of a JSONL file; blank lines are skipped, a malformed line is a UserError."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: malformed JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{number}", row


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # imported here: only Parquet users pay for it

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises many types for a corrupt file
        raise UserError(f"{path}: cannot read Parquet: {error}") from None
    for number, row in enumerate(rows, start=1):
        yield f"{path}: row {number}", row


def _read_hub(name: str, config: Optional[str], split_name: str) -> Iterator[Row]:
    try:
        import datasets  # deferred: only hub data sets need it

        dataset = datasets.load_dataset(name, config, split=split_name)
    except Exception as error:  # network, missing dataset or split, auth: all reported the same way
        first_line = str(error).strip().split("\n", 1)[0]
        raise UserError(
            f"data.path: cannot load hub dataset {name!r} (config {config}, split {split_name!r}): "
            f"{type(error).__name__}: {first_line}. Offline, point data.path at a local file or at a "
            f"directory holding {split_name}.jsonl"
        ) from None
    for number, row in enumerate(dataset, start=1):
        yield f"{name}[{split_name}] row {number}", row


def _split_files(directory: Path, split_name: str) -> List[Path]:
    """Files of one split in a directory (not its subdirectories, which may hold other configs of
    the same dataset): ``<split>.jsonl``, else ``<split>.parquet``, else shards named
    ``<split>-00000-of-00002.parquet`` (the hub's layout), in name order."""
    for suffix in DATA_SUFFIXES:
        if (directory / f"{split_name}{suffix}").is_file():
            return [directory / f"{split_name}{suffix}"]
    shards = sorted(
        path for path in directory.glob(f"{split_name}-*") if path.is_file() and path.suffix in DATA_SUFFIXES
    )
    if not shards:
        present = sorted(p.name for p in directory.iterdir())[:12]
        raise UserError(
            f"data.path: no {split_name}.jsonl or {split_name}.parquet in {directory} "
            f"(data.train_split / data.test_split name the files; found: {', '.join(present) or 'nothing'})"
        )
    return shards


def _read_file(path: Path) -> Iterator[Row]:
    if path.suffix == ".parquet":
        return _read_parquet(path)
    return read_jsonl(path)


def _looks_local(path: str) -> bool:
    """Whether a missing ``path`` was meant as a local path rather than a hub name."""
    return path.startswith((".", "/", "~")) or path.endswith(DATA_SUFFIXES + (".json",)) or "\\" in path


def read_rows(path: Optional[str], split_name: str, hub_config: Optional[str] = None) -> Iterator[Row]:
    """Rows of one split from a local file (used whatever the split), a directory of split files,
    or a hub dataset name."""
    if path is None:
        raise UserError("data.path: required for data.name=jsonl (a file, a directory or a hub name)")
    local = Path(path).expanduser()
    if local.is_file():
        return _read_file(local)
    if local.is_dir():
        return (row for file in _split_files(local, split_name) for row in _read_file(file))
    if _looks_local(path):
        raise UserError(f"data.path: no such file or directory: {path}")
    return _read_hub(path, hub_config, split_name)


def _field(where: str, row: Dict[str, Any], field: str, key: str) -> str:
    """The text of ``row[field]``; numbers become text; absent, null or nested values are UserErrors."""
    value = row.get(field)
    if value is None:
        shown = ", ".join(sorted(map(str, row))[:12])
        raise UserError(f"{where}: missing field {field!r} ({key}; the row has: {shown})")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: field {field!r} ({key}) must be text or a number, got {type(value).__name__}")
    return str(value)


def with_final_line(solution: str, answer: str) -> str:
    """``solution`` ending with a ``#### <answer>`` line, the format SFT teaches and the reward reads
    first; a solution that already ends with one is kept as is (GSM8K's do)."""
    lines = solution.rstrip().split("\n")
    if lines[-1].lstrip().startswith("####"):
        return solution
    return solution.rstrip() + f"\n#### {answer}"


def rows_to_examples(rows: Iterator[Row], cfg) -> List[Example]:
    """Examples from rows using the ``data.*_field`` names; the answer is extracted from the
    solution (by ``data.answer_checker``) when ``data.answer_field`` is None. Solutions keep their
    task's answer format: ``numeric`` ones end with ``#### <answer>`` (added if missing), ``math``
    ones are kept as written (their answer is boxed). Every field of a row, used or not, is kept in
    ``Example.columns`` for reward functions that read them. Stops after ``data.max_examples`` rows."""
    if cfg.solution_field is None and cfg.answer_field is None:
        raise UserError("data.answer_field: None, and so is data.solution_field: no final answer to reward")
    checker = answer_checker(cfg)
    examples = []
    for where, row in rows:
        question = _field(where, row, cfg.question_field, "data.question_field")
        solution = _field(where, row, cfg.solution_field, "data.solution_field") if cfg.solution_field else None
        if cfg.answer_field:
            answer = _field(where, row, cfg.answer_field, "data.answer_field").strip()
        else:
            answer = checker.extract(solution)
            if answer is None:
                expected = "a last line '#### <answer>'" if checker is NUMERIC else "a \\boxed{<answer>}"
                raise UserError(
                    f"{where}: no final answer in field {cfg.solution_field!r} (expected {expected}); "
                    f"set data.answer_field if the answer has a field of its own"
                )
        if solution is not None and checker is NUMERIC:
            solution = with_final_line(solution, answer)
        examples.append(
            Example(question=question, prompt=question, solution=solution, answer=answer, columns=dict(row))
        )
        if cfg.max_examples is not None and len(examples) >= cfg.max_examples:
            break  # before reading the next row: a large file is not parsed past what is used
    return examples


def load_jsonl(cfg, split: str) -> List[Example]:
    """``data.name=jsonl``: ``data.path`` is a JSONL/Parquet file (used for either split), a directory
    of split files, or a hub dataset name."""
    return rows_to_examples(read_rows(cfg.path, _split_name(cfg, split)), cfg)


def load_gsm8k(cfg, split: str) -> List[Example]:
    """``data.name=gsm8k``: GSM8K from the hub (``openai/gsm8k``, config ``main``) when ``data.path``
    is unset, else from a local copy. Solutions keep their ``<<48/2=24>>`` calculator annotations
    (the process-supervision checker reads them) and end with ``#### <answer>``."""
    path = cfg.path or GSM8K_HUB[0]
    hub_config = GSM8K_HUB[1] if path == GSM8K_HUB[0] else None
    return rows_to_examples(read_rows(path, _split_name(cfg, split), hub_config), cfg)


def load_math(cfg, split: str) -> List[Example]:
    """``data=math``: MATH problems (``problem``, ``solution``), from the hub when ``data.path`` is unset
    (:data:`MATH_HUB`: MATH's train split for training, MATH-500 for evaluation), else from a local
    file or directory. The answer is the solution's last ``\\boxed{}``; the solution, the SFT target,
    is kept as written."""
    split_name = _split_name(cfg, split)
    return rows_to_examples(read_rows(cfg.path or MATH_HUB[split], split_name), cfg)
