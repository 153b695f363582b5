"""Trackers (grpo_cli/tracking.py): each backend read back with its own reader, offline; the completion
tables' rows; a missing tracker package fails before the run starts; a training run's event files
and completion files."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose

from grpo_cli.batch import Batch
from grpo_cli.tracking import (
    BACKENDS,
    CompletionFiles,
    capped_rows,
    check_backends,
    completion_rows,
    completions_due,
    open_run_log,
)

ROW_KEYS = {"step", "index", "group", "prompt", "completion", "answer", "reward", "rewards", "advantage", "length"}
ROW_KEYS |= {"truncated", "turns"}


def hand_batch() -> Batch:
    """3 rows, T=4: completion tokens at positions 2-3, 1-3 and 3 (left-padded prompts)."""
    comp = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    batch = Batch(
        input_ids=torch.arange(12).view(3, 4),
        attention_mask=torch.ones(3, 4, dtype=torch.long),
        completion_mask=comp,
        prompts=["p0", "p0", "p1"],
        completions=["c0", "c1", "c2"],
        answers=["a", "a", "b"],
        group=torch.tensor([0, 0, 1]),
        rewards=torch.tensor([1.0, float("nan"), 0.0]),
    )
    # advantages [B, T-1]: target t predicts token t+1, so target_mask = comp[:, 1:]
    batch.tensors["advantages"] = torch.tensor([[9.0, 1.0, 3.0], [2.0, 4.0, 6.0], [7.0, 7.0, -5.0]])
    batch.tensors["reward/format"] = torch.tensor([1.0, 0.0, float("nan")])
    batch.tensors["truncated"] = torch.tensor([False, True, False])
    return batch


def test_completion_rows_of_a_hand_made_batch():
    rows = completion_rows(hand_batch(), step=7, max_rows=64)
    assert [set(r) for r in rows] == [ROW_KEYS] * 3
    # row 0: targets 1, 2 -> (1 + 3) / 2 = 2; row 1: targets 0, 1, 2 -> (2 + 4 + 6) / 3 = 4; row 2: -5
    assert [r["advantage"] for r in rows] == [2.0, 4.0, -5.0]
    assert [r["length"] for r in rows] == [2, 3, 1]
    assert [r["reward"] for r in rows] == [1.0, None, 0.0]  # NaN -> null
    assert [r["rewards"] for r in rows] == [{"format": 1.0}, {"format": 0.0}, {"format": None}]
    assert [r["truncated"] for r in rows] == [False, True, False]
    assert [r["turns"] for r in rows] == [1, 1, 1]
    assert [(r["step"], r["index"], r["group"], r["prompt"], r["answer"]) for r in rows] == [
        (7, 0, 0, "p0", "a"),
        (7, 1, 0, "p0", "a"),
        (7, 2, 1, "p1", "b"),
    ]
    json.dumps(rows, allow_nan=False)  # valid JSON: no NaN anywhere


def test_completion_rows_without_algorithm_tensors():
    batch = hand_batch()
    batch.tensors, batch.rewards = {}, None
    rows = completion_rows(batch, step=1, max_rows=2)
    assert [(r["advantage"], r["reward"], r["rewards"], r["truncated"]) for r in rows] == [(None, None, {}, False)] * 2


def test_capped_rows_keeps_whole_groups_first():
    group = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert capped_rows(group, 64) == 9
    assert capped_rows(group, 6) == 6
    assert capped_rows(group, 7) == 6  # the third group does not fit whole: left out
    assert capped_rows(group, 2) == 2  # no whole group fits: the first rows


def test_completions_due():
    assert [completions_due(s, None, True) for s in (1, 2)] == [True, True]  # live sampling: every step
    assert not completions_due(1, None, False)  # offline source: never by default
    assert [completions_due(s, 2, False) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert not completions_due(5, 0, True)


def test_completion_files_rewritten_after_the_resume_point(tmp_path):
    files = CompletionFiles(tmp_path)
    for step in (1, 2, 3):
        files.write([{"step": step}], step)
    CompletionFiles(tmp_path, resume_step=2)
    assert sorted(p.name for p in (tmp_path / "completions").iterdir()) == ["step_000001.jsonl", "step_000002.jsonl"]


def log_steps(run, backends, steps, resume_step=None, loss=lambda s: 1.0 / s):
    """A RunLog over ``backends`` writing ``loss``, ``reward_mean``, ``lr`` and a completion table per step."""
    config = {"trainer": {"lr": 0.1}}
    with open_run_log(run, backends, "proj", None, config, resume_step, True, 1, 64, True) as log:
        for s in steps:
            log.write({"step": s, "loss": loss(s), "reward_mean": 0.5 * s, "lr": 0.1, "note": "x"})
            log.completions(hand_batch(), s)


def test_tensorboard_events_and_resume_purge(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_accumulator import (
        EventAccumulator as PluginEventAccumulator,
    )

    log_steps(tmp_path, ["tensorboard"], [1, 2, 3])
    log_steps(tmp_path, ["tensorboard"], [3], resume_step=2, loss=lambda s: 42.0)  # resumed: step 3 again
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(1, 1.0), (2, 0.5), (3, 42.0)]  # step 3 once, the resumed run's
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([0.1] * 3)
    # the text plugin stores its markdown as tensors, which TensorBoard's readers do not purge: the
    # table of a repeated step shows twice
    plugins = PluginEventAccumulator(str(tmp_path / "tensorboard"))
    plugins.Reload()
    tables = plugins.Tensors("completions/text_summary")
    assert [t.step for t in tables] == [1, 2, 3, 3]
    assert tables[-1].tensor_proto.string_val[0].decode().startswith("| step | index | group | prompt |")
    assert (tmp_path / "metrics.jsonl").read_text().count('"step": 3') == 1


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "myrun"
    run.mkdir()
    log = open_run_log(run, ["wandb"], "proj", None, {"trainer": {"lr": 0.1}}, None, True, 1, 64, True)
    for s in (1, 2):
        log.write({"step": s, "loss": 1.0 / s, "reward_mean": 0.5 * s, "note": "x"})
        log.completions(hand_batch(), s)
    wb = log.trackers[0].run
    assert (wb.name, wb.project, dict(wb.config)["trainer"]) == ("myrun", "proj", {"lr": 0.1})
    assert (wb.summary["loss"], wb.summary["step"], wb.summary["reward_mean"]) == (0.5, 2, 1.0)
    log.close()
    # offline, the run lives in WANDB_DIR under the id kept in the run directory; its tables as files
    (offline,) = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{(run / 'wandb_id').read_text()}")
    assert (offline / f"run-{(run / 'wandb_id').read_text()}.wandb").stat().st_size > 0
    tables = sorted((offline / "files" / "media" / "table").glob("completions_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "index", "group", "prompt"] and len(table["data"]) == 3


def test_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("pandas")
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 deprecates file stores; a test's is enough
    log_steps(tmp_path, ["mlflow"], [1, 2])
    client = MlflowClient(tracking_uri=uri)
    run_id = (tmp_path / "mlflow_id").read_text()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    assert [m.step for m in client.get_metric_history(run_id, "reward_mean")] == [1, 2]
    arts = {a.path for folder in (None, "completions") for a in client.list_artifacts(run_id, folder)}
    assert "config.json" in arts and "completions/step_000002.json" in arts
    assert client.get_run(run_id).info.run_name == tmp_path.name  # default name: the run directory's


TRACKIO_SCRIPT = """
import sys, json
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_tracking import log_steps
Path(sys.argv[1]).mkdir()
log_steps(Path(sys.argv[1]), ["trackio"], [1, 2])
from trackio.sqlite_storage import SQLiteStorage
logs = SQLiteStorage.get_logs("proj", Path(sys.argv[1]).name)
print(json.dumps([[r.get("step"), r.get("loss"), "completions" in r] for r in logs]))
"""


@pytest.mark.slow
def test_trackio_local(tmp_path):
    pytest.importorskip("trackio")
    # trackio reads TRACKIO_DIR when imported: a process of its own keeps the store in tmp
    env = {"TRACKIO_DIR": str(tmp_path / "store"), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path / "run"), str(REPO / "tests")],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    logs = json.loads(out.stdout.strip().splitlines()[-1])
    assert [s for s, loss, _ in logs if loss is not None] == [1, 2]
    assert any(has for _, _, has in logs)


def test_missing_tracker_package_is_one_line_and_creates_no_run(tmp_path, capsys, monkeypatch):
    from grpo_cli.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(REPO / "recipes"))
    with pytest.raises(SystemExit) as e:
        main(["train", "recipe=grpo_arithmetic", "logging.backends=[wandb]", "output_dir=out"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == """error: logging.backends: 'wandb' needs the wandb package: pip install "grpo-cli[wandb]\""""
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_unknown_backend_names_the_key():
    with pytest.raises(Exception, match=r"logging.backends: unknown backend 'tensorbord'; did you mean 'tensorboard'"):
        check_backends(["tensorbord"])
    assert set(BACKENDS) == {"tensorboard", "wandb", "trackio", "mlflow"}


@pytest.mark.slow
def test_grpo_run_writes_tensorboard_events_and_completions(sft_run, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from grpo_cli.trainer.loop import train

    common = [
        f"model.name_or_path={sft_run}",
        "logging.backends=[tensorboard]",
        "trainer.steps=2",
        "source.prompts_per_step=2",
        "source.group_size=4",
        "trainer.save_every=1",
    ]
    run = train(compose("grpo_arithmetic", *common, f"output_dir={tmp_path / 'g'}"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2]
    for step in (1, 2):
        rows = [json.loads(line) for line in (run / "completions" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and [r["index"] for r in rows] == list(range(8))
        assert all(set(r) == ROW_KEYS and r["step"] == step for r in rows)
        assert all(r["reward"] in (0.0, 1.0) and r["length"] > 0 and math.isfinite(r["advantage"]) for r in rows)
        groups = [r["group"] for r in rows]
        assert len(set(groups[:4])) == len(set(groups[4:])) == 1 and groups[0] != groups[4]  # 2 prompts x 4
    # killed after the step-1 checkpoint: the resumed run writes step 2's table and scalars again, once
    for name in ("final", "step_000002"):
        shutil.rmtree(run / "checkpoints" / name)
    (run / "completions" / "step_000002.jsonl").write_text("stale\n")
    train(compose("grpo_arithmetic", *common, f"output_dir={run}", "resume=true"))
    assert json.loads((run / "completions" / "step_000002.jsonl").read_text().splitlines()[0])["step"] == 2
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
