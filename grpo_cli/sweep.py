"""``grpo sweep``: run a grid of trainings locally, isolated, resumable, and summarise them.

    grpo sweep recipe=sft_arithmetic trainer.steps=200 'trainer.lr=1e-3,3e-3' 'trainer.seed=range(3)'

The grid uses Hydra's sweep grammar (``a=1,2``, ``range(...)``, ``choice(...)``) through Hydra's own
override parser. Each run is a ``grpo train`` process in ``<sweep dir>/<index>-<short overrides>``
with its output in ``train.log``; a crash is that run's failure only. A run that finished writes
``done.json`` (its overrides, last metrics line and evaluation), and a second invocation of the same
command skips it. The summary (a table, ``summary.csv``, ``summary.png``) aggregates runs that differ
only in ``trainer.seed``. Clusters: see ``grpo_cli/hydra_app.py`` (Hydra's launcher plugins).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig
from rich.markup import escape
from rich.table import Table

from grpo_cli.config.compose import compose_run
from grpo_cli.config.usage import SWEEP_EVAL_KEYS as EVAL_KEYS
from grpo_cli.config.usage import check_used
from grpo_cli.errors import UserError
from grpo_cli.trainer.run import console, last_row

SEED_KEY = "trainer.seed"
DONE = "done.json"


@dataclass
class Run:
    """One point of the grid."""

    index: int
    name: str  # its directory name: <index>-<short swept overrides>
    swept: Dict[str, str]  # swept key -> this run's value, as written on the command line
    overrides: List[str]  # everything passed to `grpo train` (fixed and swept), output_dir excepted


@dataclass
class Outcome:
    """What became of a run: ``ok``, ``skipped`` (finished by an earlier invocation) or ``failed``."""

    run: Run
    status: str
    metrics: Dict[str, object] = field(default_factory=dict)  # the last metrics.jsonl line
    eval: Optional[Dict[str, object]] = None
    error: str = ""
    seconds: float = 0.0


def parse_grid(args: Sequence[str]) -> Tuple[List[str], List[Tuple[str, List[str]]], List[str]]:
    """Split the overrides into fixed ones, swept ones (key, values) and the settings of the sweep
    and of its evaluations (``sweep.*``, ``eval.*``: not swept, not passed to training)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(args))
    except Exception as e:  # Hydra's OverrideParseException, with a multi-line message
        raise UserError(f"cannot parse override ({str(e).splitlines()[0]}): expected Hydra's sweep grammar") from None
    fixed, swept, settings = [], [], []
    for o in parsed:
        key = o.get_key_element()
        if key.lstrip("+~") == "output_dir":
            raise UserError("output_dir: a sweep gives each run its own directory; set sweep.dir instead")
        if key.startswith(("sweep.", "eval.")):
            if o.is_sweep_override():
                raise UserError(f"{key}: settings of the sweep and of its evaluations cannot be swept")
            settings.append(o.input_line)
        elif not o.is_sweep_override():
            fixed.append(o.input_line)
        elif not o.is_discrete_sweep():
            raise UserError(f"{key}: interval sweeps need a sweeper plugin; see docs/sweep.md (grpo_cli.hydra_app)")
        else:
            swept.append((key, list(o.sweep_string_iterator())))
    return fixed, swept, settings


def expand_grid(fixed: List[str], swept: List[Tuple[str, List[str]]]) -> List[Run]:
    """The cartesian product of the swept values, first key slowest (Hydra's order)."""
    runs = []
    for index, values in enumerate(itertools.product(*[vals for _, vals in swept])):
        chosen = {key: value for (key, _), value in zip(swept, values)}
        overrides = fixed + [f"{k}={v}" for k, v in chosen.items()]
        runs.append(Run(index, run_name(index, chosen), chosen, overrides))
    return runs


def run_name(index: int, swept: Dict[str, str], limit: int = 60) -> str:
    """``003-lr_0.001-seed_1``: the last part of each key and its value. No ``=`` or ``,``: the name
    must stay a plain value in an override (``grpo eval run=<sweep dir>/003-lr_0.001-seed_1``)."""
    short = "-".join(f"{k.lstrip('+~').split('.')[-1]}_{v}" for k, v in swept.items())
    short = re.sub(r"[^A-Za-z0-9._+-]", "_", short)[:limit]
    return f"{index:03d}-{short}" if short else f"{index:03d}"


def quoted(path: Path) -> str:
    """``path`` as a quoted override value, whatever characters the sweep directory holds."""
    return "'" + str(path).replace("'", "\\'") + "'"


def default_sweep_dir(recipe: str, fixed: List[str], swept: List[Tuple[str, List[str]]]) -> Path:
    """``runs/sweeps/<recipe>-<hash>``: the same overrides (in any order) give the same directory,
    which is what makes re-running a command resume it."""
    text = json.dumps([recipe, sorted(fixed), sorted((k, v) for k, v in swept)])
    return Path("runs") / "sweeps" / f"{recipe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def validate(recipe: str, runs: List[Run], settings: List[str]) -> DictConfig:
    """Compose every grid point now, so a typo or a wrong type fails before anything runs; returns the
    first point's config (for the ``sweep`` settings)."""
    first = None
    for run in runs:
        try:
            cfg = compose_run(recipe, [*run.overrides, *settings])
        except UserError as e:
            raise UserError(f"run {run.name}: {e}") from None
        first = first if first is not None else cfg
    if not first.sweep.eval:  # these would silently summarise nothing
        if (first.sweep.metric or "").startswith("eval."):
            raise UserError(f"sweep.metric={first.sweep.metric} needs sweep.eval=true")
        if any(a.startswith("eval.") for a in settings):
            raise UserError("eval.* overrides set each run's evaluation: add sweep.eval=true")
    return first


def last_line(log: Path) -> str:
    """The error a failed run reports: the last non-empty line of its log."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return re.sub(r"^error:\s*", "", lines[-1]) if lines else "(no output)"


def _child(args: List[str], log: Path, mode: str) -> int:
    """Run ``python -m grpo_cli.cli ARGS`` with its output appended to ``log``; its exit code."""
    with log.open(mode) as f:
        f.write("$ grpo " + " ".join(args) + "\n")
        f.flush()
        return subprocess.run(
            [sys.executable, "-m", "grpo_cli.cli", *args], stdout=f, stderr=subprocess.STDOUT
        ).returncode


def read_done(run_dir: Path, run: Run) -> Optional[Dict[str, object]]:
    """The marker of a finished run, or None; a marker of other overrides is a different sweep."""
    path = run_dir / DONE
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if done.get("overrides") != run.overrides:
        raise UserError(f"{path} is a run of other overrides ({done.get('overrides')}): pass another sweep.dir")
    return done


def execute(run: Run, recipe: str, sweep_dir: Path, cfg: DictConfig, eval_args: Sequence[str] = ()) -> Outcome:
    """Train (and evaluate) one run in its own process unless an earlier invocation finished it."""
    run_dir = sweep_dir / run.name
    done = read_done(run_dir, run)
    t0 = time.perf_counter()
    if done is None:
        if run_dir.exists():  # an interrupted or failed attempt: start it over, not on top of it
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        code = _child(
            ["train", f"recipe={recipe}", *run.overrides, f"output_dir={quoted(run_dir)}"], run_dir / "train.log", "w"
        )
        if code != 0:
            return Outcome(run, "failed", error=last_line(run_dir / "train.log"), seconds=time.perf_counter() - t0)
        done = {
            "index": run.index,
            "overrides": run.overrides,
            "swept": run.swept,
            "eval": None,
            "metrics": last_row(run_dir),
        }
        status = "ok"
    else:
        status = "skipped"
    if cfg.sweep.eval and done.get("eval") is None:  # a finished run is evaluated without retraining
        threads = [f"trainer.threads={cfg.trainer.threads}"] if cfg.trainer.threads else []
        if _child(["eval", f"run={quoted(run_dir)}", *threads, *eval_args], run_dir / "eval.log", "w") != 0:
            return Outcome(
                run, "failed", error="eval: " + last_line(run_dir / "eval.log"), seconds=time.perf_counter() - t0
            )
        done["eval"] = json.loads((run_dir / "eval" / "latest" / "eval.json").read_text())
        status = "ok"
    if status == "ok":
        done["seconds"] = done.get("seconds", 0.0) + round(time.perf_counter() - t0, 2)
        (run_dir / DONE).write_text(json.dumps(done, indent=2) + "\n")  # last: its presence means finished
    return Outcome(run, status, done.get("metrics") or {}, done.get("eval"), seconds=done.get("seconds", 0.0))


def eval_overrides(cfg: DictConfig) -> List[str]:
    """The evaluation settings of the sweep (its recipe's ``eval`` section with the command line's
    ``eval.*`` on top) for each run's ``grpo eval``."""
    return [
        f"eval.{k}={json.dumps(list(cfg.eval[k])) if k == 'ks' else ('null' if cfg.eval[k] is None else cfg.eval[k])}"
        for k in EVAL_KEYS
    ]


def run_sweep(recipe: str, args: Sequence[str], dry_run: bool = False) -> Tuple[Path, DictConfig, List[Outcome]]:
    """Run the grid (``sweep.parallel`` at a time); the outcomes in grid order."""
    fixed, swept, settings = parse_grid(args)
    runs = expand_grid(fixed, swept)
    cfg = validate(recipe, runs, settings)
    check_used("grpo sweep", args)
    sweep_dir = Path(cfg.sweep.dir) if cfg.sweep.dir else default_sweep_dir(recipe, fixed, swept)
    console.print(f"[bold]sweep[/bold] {sweep_dir}: {len(runs)} runs, {cfg.sweep.parallel} at a time")
    if dry_run:
        return sweep_dir, cfg, [Outcome(r, "planned") for r in runs]
    for r in runs:  # a directory holding another sweep's runs: stop before starting any
        read_done(sweep_dir / r.name, r)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"recipe": recipe, "args": list(args)}, indent=2) + "\n")
    outcomes: Dict[int, Outcome] = {}
    with ThreadPoolExecutor(max_workers=cfg.sweep.parallel) as pool:
        eval_args = eval_overrides(cfg)
        futures = [pool.submit(execute, r, recipe, sweep_dir, cfg, eval_args) for r in runs]
        for future in as_completed(futures):
            o = future.result()
            outcomes[o.run.index] = o
            note = f"[red]failed[/red]: {escape(o.error)}" if o.status == "failed" else o.status
            console.print(f"[{len(outcomes)}/{len(runs)}] {o.run.name} {note} ({o.seconds:.1f}s)", highlight=False)
    return sweep_dir, cfg, [outcomes[i] for i in sorted(outcomes)]


def metric_name(cfg: DictConfig) -> str:
    return cfg.sweep.metric or ("eval.accuracy" if cfg.sweep.eval else "loss")


def read_metric(
    metrics: Optional[Dict[str, object]], evaluation: Optional[Dict[str, object]], metric: str
) -> Optional[float]:
    """``eval.<key>`` from eval.json, else a key of the last metrics line; None when absent."""
    source, key = (evaluation or {}, metric[5:]) if metric.startswith("eval.") else (metrics or {}, metric)
    value = source.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metric_value(o: Outcome, metric: str) -> Optional[float]:
    return read_metric(o.metrics, o.eval, metric)


def group_by_seed(outcomes: List[Outcome], metric: str) -> List[Tuple[Dict[str, str], List[float]]]:
    """Runs that differ only in ``trainer.seed`` form a group: (its other swept values, metric values)."""
    groups: Dict[Tuple, Tuple[Dict[str, str], List[float]]] = {}
    for o in outcomes:
        others = {k: v for k, v in o.run.swept.items() if k.lstrip("+") != SEED_KEY}
        _, values = groups.setdefault(tuple(others.items()), (others, []))
        value = metric_value(o, metric)
        if value is not None:
            values.append(value)
    return list(groups.values())


def mean_std(values: List[float]) -> Tuple[Optional[float], float]:
    """Mean and sample standard deviation (0 for a single value); (None, 0) for none."""
    if not values:
        return None, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def runs_table(outcomes: List[Outcome], metric: str) -> Table:
    """One row per run: its swept values, status, the metric, and the error of a failed run."""
    keys = list(outcomes[0].run.swept) if outcomes else []
    table = Table(title=f"sweep: {metric}")
    for col in ["#", *keys, "status", metric, "seconds"]:
        table.add_column(col, justify="right" if col in (metric, "seconds", "#") else "left")
    table.add_column("error")
    for o in outcomes:
        style = {"failed": "red", "skipped": "dim"}.get(o.status, "")
        error = o.error if len(o.error) <= 60 else o.error[:59] + "…"  # in full in summary.csv
        table.add_row(
            str(o.run.index),
            *o.run.swept.values(),
            f"[{style}]{o.status}[/{style}]" if style else o.status,
            _fmt(metric_value(o, metric)),
            f"{o.seconds:.1f}",
            escape(error),
        )
    return table


def groups_table(outcomes: List[Outcome], metric: str) -> Table:
    """Runs that differ only in the seed, aggregated: mean and std of the metric over seeds."""
    groups = group_by_seed(outcomes, metric)
    keys = list(groups[0][0]) if groups else []
    table = Table(title=f"{metric}, mean and std over {SEED_KEY}")
    for col in [*keys, "seeds", "mean", "std"]:
        table.add_column(col, justify="left" if col in keys else "right")
    for values, found in groups:
        mean, std = mean_std(found)
        table.add_row(*values.values(), str(len(found)), _fmt(mean), _fmt(std) if found else "-")
    return table


def write_csv(outcomes: List[Outcome], metric: str, path: Path) -> Path:
    """``summary.csv``: one row per run, its swept values, the metric, every eval metric, the error."""
    keys = list(outcomes[0].run.swept) if outcomes else []
    eval_keys = sorted(
        {f"eval.{k}" for o in outcomes for k in (o.eval or {}) if k == "accuracy" or k.startswith(("maj@", "pass@"))}
        - {metric}
    )
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "run", "status", *keys, metric, *eval_keys, "seconds", "error"])
        for o in outcomes:
            extra = [metric_value(o, k) for k in eval_keys]
            w.writerow(
                [
                    o.run.index,
                    o.run.name,
                    o.status,
                    *o.run.swept.values(),
                    metric_value(o, metric),
                    *["" if v is None else v for v in extra],
                    round(o.seconds, 2),
                    o.error,
                ]
            )
    return path


def plot_summary(outcomes: List[Outcome], metric: str, path: Path) -> Optional[Path]:
    """``summary.png``: the metric against the first swept key (seeds aggregated: mean, std bars),
    one line per combination of the other swept keys."""
    groups = [(v, f) for v, f in group_by_seed(outcomes, metric) if f]
    if not groups:
        return None
    import matplotlib  # deferred: only a sweep that draws its summary pays for matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = next(iter(groups[0][0]), None)
    xs = list(dict.fromkeys(v.get(x_key, "all") for v, _ in groups))  # grid order, each once
    lines: Dict[str, List[Tuple[int, float, float]]] = {}
    for values, found in groups:
        label = ", ".join(f"{k}={v}" for k, v in values.items() if k != x_key) or metric
        mean, std = mean_std(found)
        lines.setdefault(label, []).append((xs.index(values.get(x_key, "all")), mean, std))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in lines.items():
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel(x_key or "")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (mean, std over {SEED_KEY})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_tables(sweep_dir: Path, cfg: DictConfig, outcomes: List[Outcome]) -> List[Table]:
    """Write summary.csv and summary.png; the tables to print (the seed aggregate when seeds vary)."""
    metric = metric_name(cfg)
    write_csv(outcomes, metric, sweep_dir / "summary.csv")
    png = sweep_dir / "summary.png"
    png.unlink(missing_ok=True)  # a plot of an earlier invocation would not show this one's runs
    if cfg.sweep.plot:
        plot_summary(outcomes, metric, png)
    tables = [runs_table(outcomes, metric)]
    if any(k.lstrip("+") == SEED_KEY for k in (outcomes[0].run.swept if outcomes else {})):
        tables.append(groups_table(outcomes, metric))
    return tables
