"""The run directory: resolved config, metrics.jsonl, checkpoints, curves.png, live progress.

    <run>/config.yaml           the composed config, as run
    <run>/metrics.jsonl         one JSON object per logged step
    <run>/checkpoints/step_N/   periodic checkpoints (last K kept); checkpoints/final/ at the end
    <run>/curves.png            loss and the method's main metric
    <run>/completions/          sampled completions with their rewards (grpo_cli/tracking.py)

Runs without an ``output_dir`` go to ``runs/<recipe>/<timestamp>``, and ``runs/<recipe>/latest``
points at the newest, so a recipe can start from another's latest run.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from grpo_cli.console import console
from grpo_cli.tracking import read_metrics


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / (recipe or "run") / datetime.now().strftime("%Y%m%d-%H%M%S")


def create_run_dir(cfg: DictConfig) -> Path:
    """Make the run directory; a default one is also linked as ``runs/<recipe>/latest``."""
    run = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg.recipe)
    run.mkdir(parents=True, exist_ok=True)
    if not cfg.output_dir:
        latest = run.parent / "latest"
        if latest.is_symlink():
            latest.unlink()
        if not latest.exists():
            latest.symlink_to(run.name, target_is_directory=True)
    with open_dict(cfg):
        cfg.output_dir = str(run)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run


def last_row(run_dir: Path) -> Dict[str, float]:
    """The run's last complete metrics row ({} when it has none)."""
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    return rows[-1] if rows else {}


def plot_curves(history: List[Dict[str, float]], main_metric: str, out: Path) -> Optional[Path]:
    """Loss and ``main_metric`` against step, side by side."""
    if not history:
        return None
    import matplotlib  # deferred: only a run that draws its curves pays for matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ["loss", main_metric]):
        ys = [h.get(key) for h in history]
        pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class ProgressBar:
    """A rich progress bar with ETA and the latest metrics; silent when not wanted or not a TTY."""

    def __init__(self, total: int, enabled: bool, keys: List[str]):
        self.keys = keys
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            disable=not self.enabled,
        )
        self.task = self.progress.add_task("train", total=total, metrics="")
        self.last_print = 0.0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, step: int, metrics: Dict[str, float]) -> None:
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in self.keys if isinstance(metrics.get(k), (int, float)))
        self.progress.update(self.task, completed=step, metrics=shown)
        if not self.enabled and time.time() - self.last_print > 10:  # a plain line for logs and CI
            self.last_print = time.time()
            console.print(f"step {step}/{self.progress.tasks[0].total} {shown}", highlight=False)


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; an older one at ``final`` goes only afterwards.

    Files are fsynced before the rename and the parent directory after it, so ``final`` is complete
    whenever it exists, whatever moment the process is killed at. Between the two renames only
    ``<final>.old`` (complete) exists; readers may fall back to it.
    """
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():  # left by an earlier kill; ``final`` is the newer complete copy
            remove_dir(old)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old.exists():
        remove_dir(old)


def remove_dir(path: Path) -> None:
    """Delete a directory without ever leaving a half-deleted one under its name: it is first
    renamed to a dot name (which readers ignore), then removed."""
    doomed = path.with_name(f".tmp-del-{path.name}-{os.getpid()}")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    shutil.rmtree(doomed)


def fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
