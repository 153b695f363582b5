"""Where a run's metrics and sampled completions go: metrics.jsonl (always), experiment trackers (chosen).

    <run>/metrics.jsonl                  one JSON object per logged step (JsonlTracker)
    <run>/completions/step_000010.jsonl  the step's sampled rows (completion_rows), every
                                         ``logging.completions_every`` steps
    logging.backends=[tensorboard,wandb,trackio,mlflow]   the same scalars, tables and config

Every tracker has one interface (:class:`Tracker`): ``scalars`` at a step, a ``table`` of rows at a
step, the composed ``config`` once at the start, ``close``. ``BACKENDS`` maps a name to the optional
package it needs (``pip install "grpo-cli[wandb]"``) and its class; a package is imported only when
its backend is chosen, and a chosen one that is missing fails before the run starts (``check_backends``).
:class:`RunLog` fans every call out to metrics.jsonl and the chosen trackers. Under torchrun only
rank 0 builds trackers and writes files.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from grpo_cli.batch import Batch
from grpo_cli.errors import UserError

Row = Dict[str, Any]
COMPLETIONS = "completions"
"""The table's name in every tracker, and the run directory's folder of completion files."""


class Tracker:
    """One destination of a run's logs; every method is a no-op unless a backend overrides it."""

    def scalars(self, row: Mapping[str, Any], step: int) -> None:
        """The step's metrics (numbers only: strings and None are skipped by the backends)."""

    def table(self, name: str, rows: List[Row], step: int) -> None:
        """Rows of one schema (a dict per row, the same keys in each) logged at ``step``."""

    def config(self, config: Dict[str, Any]) -> None:
        """The composed config, once at the start of a run."""

    def close(self) -> None:
        pass


def numbers(row: Mapping[str, Any]) -> Dict[str, float]:
    """The finite numeric entries of a metrics row (what a tracker plots), ``step`` left out."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def table_columns(rows: List[Row]) -> Dict[str, List[Any]]:
    """Rows as columns of flat values: a nested dict (``rewards``) becomes a JSON string."""
    flat = [{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows]
    return {k: [r[k] for r in flat] for k in (flat[0] if flat else {})}


def markdown_table(rows: List[Row]) -> str:
    """Rows as a markdown table (TensorBoard's text plugin renders it); ``|`` and newlines escaped."""
    cols = table_columns(rows)
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v[i]) for v in cols.values()) + " |" for i in range(len(rows))]
    return "\n".join(lines)


# --- metrics.jsonl ---


class JsonlTracker(Tracker):
    """Appends one JSON line per step to ``<run>/metrics.jsonl``; keeps the history for the final plot.

    Resuming from step N (``resume_step=N``) keeps the rows up to N and drops the later ones, which
    the resumed run writes again; the file is rewritten atomically. ``enabled=False`` (the ranks
    other than 0 of a data-parallel run) keeps the rows in memory only.
    """

    def __init__(self, run: Path, resume_step: Optional[int] = None, enabled: bool = True):
        self.path, self.enabled = run / "metrics.jsonl", enabled
        self.history: List[Dict[str, float]] = []
        if enabled and resume_step is not None and self.path.exists():
            self.history = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_name(".tmp-metrics.jsonl")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.history))
            os.replace(tmp, self.path)

    def scalars(self, row: Mapping[str, Any], step: int) -> None:
        self.write(row)

    def write(self, row: Mapping[str, Any]) -> None:
        clean = {k: (v if isinstance(v, (int, str)) or math.isfinite(v) else None) for k, v in row.items()}
        self.history.append(clean)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """The rows of a metrics.jsonl (or a completions file); a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- the optional backends: each imports its package only when built ---


class TensorBoardTracker(Tracker):
    """Event files in ``<run>/tensorboard`` (``tensorboard --logdir <run>``). A resumed run purges the
    scalars after its resume step (``purge_step``), so no step appears twice; TensorBoard does not
    purge text, so a repeated step's completion table shows twice."""

    def __init__(self, run: Path, project: str, name: str, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=purge)

    def scalars(self, row, step):
        for k, v in numbers(row).items():
            self.writer.add_scalar(k, v, step)

    def table(self, name, rows, step):
        self.writer.add_text(name, markdown_table(rows), step)

    def config(self, config):
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run (``WANDB_MODE=offline`` writes it locally, ``wandb sync`` uploads it).
    Its id is kept in ``<run>/wandb_id``: a resumed run continues the same wandb run (the steps logged
    between its last checkpoint and a crash are logged again; ``step`` is every chart's x axis)."""

    def __init__(self, run: Path, project: str, name: str, resume_step: Optional[int]):
        import wandb

        self.wandb = wandb
        rid = run_id(run / "wandb_id", lambda: uuid.uuid4().hex[:8])
        self.run = wandb.init(project=project, name=name, id=rid, resume="allow")
        self.run.define_metric("*", step_metric="step")  # our step, not wandb's own counter

    def scalars(self, row, step):
        self.run.log({**numbers(row), "step": step})

    def table(self, name, rows, step):
        cols = table_columns(rows)
        self.run.log(
            {name: self.wandb.Table(columns=list(cols), data=[list(r) for r in zip(*cols.values())]), "step": step}
        )

    def config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def close(self):
        self.run.finish()


class TrackioTracker(Tracker):
    """A trackio run (local by default: ``trackio show``); a resumed run continues the run of that name."""

    def __init__(self, run: Path, project: str, name: str, resume_step: Optional[int]):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=name, resume="allow")

    def scalars(self, row, step):
        self.trackio.log(numbers(row), step=step)

    def table(self, name, rows, step):
        cols = table_columns(rows)
        self.trackio.log(
            {name: self.trackio.Table(columns=list(cols), data=[list(r) for r in zip(*cols.values())])}, step=step
        )

    def config(self, config):
        self.run.config.update(config)

    def close(self):
        self.trackio.finish()


class MlflowTracker(Tracker):
    """An MLflow run under the experiment ``project`` (``MLFLOW_TRACKING_URI`` picks the server or
    store, as for any MLflow client). Its id is kept in ``<run>/mlflow_id``: a resumed run continues it (MLflow
    keeps every value logged, so steps between the checkpoint and a crash appear twice)."""

    def __init__(self, run: Path, project: str, name: str, resume_step: Optional[int]):
        import mlflow

        self.client = mlflow.MlflowClient()
        ids = run / "mlflow_id"
        if ids.exists():
            self.run_id = ids.read_text().strip()
        else:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            ids.write_text(self.run_id)
        self.mlflow = mlflow

    def scalars(self, row, step):
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        metrics = [Metric(key=sanitize(k), value=v, timestamp=now, step=step) for k, v in numbers(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def table(self, name, rows, step):
        self.client.log_table(self.run_id, table_columns(rows), f"{name}/step_{step:06d}.json")

    def config(self, config):
        self.client.log_dict(self.run_id, config, "config.json")

    def close(self):
        self.client.set_terminated(self.run_id)


def sanitize(key: str) -> str:
    """An MLflow metric name: letters, digits and ``_-./ `` only."""
    return re.sub(r"[^\w\-./ ]", "_", key)


def run_id(path: Path, new: Callable[[], str]) -> str:
    """The tracker run id stored at ``path``, or a ``new()`` one stored there (a resumed run reuses it)."""
    if path.exists():
        return path.read_text().strip()
    rid = new()
    path.write_text(rid)
    return rid


@dataclass(frozen=True)
class Backend:
    package: str  # imported to check the backend is installed
    extra: str  # pip install "grpo-cli[<extra>]"
    build: Callable[..., Tracker]  # (run, project, name, resume_step) -> Tracker


BACKENDS: Dict[str, Backend] = {
    "tensorboard": Backend("tensorboard", "tensorboard", TensorBoardTracker),
    "wandb": Backend("wandb", "wandb", WandbTracker),
    "trackio": Backend("trackio", "trackio", TrackioTracker),
    "mlflow": Backend("mlflow", "mlflow", MlflowTracker),
}


def check_backends(names: Sequence[str]) -> None:
    """Each chosen backend is known and its package importable; else a one-line ``UserError``
    (called before the run directory exists, so a missing package leaves nothing behind)."""
    for name in names:
        if name not in BACKENDS:
            close = difflib.get_close_matches(name, BACKENDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected some of {', '.join(BACKENDS)}"
            raise UserError(f"logging.backends: unknown backend '{name}'{hint}")
        backend = BACKENDS[name]
        try:
            importlib.import_module(backend.package)
        except ImportError:
            raise UserError(
                f"logging.backends: '{name}' needs the {backend.package} package: "
                f'pip install "grpo-cli[{backend.extra}]"'
            ) from None


# --- completion tables ---


def completions_due(step: int, every: Optional[int], samples_each_step: bool) -> bool:
    """Whether ``step`` writes a completion table: ``every=None`` on every step of a source that
    samples from the live policy (an offline source's samples are the same old ones), ``0`` never,
    ``N`` every N steps."""
    if every is None:
        return samples_each_step
    return every > 0 and step % every == 0


def capped_rows(group: Sequence[int], max_rows: int) -> int:
    """How many leading rows to keep: at most ``max_rows``, ending on a group's last row where at
    least one whole group fits (a table of whole groups shows each prompt's spread of rewards)."""
    n = min(len(group), max_rows)
    if n == len(group) or group[n] != group[n - 1]:
        return n
    whole = [i + 1 for i in range(n) if group[i + 1] != group[i]]  # ends of groups within the first n rows
    return whole[-1] if whole else n


def _value(x: torch.Tensor) -> Optional[float]:
    v = float(x)
    return v if math.isfinite(v) else None


def observation_runs(holes: torch.Tensor) -> torch.Tensor:
    """[B] long: the runs of True in each row of ``holes`` [B, T] (a completion's observations)."""
    starts = holes.clone()
    starts[:, 1:] &= ~holes[:, :-1]
    return starts.sum(-1)


def completion_rows(batch: Batch, step: int, max_rows: int) -> List[Row]:
    """The batch's first rows (:func:`capped_rows`) as completion-table rows: prompt, completion,
    answer, total and per-function rewards, the mean advantage over the row's completion tokens
    (``advantages`` [B, T-1] from ``prepare``; null when absent), length in tokens (observations of a
    multi-turn rollout included), truncation, and the model's turns (observations + 1)."""
    group = batch.group.tolist()
    n = capped_rows(group, max_rows)
    mask = batch.target_mask[:n].cpu()
    span = batch.completion_span[:n].cpu()
    lengths = span.sum(-1).tolist()
    turns = (1 + observation_runs(span & ~batch.completion_mask[:n].cpu().bool())).tolist()
    adv = batch.tensors.get("advantages")
    if adv is not None:
        adv = adv[:n].detach().float().cpu()
        adv = (adv * mask).sum(-1) / mask.sum(-1) if adv.dim() == 2 else adv  # [n]: the row's mean
    per_fn = {k.split("/", 1)[1]: v[:n].float().cpu() for k, v in batch.tensors.items() if k.startswith("reward/")}
    truncated = batch.tensors.get("truncated")
    truncated = truncated[:n].cpu() if truncated is not None else None
    rewards = None if batch.rewards is None else batch.rewards[:n].float().cpu()
    return [
        {
            "step": step,
            "index": i,
            "group": int(group[i]),
            "prompt": batch.prompts[i],
            "completion": batch.completions[i],
            "answer": batch.answers[i],
            "reward": None if rewards is None else _value(rewards[i]),
            "rewards": {name: _value(v[i]) for name, v in per_fn.items()},
            "advantage": None if adv is None else _value(adv[i]),
            "length": int(lengths[i]),
            "truncated": bool(truncated[i]) if truncated is not None else False,
            "turns": int(turns[i]),
        }
        for i in range(n)
    ]


class CompletionFiles:
    """``<run>/completions/step_<N>.jsonl``, one table per file. Resuming from step N deletes the
    files of later steps, which the resumed run writes again."""

    def __init__(self, run: Path, resume_step: Optional[int] = None):
        self.dir = run / COMPLETIONS
        if resume_step is not None and self.dir.is_dir():
            for path in self.dir.glob("step_*.jsonl"):
                if int(path.stem.split("_")[1]) > resume_step:
                    path.unlink()

    def write(self, rows: List[Row], step: int) -> Path:
        self.dir.mkdir(exist_ok=True)
        path = self.dir / f"step_{step:06d}.jsonl"
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)  # a reader never sees half a table
        return path


# --- the run's log: metrics.jsonl, completion files and the chosen trackers ---


class RunLog:
    """Fans a run's logs out to metrics.jsonl (every rank keeps the history), and, on rank 0 only,
    the completion files and the chosen trackers. A context manager: leaving it closes the trackers.

    Under torchrun, rank 0's completion table holds its own slice of the global batch: the first
    groups, enough to read what the policy samples."""

    def __init__(
        self,
        jsonl: JsonlTracker,
        trackers: List[Tracker],
        files: Optional[CompletionFiles],
        completions_every: Optional[int] = 0,
        completions_max: int = 64,
        samples_each_step: bool = False,
    ):
        self.jsonl, self.trackers, self.files = jsonl, trackers, files
        self.every, self.max_rows, self.sampled = completions_every, completions_max, samples_each_step

    @property
    def history(self) -> List[Dict[str, float]]:
        return self.jsonl.history

    def write(self, row: Mapping[str, Any]) -> None:
        self.jsonl.write(row)
        for t in self.trackers:
            t.scalars(row, int(row["step"]))

    def completions(self, batch: Batch, step: int) -> None:
        """The batch's completion table, on the steps :func:`completions_due` picks."""
        if self.files is None or not completions_due(step, self.every, self.sampled):
            return
        rows = completion_rows(batch, step, self.max_rows)
        self.files.write(rows, step)
        for t in self.trackers:
            t.table(COMPLETIONS, rows, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run_log(
    run: Path,
    backends: Sequence[str],
    project: str,
    name: Optional[str],
    config: Dict[str, Any],
    resume_step: Optional[int],
    enabled: bool,
    completions_every: Optional[int] = None,
    completions_max: int = 64,
    samples_each_step: bool = False,
) -> RunLog:
    """The run's :class:`RunLog`: trackers of ``backends`` (already checked by :func:`check_backends`)
    named ``name`` (default: the run directory's name) in ``project``, each given ``config`` once;
    completion tables as :func:`completions_due` says, at most ``completions_max`` rows."""
    jsonl = JsonlTracker(run, resume_step=resume_step, enabled=enabled)
    if not enabled:
        return RunLog(jsonl, [], None)
    trackers = [BACKENDS[b].build(run, project, name or run.name, resume_step) for b in backends]
    for t in trackers:
        t.config(config)
    files = CompletionFiles(run, resume_step)
    return RunLog(jsonl, trackers, files, completions_every, completions_max, samples_each_step)
