"""``grpo sweep``: the grid from Hydra's sweep grammar, isolated and resumable runs, the summary; the
Hydra entry point that hands the same grid to Hydra's launcher plugins."""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY

from grpo_cli.cli import main
from grpo_cli.errors import UserError
from grpo_cli.sweep import Outcome, default_sweep_dir, expand_grid, group_by_seed, mean_std, parse_grid, read_done


def test_parse_grid_splits_fixed_swept_and_settings():
    fixed, swept, settings = parse_grid(
        [
            "trainer.lr=1e-3,3e-3",
            "trainer.seed=range(0,3)",
            "algorithm.name=choice(sft)",
            "trainer.steps=5",
            "sweep.parallel=2",
            "eval.limit=10",
        ]
    )
    assert fixed == ["trainer.steps=5"]
    assert swept == [("trainer.lr", ["0.001", "0.003"]), ("trainer.seed", ["0", "1", "2"]), ("algorithm.name", ["sft"])]
    assert settings == ["sweep.parallel=2", "eval.limit=10"]


def test_expand_grid_is_the_product_first_key_slowest_with_override_safe_names():
    runs = expand_grid(["trainer.steps=5"], [("trainer.lr", ["1e-3", "3e-3"]), ("+x.seed", ["0", "1"])])
    assert [r.overrides for r in runs] == [
        ["trainer.steps=5", "trainer.lr=1e-3", "+x.seed=0"],
        ["trainer.steps=5", "trainer.lr=1e-3", "+x.seed=1"],
        ["trainer.steps=5", "trainer.lr=3e-3", "+x.seed=0"],
        ["trainer.steps=5", "trainer.lr=3e-3", "+x.seed=1"],
    ]
    assert [r.name for r in runs] == [
        "000-lr_1e-3-seed_0",
        "001-lr_1e-3-seed_1",
        "002-lr_3e-3-seed_0",
        "003-lr_3e-3-seed_1",
    ]


def test_default_sweep_dir_ignores_argument_order_but_not_values():
    a = default_sweep_dir("r", ["x=1", "y=2"], [("lr", ["1", "2"])])
    assert a == default_sweep_dir("r", ["y=2", "x=1"], [("lr", ["1", "2"])])
    assert a != default_sweep_dir("r", ["x=1", "y=3"], [("lr", ["1", "2"])])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["output_dir=x"], "output_dir: a sweep gives each run its own directory"),
        (["sweep.parallel=1,2"], "sweep.parallel: settings of the sweep and of its evaluations cannot be swept"),
        (["trainer.lr=interval(0,1)"], "trainer.lr: interval sweeps need a sweeper plugin"),
        (["trainer.lr=="], "cannot parse override"),
    ],
)
def test_parse_grid_mistakes(args, expected):
    with pytest.raises(UserError, match=expected):
        parse_grid(args)


def test_a_typo_in_any_grid_point_fails_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "recipe=sft_arithmetic", "trainer.steps=2,abc", f"sweep.dir={tmp_path / 's'}"])
    assert e.value.code == 2
    assert "run 001-steps_abc: config key 'trainer.steps': expected integer, got 'abc'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sweep.metric=eval.pass@4"], "sweep.metric=eval.pass@4 needs sweep.eval=true"),
        (["eval.limit=5"], "eval.* overrides set each run's evaluation: add sweep.eval=true"),
        (["sweep.parallel=0"], "config key 'sweep.parallel': expected an integer >= 1, got 0"),
        (
            ["trainer.schedule=bogus,constant"],
            "config key 'trainer.schedule': expected constant, linear or cosine, got 'bogus'",
        ),
    ],
)
def test_sweep_settings_mistakes(capsys, args, expected):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "recipe=sft_arithmetic", "trainer.seed=0,1", "--dry-run", *args])
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_dry_run_lists_the_grid(tmp_path, capsys):
    main(
        [
            "sweep",
            "recipe=sft_arithmetic",
            "trainer.steps=3",
            "trainer.lr=1e-3,2e-3",
            f"sweep.dir={tmp_path / 's'}",
            "--dry-run",
        ]
    )
    printed = capsys.readouterr().out
    assert "000-lr_0.001: grpo train recipe=sft_arithmetic trainer.steps=3 trainer.lr=0.001" in printed
    assert "001-lr_0.002" in printed and not (tmp_path / "s").exists()


def test_a_sweep_dir_of_other_overrides_is_refused(tmp_path):
    run = expand_grid(["trainer.steps=3"], [("trainer.lr", ["1"])])[0]
    (tmp_path / run.name).mkdir()
    (tmp_path / run.name / "done.json").write_text(json.dumps({"overrides": ["trainer.steps=5", "trainer.lr=1"]}))
    with pytest.raises(UserError, match="is a run of other overrides"):
        read_done(tmp_path / run.name, run)
    (tmp_path / run.name / "done.json").write_text(json.dumps({"overrides": run.overrides, "eval": None}))
    assert read_done(tmp_path / run.name, run)["overrides"] == run.overrides


def test_groups_aggregate_seeds_only():
    runs = expand_grid([], [("trainer.lr", ["1", "2"]), ("trainer.seed", ["0", "1", "2"])])
    values = [0.1, 0.2, 0.3, 0.5, None, 0.7]  # one run of lr=2 has no metric (it failed)
    outcomes = [Outcome(r, "ok", {"loss": v} if v is not None else {}) for r, v in zip(runs, values)]
    groups = group_by_seed(outcomes, "loss")
    assert [g[0] for g in groups] == [{"trainer.lr": "1"}, {"trainer.lr": "2"}]
    assert groups[0][1] == pytest.approx([0.1, 0.2, 0.3]) and groups[1][1] == pytest.approx([0.5, 0.7])
    mean, std = mean_std(groups[1][1])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414213562)  # sqrt(((0.1)^2 + (0.1)^2) / 1)
    assert mean_std([]) == (None, 0.0) and mean_std([2.0]) == (2.0, 0.0)


def _csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_isolates_a_crash_summarises_and_resumes(tmp_path, capsys):
    """2x2 grid, one max_ops below min_ops (a relation checked when the data is built, not at
    composition): its two runs fail with their error, the others train and are evaluated; the same
    command again skips the finished runs."""
    sweep_dir = tmp_path / "sw"
    args = [
        "sweep",
        "recipe=sft_arithmetic",
        *TINY,
        "trainer.steps=2",
        "trainer.threads=1",
        "trainer.batch_size=8",
        "data.arithmetic.max_ops=1,4",
        "trainer.seed=0,1",
        f"sweep.dir={sweep_dir}",
        "sweep.parallel=2",
        "sweep.eval=true",
        "eval.limit=4",
        "eval.n=2",
        "eval.ks=[2]",
    ]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1  # some runs failed: a script sees it
    printed = " ".join(capsys.readouterr().out.split())  # the tables wrap at the terminal's width
    assert "eval.accuracy, mean and std over trainer.seed" in printed and "2 of 4 runs failed" in printed
    rows = _csv(sweep_dir / "summary.csv")
    assert [(r["data.arithmetic.max_ops"], r["trainer.seed"], r["status"]) for r in rows] == [
        ("1", "0", "failed"),
        ("1", "1", "failed"),
        ("4", "0", "ok"),
        ("4", "1", "ok"),
    ]
    for r in rows[:2]:
        assert r["error"] == "data.arithmetic.min_ops/max_ops: need 1 <= min_ops <= max_ops <= 50, got 2 and 1"
        assert not (sweep_dir / r["run"] / "done.json").exists()
    for r in rows[2:]:
        assert 0.0 <= float(r["eval.accuracy"]) <= 1.0 and r["eval.pass@2"] != ""
        done = json.loads((sweep_dir / r["run"] / "done.json").read_text())
        assert done["metrics"]["step"] == 2 and done["eval"]["total"] == 4
    assert (sweep_dir / "summary.png").stat().st_size > 0
    finished = {r["run"]: (sweep_dir / r["run"] / "done.json").read_text() for r in rows[2:]}

    with pytest.raises(SystemExit):
        main(args)
    again = _csv(sweep_dir / "summary.csv")
    assert [r["status"] for r in again] == ["failed", "failed", "skipped", "skipped"]
    assert [r["eval.accuracy"] for r in again[2:]] == [r["eval.accuracy"] for r in rows[2:]]
    assert {run: (sweep_dir / run / "done.json").read_text() for run in finished} == finished


@pytest.mark.slow
def test_hydra_entry_runs_the_grid_with_hydras_multirun(tmp_path):
    """The same grid through Hydra's multirun (basic launcher): one job per seed, each a finished run."""
    cmd = [
        sys.executable,
        "-m",
        "grpo_cli.hydra_app",
        "--config-name",
        "sft_arithmetic",
        "-m",
        *TINY,
        "trainer.steps=1",
        "trainer.threads=1",
        "trainer.batch_size=8",
        "trainer.seed=0,1",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job in ("0", "1"):
        done = json.loads((tmp_path / job / "done.json").read_text())
        assert done["metrics"]["step"] == 1
        assert (tmp_path / job / "checkpoints" / "final").is_dir()
    assert "seed: 1" in (tmp_path / "1" / "config.yaml").read_text()


def test_launcher_config_composes(tmp_path):
    """``hydra/launcher=joblib`` composes with our config when the plugin is installed; without it
    the basic launcher does, and docs/sweep.md documents the joblib settings."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from grpo_cli.config import store
    from grpo_cli.hydra_app import search_path_override

    joblib = (
        importlib.util.find_spec("hydra_plugins") is not None  # else find_spec of its child raises
        and importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
    )
    store.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
            cfg = compose(
                "sft_arithmetic",
                overrides=[
                    search_path_override(),
                    *(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if joblib else ["hydra/launcher=basic"]),
                ],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    assert cfg.trainer.steps == 600 and cfg.sweep.parallel == 1  # the recipe and the schema
    if joblib:
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    else:
        assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    docs = (REPO / "docs" / "sweep.md").read_text()
    assert "hydra/launcher=joblib" in docs and "hydra.launcher.n_jobs" in docs
