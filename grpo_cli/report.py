"""``grpo report``: one self-contained ``report.html`` for a run or a sweep, for a machine with no tracker.

A run's report holds the curves that tell whether RL is working (``reward_mean``, ``heldout_*``, ``kl``,
``entropy``, ...; every other numeric key of ``metrics.jsonl`` in a collapsible part), each raw (faint)
and smoothed (solid) by a debiased exponential moving average of weight ``report.smoothing`` (as
TensorBoard's slider: ``s_t = w * s_{t-1} + (1 - w) * x_t``, divided by ``1 - w^t`` so the start is not
pulled towards 0); then the evaluations (``eval/*/eval.json``), the ``config.yaml``, and the completions
of the first, middle and last steps of ``completions/step_NNNNNN.jsonl``, each row coloured from red
(the step's lowest reward) to green (its highest). A sweep's report shows ``summary.csv`` and
``summary.png`` and links each run's own report (written beside it).

Everything is inline (PNG as base64 ``data:`` URIs from matplotlib's Agg backend, CSS in the page, no
script): the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from grpo_cli.errors import UserError
from grpo_cli.trainer.run import read_metrics

HEADLINE = (
    "reward_mean",
    "heldout_*",
    "accuracy",
    "kl",
    "entropy",
    "completion_length",
    "clip_fraction",
    "zero_std_groups",
    "loss",
    "lr",
    "truncated",
    "grad_norm",
)
"""The curves shown first, in this order (``heldout_*``: every held-out metric); the rest are collapsed."""
MAX_ROWS = 64
"""Completions shown per step: a large group batch would make a page too long to read."""
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plot{margin:0}.plot img{width:380px;height:auto}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;
vertical-align:top;text-align:left}th{background:#f3f3f3}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
td pre{background:transparent;padding:0;margin:0;white-space:pre-wrap;max-width:520px}
.note{color:#666}summary{cursor:pointer;font-weight:bold;margin:.6em 0}
"""


def write_report(kind: str, target: str, output: Optional[str] = None, smoothing: float = 0.6) -> Path:
    """Write the report of a run (``kind="run"``) or a sweep (``"sweep"``); the path of the HTML."""
    path = Path(target)
    found = detect(path, kind)
    out = Path(output) if output else path / "report.html"
    if found == "sweep":
        return sweep_report(path, out, smoothing)
    return run_report(path, out, smoothing)


def detect(path: Path, key: str) -> str:
    """``run`` or ``sweep``, as ``report.<key>`` says; a one-line error when the directory is neither."""
    expected = "a run directory with metrics.jsonl" if key == "run" else "a sweep directory with sweep.json"
    if not path.is_dir():
        raise UserError(f"report.{key}: no directory '{path}' (expected {expected})")
    is_sweep = (path / "sweep.json").is_file() or (path / "summary.csv").is_file()
    is_run = (path / "metrics.jsonl").is_file()
    if key == "run" and is_run:
        return "run"
    if key == "sweep" and is_sweep:
        return "sweep"
    if is_run or is_sweep:
        other = "sweep" if is_sweep else "run"
        raise UserError(f"report.{key}: '{path}' is a {other} directory: pass {other}={path}")
    if key == "run" and (path / "config.yaml").is_file():
        raise UserError(f"report.run: '{path}' has no metrics.jsonl yet (expected a run that logged a step)")
    raise UserError(f"report.{key}: '{path}' is neither a run (metrics.jsonl) nor a sweep (sweep.json, summary.csv)")


def load_metrics(run: Path) -> List[Dict[str, object]]:
    """The rows of ``<run>/metrics.jsonl``; a one-line error when none can be read."""
    path = run / "metrics.jsonl"
    try:
        rows = read_metrics(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e.__class__.__name__}); expected one JSON object per line") from None
    rows = [r for r in rows if isinstance(r.get("step"), (int, float))]
    if not rows:
        raise UserError(f"{path}: no metrics rows with a 'step' (expected one JSON object per logged step)")
    return rows


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """Debiased exponential moving average: ``m_t = w m_{t-1} + (1 - w) x_t``, reported as
    ``m_t / (1 - w^t)`` (the mean of the values seen so far, weighted ``w^age``); ``w = 0`` is the raw line."""
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = weight * m + (1 - weight) * x
        out.append(m / (1 - weight**t) if weight > 0 else x)
    return out


def series(rows: Sequence[Dict[str, object]], key: str) -> Tuple[List[float], List[float]]:
    """(steps, values) of ``key``, only where it is a finite number."""
    pts = [
        (float(r["step"]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    return [s for s, _ in pts], [v for _, v in pts]


def split_keys(rows: Sequence[Dict[str, object]]) -> Tuple[List[str], List[str]]:
    """(headline keys in ``HEADLINE`` order, every other numeric key sorted) found in ``rows``."""
    numeric = sorted({k for r in rows for k, v in r.items() if k != "step" and series([r], k)[0]})
    head: List[str] = []
    for pattern in HEADLINE:
        prefix = pattern[:-1] if pattern.endswith("*") else None
        head += [k for k in numeric if (k.startswith(prefix) if prefix else k == pattern) and k not in head]
    return head, [k for k in numeric if k not in head]


def plot_png(key: str, steps: List[float], values: List[float], weight: float) -> str:
    """A small PNG of ``key`` against step, raw faint and smoothed solid, as a ``data:`` URI."""
    import matplotlib  # deferred: only a report pays for matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    ax.plot(steps, values, color="C0", alpha=0.3, lw=1, label="raw")
    ax.plot(steps, smooth(values, weight), color="C0", lw=1.6, label=f"EMA {weight:g}")
    if len(steps) == 1:
        ax.plot(steps, values, "o", color="C0")
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return png_uri(buf.getvalue())


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def e(value: object) -> str:
    """HTML-escaped text of ``value`` (quotes too: it may land in an attribute)."""
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def plots_html(rows: Sequence[Dict[str, object]], keys: Sequence[str], weight: float) -> str:
    figs = []
    for key in keys:
        steps, values = series(rows, key)
        figs.append(
            f'<figure class="plot" id="metric-{e(key)}"><img alt="{e(key)}" '
            f'src="{plot_png(key, steps, values, weight)}"></figure>'
        )
    return '<div class="plots">' + "".join(figs) + "</div>"


def curves_section(rows: Sequence[Dict[str, object]], weight: float) -> str:
    """The headline curves, then every other numeric metric in a collapsed ``<details>``."""
    head, rest = split_keys(rows)
    how = (
        f"Faint: the logged value; solid: its exponential moving average (weight {weight:g}, debiased; "
        "<code>report.smoothing</code>)."
    )
    parts = [f'<h2 id="curves">Training curves</h2><p class="note">{how}</p>']
    parts.append(plots_html(rows, head, weight) if head else '<p class="note">No headline metric was logged.</p>')
    if rest:
        parts.append(
            f"<details><summary>All metrics ({len(rest)} more: {e(', '.join(rest))})</summary>"
            f"{plots_html(rows, rest, weight)}</details>"
        )
    return "".join(parts)


def table_html(header: Sequence[str], body: Sequence[Sequence[str]], styles: Sequence[str] = ()) -> str:
    """A table of already-escaped cells; ``styles``: an optional inline style per body row."""
    head = "".join(f"<th>{h}</th>" for h in header)
    trs = []
    for i, row in enumerate(body):
        style = f' style="{styles[i]}"' if i < len(styles) and styles[i] else ""
        trs.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(trs)}</table>"


def eval_section(run: Path) -> str:
    """One row per ``<run>/eval/*/eval.json``, oldest first; the one ``eval/latest`` points at is marked."""
    root = run / "eval"
    found = sorted(
        (p for p in root.glob("*/eval.json") if p.parent.name != "latest" and not p.parent.is_symlink()),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        return '<h2 id="eval">Evaluations</h2><p class="note">No evaluation yet (<code>grpo eval run=DIR</code>).</p>'
    latest = (root / "latest").resolve() if (root / "latest").exists() else None
    results = []
    for p in found:
        try:
            results.append((p.parent, json.loads(p.read_text())))
        except (OSError, json.JSONDecodeError):
            results.append((p.parent, {"error": "unreadable eval.json"}))
    keys = list(dict.fromkeys(k for _, r in results for k in r if k not in ("output_dir",)))
    body = [
        [e(d.name + (" (latest)" if latest == d.resolve() else ""))] + [e(fmt(r.get(k))) for k in keys]
        for d, r in results
    ]
    return '<h2 id="eval">Evaluations</h2>' + table_html(["evaluation", *map(e, keys)], body)


def config_section(run: Path) -> str:
    path = run / "config.yaml"
    text = path.read_text(errors="replace") if path.is_file() else None
    body = f"<pre>{e(text)}</pre>" if text is not None else '<p class="note">No config.yaml in the run.</p>'
    return f'<h2 id="config">Config</h2><details open><summary>config.yaml</summary>{body}</details>'


def step_files(run: Path) -> List[Tuple[int, Path]]:
    """(step, file) of ``<run>/completions/step_NNNNNN.jsonl``, by step."""
    found = []
    for p in (run / "completions").glob("step_*.jsonl"):
        m = re.fullmatch(r"step_(\d+)\.jsonl", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def reward_colour(reward: object, low: float, high: float) -> str:
    """Background from red (``low``) through yellow to green (``high``); grey for a missing reward."""
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
        return "background:#eee"
    t = 0.5 if high <= low else min(1.0, max(0.0, (reward - low) / (high - low)))
    return f"background:hsl({round(120 * t)},70%,88%)"


def reward_range(rows: Sequence[Dict[str, object]]) -> Tuple[float, float]:
    """The step's min and max reward; when all are equal, widened to include [0, 1] so an all-correct
    step is green and an all-wrong one red."""
    values = [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float)) and math.isfinite(r["reward"])]
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    return (min(low, 0.0), max(high, 1.0)) if low == high else (low, high)


def completions_table(rows: Sequence[Dict[str, object]]) -> str:
    """One row per completion, coloured by its reward within the step."""
    low, high = reward_range(rows)
    shown = list(rows[:MAX_ROWS])
    header = ["#", "group", "reward", "rewards", "advantage", "length", "truncated", "prompt", "completion", "answer"]
    body = [
        [
            e(r.get("index", "")),
            e(r.get("group", "")),
            e(fmt(r.get("reward"))),
            e(", ".join(f"{k}: {fmt(v)}" for k, v in (r.get("rewards") or {}).items())),
            e(fmt(r.get("advantage"))),
            e(r.get("length", "")),
            e(r.get("truncated", "")),
            f"<pre>{e(r.get('prompt', ''))}</pre>",
            f"<pre>{e(r.get('completion', ''))}</pre>",
            e(r.get("answer", "")),
        ]
        for r in shown
    ]
    more = f'<p class="note">The first {MAX_ROWS} of {len(rows)} completions.</p>' if len(rows) > MAX_ROWS else ""
    return table_html(header, body, [reward_colour(r.get("reward"), low, high) for r in shown]) + more


def completions_section(run: Path) -> str:
    """The completions of the first, middle and last logged steps, or a note when the run has none."""
    files = step_files(run)
    title = '<h2 id="completions">Completions</h2>'
    if not files:
        return title + '<p class="note">This run has no completions/ directory: no completions were logged.</p>'
    picked = list(dict.fromkeys([files[0], files[len(files) // 2], files[-1]]))
    parts = [title, '<p class="note">Rows coloured from red (the step\'s lowest reward) to green (its highest).</p>']
    for step, path in picked:
        rows = read_metrics(path)  # the same JSON-lines reading
        parts.append(f"<h3>Step {step}</h3>")
        parts.append(completions_table(rows) if rows else '<p class="note">No readable rows.</p>')
    return "".join(parts)


def page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def write_atomic(path: Path, text: str) -> Path:
    """Write through a temporary file and rename it: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_summary(run: Path, rows: Sequence[Dict[str, object]]) -> str:
    """The run's name, recipe and last logged step."""
    recipe = ""
    config = run / "config.yaml"
    if config.is_file():
        m = re.search(r"^recipe:\s*(\S+)", config.read_text(errors="replace"), re.M)
        recipe = f", recipe <code>{e(m.group(1))}</code>" if m else ""
    last = rows[-1].get("step")
    return f"<p>{e(run.resolve())}{recipe}: {len(rows)} logged steps, the last step {e(fmt(last))}.</p>"


def run_report(run: Path, out: Path, weight: float) -> Path:
    """Write the report of one run to ``out``."""
    rows = load_metrics(run)
    body = (
        f"<h1>Run report: {e(run.resolve().name)}</h1>"
        + run_summary(run, rows)
        + curves_section(rows, weight)
        + eval_section(run)
        + completions_section(run)
        + config_section(run)
    )
    return write_atomic(out, page(f"report: {run.resolve().name}", body))


def read_summary(sweep: Path) -> Tuple[List[str], List[List[str]]]:
    """``summary.csv`` as (header, rows); without one, the run directories found (finished or not)."""
    path = sweep / "summary.csv"
    if path.is_file():
        try:
            table = list(csv.reader(path.read_text(errors="replace").splitlines()))
        except csv.Error as err:
            raise UserError(f"{path}: not a CSV table ({err})") from None
        if table:
            return table[0], table[1:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
    return ["run"], [[name] for name in runs]


def sweep_runs_table(sweep: Path, out: Path, weight: float) -> str:
    """The summary table with a link to each run's report (written now, beside the run)."""
    header, rows = read_summary(sweep)
    col = header.index("run") if "run" in header else None
    body = []
    for row in rows:
        cells = [e(c) for c in row]
        link = ""
        run = sweep / row[col] if col is not None and col < len(row) else None
        if run is not None and (run / "metrics.jsonl").is_file():
            try:
                target = run_report(run, run / "report.html", weight)
                link = f'<a href="{e(Path(os.path.relpath(target, out.parent)).as_posix())}">report</a>'
            except UserError as err:  # one run's unreadable metrics: say so, report the others
                link = f'<span class="note">{e(err)}</span>'
        body.append(cells + [link or '<span class="note">no metrics</span>'])
    return table_html([*map(e, header), "report"], body)


def sweep_report(sweep: Path, out: Path, weight: float) -> Path:
    """Write the report of a sweep to ``out``, and each of its runs' reports beside them."""
    info = sweep / "sweep.json"
    try:
        meta = json.loads(info.read_text()) if info.is_file() else {}
    except (OSError, json.JSONDecodeError):
        meta = {}
    command = f"grpo sweep recipe={meta.get('recipe', '?')} {' '.join(meta.get('args', []))}" if meta else ""
    png = sweep / "summary.png"
    plot = (
        f'<h2 id="plot">Summary plot</h2><img alt="summary" src="{png_uri(png.read_bytes())}">'
        if png.is_file()
        else '<p class="note">No summary.png (a sweep without sweep.plot, or no finished run).</p>'
    )
    body = (
        f"<h1>Sweep report: {e(sweep.resolve().name)}</h1><p>{e(sweep.resolve())}</p>"
        + (f"<pre>{e(command)}</pre>" if command else "")
        + f'<h2 id="runs">Runs</h2>{sweep_runs_table(sweep, out, weight)}'
        + plot
    )
    return write_atomic(out, page(f"sweep report: {sweep.resolve().name}", body))
