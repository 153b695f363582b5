"""Checkpoints that survive kills, exact resume, and a clean stop on SIGINT/SIGTERM.

    <run>/checkpoints/step_000040/   model.safetensors (full fine-tuning) or adapter_model.safetensors
                                     (LoRA, on top of the start model), the tokenizer, and
        trainer_state.pt             optimiser, scheduler, RNG states, data position, counters:
                                     tensors and plain containers only (loaded with weights_only=True)
        checkpoint.json              {"step": 40}
    <run>/checkpoints/final/         the same after the last step

A checkpoint is written to ``.tmp-<name>``, fsynced and renamed into place, and an old one is renamed
to a dot name before it is deleted: a checkpoint directory whose name does not start with a dot is
always complete, whatever moment the writer was killed at, and readers ignore dot names.

``resume=true`` continues the run in ``output_dir`` (else the recipe's latest run) from its newest
checkpoint; ``resume=<run or checkpoint dir>`` names one. The policy is first built from
``model.name_or_path`` exactly as at the start (so the reference model is the start model, never the
resumed weights); then the checkpoint's weights or adapter, the optimiser, the scheduler, the data
position and, last, every RNG are restored. On CPU the resumed run's metrics equal the
uninterrupted run's exactly (tests/test_reliability.py). While ``model.name_or_path`` is unchanged, the
start is the directory the run recorded (``model.resolved_path`` in its config.yaml), not what a
``latest`` link points at now; a LoRA adapter is restored only on the base weights it was trained on
(the fingerprint in the checkpoint's ``base_model.json``). A run whose final checkpoint already
reached ``trainer.steps`` is left untouched ("already complete"); a larger ``trainer.steps`` trains on.

Data parallel (docs/distributed.md): every rank calls ``save``; rank 0 writes, with each rank's RNG
states and source position (``ranks`` in trainer_state.pt); the ranks meet at a barrier after it.
On resume rank r takes entry r. At another world size the data order still continues exactly (the
question sampler is the same on every rank); a rank the checkpoint holds no entry for starts fresh
random streams seeded from (trainer.seed, rank, step).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from grpo_cli.errors import UserError
from grpo_cli.models.load import (
    BASE_FILE,
    base_fingerprint,
    is_peft,
    load_weights,
    save_checkpoint_model,
    write_base_record,
)
from grpo_cli.trainer.distributed import LOCAL, Dist, barrier, gather_objects, on_main, rank_seed
from grpo_cli.trainer.run import atomic_replace_dir, console, remove_dir

STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
NAME = re.compile(r"(step_\d+|final)(\.old)?")
"""Checkpoint directory names; ``.old`` is the complete previous copy while a save replaces it."""
RESUME_FREE = (
    "resume",
    "output_dir",
    "recipe",
    "description",
    "trainer.steps",
    "trainer.threads",
    "trainer.device",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.max_bad_steps",
    "trainer.trim_memory",
    "trainer.onednn_cache",
    "logging.",
    "eval.",
    "sweep.",
    "model.resolved_path",  # recorded by the run itself; a changed start shows as model.name_or_path
)
"""Config keys a resumed run may change without changing what it computes (``trainer.steps``
changes a decaying schedule's length, as asked)."""


@dataclass
class RunState:
    """What the loop carries from step to step; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    """Tokens trained on so far (attention-mask tokens of every batch)."""
    seconds: float = 0.0
    """Training wall-clock time so far, across resumes."""
    skipped_steps: int = 0
    """Optimiser updates skipped because the loss or the gradient norm was not finite."""
    bad_in_row: int = 0
    """Consecutive steps with a skipped update; ``trainer.max_bad_steps`` of them stop the run."""


def rng_state() -> Dict[str, Any]:
    """Python's and torch's global RNG states (and CUDA's, when it is in use)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(model: torch.nn.Module, where: str) -> None:
    """Refuse to save non-finite weights: a checkpoint with a NaN would poison every resume."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise UserError(
                f"refusing to save checkpoint {where}: weight '{name}' is not finite; the previous checkpoints are kept"
            )


class Checkpointer:
    """Saves and restores everything a run needs to continue: weights (or adapter), optimiser,
    scheduler, RNGs, the data source's position and the algorithm's state (its ``state_dict()``)."""

    def __init__(self, run: Path, policy, opt, sched, source, algorithm, keep: int, seed: int = 0, dist: Dist = LOCAL):
        self.root = run / "checkpoints"
        self.policy, self.opt, self.sched, self.source, self.algorithm = policy, opt, sched, source, algorithm
        self.keep, self.seed, self.dist = keep, seed, dist
        self.last: Optional[Tuple[str, int]] = None
        # The base's fingerprint as the run starts (read once): every adapter checkpoint records it.
        adapters = any(is_peft(m) for m in policy.model.modules())
        self.base_print = base_fingerprint(policy.base_ref) if adapters else None
        on_main(recover, self.root)

    def state(self, progress: RunState, ranks: List[Dict[str, Any]]) -> Dict[str, Any]:
        algorithm = self.algorithm.state_dict()
        sharded = (
            self.dist.enabled and self.dist.strategy == "fsdp"
        )  # its optimiser state is split over ranks: not saved
        return {
            "progress": asdict(progress),
            "optimizer": None if sharded else self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "source": self.source.state_dict(),
            "algorithm": algorithm,
            "extra": [m.state_dict() for m in self.policy.extra],  # modules trained beside the model
            **({"ranks": ranks} if len(ranks) > 1 else {}),
        }

    def save(self, name: str, progress: RunState) -> Path:
        """Write ``checkpoints/<name>`` atomically (rank 0; every rank calls it); keep the last ``keep``."""
        final = self.root / name
        if self.last == (name, progress.step):  # already saved at this step (a signal during a save)
            return final
        ranks = gather_objects({"rng": rng_state(), "source": self.source.state_dict()})
        with self.dist.full_weights(self.policy.model):
            for module in [self.policy.model, *self.policy.extra]:
                check_finite(module, name)  # on every rank: the same weights, the same verdict
        weights = self.dist.gathered_state(self.policy.model)
        if self.dist.is_main:
            self.write(final, progress, ranks, weights)
        barrier()
        self.last = (name, progress.step)
        return final

    def write(self, final: Path, progress: RunState, ranks: List[Dict[str, Any]], weights=None) -> None:
        """The files of one checkpoint, written to a dot directory and renamed into place."""
        name = final.name
        tmp = self.root / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_checkpoint_model(self.policy.model, self.policy.tokenizer, tmp, self.policy.base_ref, weights)
        if (tmp / "adapter_config.json").is_file():
            write_base_record(tmp, self.policy.base_ref, self.base_print)
        torch.save(self.state(progress, ranks), tmp / STATE_FILE)
        (tmp / INFO_FILE).write_text(json.dumps({"step": progress.step}))
        atomic_replace_dir(tmp, final)
        steps = sorted(p for p in self.root.iterdir() if re.fullmatch(r"step_\d+", p.name))
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old != final:  # the checkpoint just written stays, even with keep_checkpoints=0
                remove_dir(old)

    def restore(self, ckpt: Path) -> RunState:
        """Load ``ckpt`` into the freshly built run; the RNGs come last, right before the loop."""
        if self.dist.enabled and self.dist.strategy == "fsdp":
            raise UserError(
                "resume: runs with trainer.distributed=fsdp cannot resume yet; start a new run from the "
                f"checkpoint's weights (model.name_or_path={ckpt}) or use trainer.distributed=ddp"
            )
        self.check_base(ckpt)
        load_weights(self.policy.model, ckpt)
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ranks = state.get("ranks") or [{"rng": state["rng"], "source": state["source"]}]
        mine = ranks[self.dist.rank] if self.dist.rank < len(ranks) else None
        self.source.load_state_dict((mine or ranks[0])["source"])  # the data position is every rank's
        if state["algorithm"] is not None:
            self.algorithm.load_state_dict(state["algorithm"])
        for module, weights in zip(self.policy.extra, state.get("extra", [])):
            module.load_state_dict(weights)
        progress = RunState(**state["progress"])
        on_main(discard_after, self.root, progress.step)
        if len(ranks) != self.dist.world_size:
            console.print(
                f"[yellow]warning:[/yellow] resume: {ckpt} was saved by {len(ranks)} processes, this run has "
                f"{self.dist.world_size}: the data order continues exactly, the sampling of the ranks the "
                "checkpoint has no state for starts fresh (not bitwise equal to an uninterrupted run)",
                soft_wrap=True,
            )
        if mine is not None:
            set_rng_state(mine["rng"])
        else:  # a rank the checkpoint knows nothing of: new streams, deterministic in (seed, rank, step)
            fresh = rank_seed(self.seed, self.dist.rank, progress.step)
            self.source.reseed(fresh)
            random.seed(fresh)
            torch.manual_seed(fresh)
        console.print(f"[bold]resume[/bold] from {ckpt} (step {progress.step})", soft_wrap=True)
        return progress

    def check_base(self, ckpt: Path) -> None:
        """An adapter restored on other base weights than it was trained on would train on, silently
        wrong: refuse when both fingerprints are known and differ."""
        record = ckpt / BASE_FILE
        saved = json.loads(record.read_text()).get("fingerprint") if record.is_file() else None
        if saved and self.base_print and saved != self.base_print:
            raise UserError(
                f"resume: the base model {self.policy.base_ref} is not the one the adapter in {ckpt} was "
                "trained on (its weights differ): resume with the run's model.name_or_path, or restore that base"
            )


def recover(root: Path) -> None:
    """Tidy what a killed save left: temporary dot directories go; a ``<name>.old`` is dropped when
    ``<name>`` exists (it is older), else renamed back to ``<name>`` (it is the last complete copy)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(".old") and NAME.fullmatch(p.name):
            base = p.with_name(p.name[: -len(".old")])
            if base.exists():
                remove_dir(p)
            else:
                p.rename(base)


def list_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first; dot names are ignored."""
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        if not (NAME.fullmatch(p.name) and (p / STATE_FILE).is_file() and (p / INFO_FILE).is_file()):
            continue
        try:
            step = int(json.loads((p / INFO_FILE).read_text())["step"])
        except (ValueError, KeyError, TypeError):
            continue
        found.append((step, not p.name.endswith(".old"), p))
    return [(step, p) for step, _, p in sorted(found)]


def latest_checkpoint(run: Path) -> Optional[Path]:
    found = list_checkpoints(run / "checkpoints")
    return found[-1][1] if found else None


def discard_after(root: Path, step: int) -> None:
    """Resuming from ``step`` abandons later checkpoints (another timeline); they would otherwise
    count as the newest ones."""
    for later, path in list_checkpoints(root):
        if later > step:
            console.print(
                f"[yellow]warning:[/yellow] resume: removing {path.name} (step {later}), newer than the resumed "
                f"step {step}",
                soft_wrap=True,
            )
            remove_dir(path)


def set_aside(run: Path) -> None:
    """A fresh run in a directory holding another run's checkpoints moves them and its metrics to
    ``<run>/previous-<time>/``: nothing is lost, and ``resume=true`` never mixes the two runs."""
    if not list_checkpoints(run / "checkpoints"):
        return
    dest = run / f"previous-{datetime.now():%Y%m%d-%H%M%S}"
    dest.mkdir()
    for name in ("checkpoints", "metrics.jsonl", "config.yaml"):
        if (run / name).exists():
            (run / name).rename(dest / name)
    console.print(
        f"[yellow]warning:[/yellow] {run} held a run's checkpoints: moved to {dest} (resume=true continues a run)",
        soft_wrap=True,
    )


def resolve_resume(cfg: DictConfig) -> Optional[Path]:
    """The checkpoint ``resume`` names (None when it is false); points ``output_dir`` at its run.
    Without ``resume``, an ``output_dir`` holding an earlier run's checkpoints is first set aside."""
    value = cfg.get("resume", False)
    if value is None or value is False or str(value).lower() == "false":
        if cfg.output_dir and Path(cfg.output_dir).is_dir():
            set_aside(Path(cfg.output_dir))
        return None
    if value is True or str(value).lower() == "true":
        target = Path(cfg.output_dir) if cfg.output_dir else Path("runs") / (cfg.recipe or "run") / "latest"
    else:
        target = Path(str(value)).expanduser()
    if not target.exists():
        raise UserError(f"resume: no run or checkpoint directory '{target}'")
    # A kill between a save's two renames leaves <name>.old as the last copy: put it back first, so
    # the checkpoint chosen here is the one restored (the Checkpointer would rename it later).
    recover(target.parent if (target / INFO_FILE).is_file() else target / "checkpoints")
    if not target.exists() and target.name.endswith(".old"):
        target = target.with_name(target.name[: -len(".old")])
    ckpt = target if (target / INFO_FILE).is_file() else latest_checkpoint(target)
    if ckpt is None or not (ckpt / STATE_FILE).is_file():
        raise UserError(
            f"resume: no complete checkpoint in '{target}' (runs save one every trainer.save_every steps, "
            "on SIGINT/SIGTERM and at the end)"
        )
    run = ckpt.resolve().parent.parent
    if cfg.output_dir and Path(cfg.output_dir).resolve() != run:
        raise UserError(f"resume: checkpoint {ckpt} belongs to run {run}, not to output_dir={cfg.output_dir}")
    if finished_step(ckpt, cfg.trainer.steps) is None:  # a finished run is left as it is: nothing to warn about
        warn_config_changes(run, cfg)
    with open_dict(cfg):
        cfg.output_dir = str(run)
    return ckpt


def finished_step(ckpt: Path, steps: int) -> Optional[int]:
    """The step of ``ckpt`` when it is a run's final checkpoint at or past ``steps``: resuming it has
    nothing to train (a larger ``trainer.steps`` does), so the run must stay exactly as it is."""
    if ckpt.name.split(".")[0] != "final":
        return None
    step = int(json.loads((ckpt / INFO_FILE).read_text())["step"])
    return step if step >= steps else None


def already_complete(ckpt: Path, steps: int) -> Path:
    """Say that the run of the final checkpoint ``ckpt`` has nothing left to train; its directory."""
    step, run = finished_step(ckpt, steps), ckpt.resolve().parent.parent
    counted = f"{step}/{steps} steps" if step == steps else f"{step} steps, trainer.steps={steps}"
    console.print(f"already complete ({counted}): {run}", highlight=False, soft_wrap=True)
    return run


def recorded_start(ckpt: Path, name_or_path: str) -> Optional[str]:
    """The start model the resumed run recorded (``model.resolved_path`` in its config.yaml), while
    ``model.name_or_path`` is the one it started with: a ``latest`` link moved since must not swap
    the reference model or the LoRA base under a resumed run. None: resolve ``name_or_path`` anew."""
    saved = ckpt.resolve().parent.parent / "config.yaml"
    if not saved.is_file():
        return None
    model = (OmegaConf.to_container(OmegaConf.load(saved)) or {}).get("model") or {}
    start = model.get("resolved_path")
    if not start or model.get("name_or_path") != name_or_path:
        return None
    if not Path(start).exists():
        raise UserError(f"resume: the run's start model {start} (model.name_or_path={name_or_path}) no longer exists")
    return start


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def warn_config_changes(run: Path, cfg: DictConfig) -> List[str]:
    """Warn about settings that differ from the run's config.yaml: the continuation is exact only
    with the same ones."""
    if not (run / "config.yaml").is_file():
        return []
    old = _flatten(OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [
        f"{k}={new.get(k)!r} (was {old.get(k)!r})"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith(RESUME_FREE)
    ]
    if changed:
        console.print(
            f"[yellow]warning:[/yellow] resuming with a config that differs from {run}/config.yaml: "
            f"{'; '.join(changed)}; the continuation is exact only with the run's settings",
            highlight=False,
            soft_wrap=True,
        )
    return changed


class StopOnSignal:
    """While active (in the main thread), SIGINT and SIGTERM ask the loop to stop after the current
    step, which then saves a checkpoint; a second signal stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: Dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        os.write(
            2,
            f"\n{name}: finishing this step, then saving a checkpoint "
            "(send it again to quit without saving)\n".encode(),
        )


def interrupted_message(step: int, path: Path, run: Path) -> str:
    return f"interrupted at step {step}: checkpoint saved to {path}; resume with resume=true (or resume={run})"
