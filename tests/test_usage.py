"""Each command refuses the config keys it would not read; eval keeps each evaluation; the usual first
mistakes get a one-line hint."""

import dataclasses
import json
import re
import shutil

import pytest
from conftest import REPO
from omegaconf import DictConfig, ListConfig, OmegaConf
from typer.testing import CliRunner

from grpo_cli.cli import _shorthand, app, main
from grpo_cli.config import schema as S
from grpo_cli.config.usage import USES, is_used, override_key, unused_message

COMMANDS = {  # command -> (arguments before the override, after it): composes, runs nothing
    "grpo train": (["train", "recipe=sft_arithmetic"], ["--print-config"]),
    "grpo eval": (["eval", "run=tiny"], ["--print-config"]),
    "grpo eval samples=...": (["eval", "samples=s.jsonl"], ["--print-config"]),
    "grpo sweep": (["sweep", "recipe=sft_arithmetic", "sweep.eval=true"], ["--dry-run"]),
    "grpo report": (["report", "run=r"], ["--print-config"]),
    "grpo export": (["export", "run=r"], ["--print-config"]),
}
VALUES = {"recipe": "sft_arithmetic", "description": "x", "eval.run": "tiny"}
GROUPS = {"source": "dataset", "algorithm": "sft"}  # base.yaml's options
ANSWERED = {("grpo sweep", "output_dir"): "output_dir: a sweep gives each run its own directory; set sweep.dir instead"}


def _value(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        return json.dumps(OmegaConf.to_container(value))
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _leaves(section: str, samples: str = "null"):
    """(key, override) for every scalar or list field of a top-level section of the schema; ``samples``
    is the value of ``eval.samples`` (which picks the mode of ``grpo eval``)."""
    if section in GROUPS:
        return [(section, f"{section}={GROUPS[section]}")]
    values = {**VALUES, "eval.samples": samples}
    node = OmegaConf.select(OmegaConf.structured(S.RunConfig), section)
    if not isinstance(node, DictConfig):
        return [(section, f"{section}={values.get(section, _value(node))}")]
    out = []
    for name in node:
        key = f"{section}.{name}"
        if isinstance(node[name], DictConfig):  # a nested section (model.tiny) or a mapping: its fields
            out += _leaves(key, samples)
        else:
            out.append((key, f"{key}={values.get(key, _value(node[name]))}"))
    return out


def _short(command: str, override: str) -> str:
    """``override`` with the command's short keys spelled out (``run=x`` -> ``eval.run=x``)."""
    if command.startswith("grpo eval"):
        return _shorthand(override)
    return _shorthand(override, "export") if command == "grpo export" else override


def _run(capsys, argv):
    """(exit code, stderr) of the command line ``argv``."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_section_of_the_schema_is_read_or_refused_by_each_command(command, capsys):
    """Walk the schema's top-level fields: per command, an override of a key it reads composes, one of
    a key it never reads is one line and exit 2 (instead of silently changing nothing)."""
    before, after = COMMANDS[command]
    used = []
    for field in dataclasses.fields(S.RunConfig):
        leaves = _leaves(field.name, "s.jsonl" if "samples" in command else "null")
        key_of = {k: override_key(_short(command, o)) for k, o in leaves}
        used += [o for k, o in leaves if is_used(command, key_of[k])][:1]
        unused = next(((k, o) for k, o in leaves if not is_used(command, key_of[k])), None)
        assert used or unused, field.name
        if unused:
            code, err = _run(capsys, [*before, unused[1], *after])
            expected = ANSWERED.get((command, unused[0])) or unused_message(command, key_of[unused[0]])
            assert (code, err) == (2, f"error: {expected}"), (command, unused[1])
    code, err = _run(capsys, [*before, *used, *after])  # one key of each section it reads, at once
    assert code == 0, (command, used, err)


CASES = {  # command -> (its arguments, overrides of keys it reads, overrides of keys it never reads)
    "grpo eval": (
        ["eval", "run=tiny"],
        [
            "trainer.precision=bf16",
            "trainer.threads=1",
            "trainer.device=cpu",
            "model.dtype=float32",
            "model.tiny.hidden_size=32",
            "data=gsm8k",
            "rollout.temperature=0.5",
            "eval.n=2",
            "eval.ks=[1,2]",
            "output_dir=o",
        ],
        [
            "trainer.lr=1e-3",
            "lora.r=4",
            "sweep.parallel=2",
            "algorithm=grpo",
            "reward.correct=2",
            "iterative.iterations=2",
            "logging.plot=false",
        ],
    ),
    "grpo eval samples=...": (
        ["eval", "samples=s.jsonl"],
        [
            "eval.completion_field=text",
            "eval.answer_field=gold",
            "output_dir=o",
            "data=math",
            "data.answer_checker=math",
        ],
        ["data.path=x", "limit=3", "rollout.temperature=0.5"],
    ),
    "grpo train": (
        ["train", "recipe=paradigm_arithmetic"],
        ["method=sft", "iterative.rm_steps=3", "resume=false", "output_dir=o", "rollout.top_p=0.9"],
        ["eval.n=4", "eval.split=train", "sweep.parallel=2", "description=x"],
    ),
    "grpo sweep": (
        ["sweep", "recipe=sft_arithmetic"],
        [
            "trainer.lr=1e-3,3e-3",
            "sweep.eval=true",
            "sweep.parallel=2",
            "eval.limit=5",
            "eval.n=2",
            "eval.ks=[1,2]",
            "eval.split=test",
            "eval.seed=1",
        ],
        ["eval.output_dir=x", "eval.run=x", "eval.samples=x"],
    ),
    "grpo report": (
        ["report", "run=r"],
        ["output=o.html", "smoothing=0.9", "report.smoothing=0"],
        ["trainer.lr=1e-3", "eval.n=2", "output_dir=o"],
    ),
    "grpo export": (
        ["export", "run=r"],
        [
            "output_dir=o",
            "export.dtype=fp32",
            "export.adapter_only=true",
            "export.push_to_hub=a/b",
            "model.trust_remote_code=true",
        ],
        ["trainer.lr=1e-3", "lora.r=4", "eval.n=2", "data=gsm8k", "model.dtype=bfloat16", "rollout.temperature=0.5"],
    ),
}


@pytest.mark.parametrize("command", list(CASES))
def test_keys_each_command_reads_are_accepted_the_others_are_one_line_errors(command, capsys):
    argv, reads, ignores = CASES[command]
    assert set(USES) == set(CASES)
    option = "--dry-run" if argv[0] == "sweep" else "--print-config"
    code, err = _run(capsys, [*argv, *reads, option])
    assert code == 0, err
    for override in ignores:
        key = override_key(_short(f"grpo {argv[0]}", override))
        code, err = _run(capsys, [*argv, *reads, override, option])
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: config key '{key}' is not used by '{command}' (it uses: "), err


def test_eval_names_the_option_for_the_model_instead_of_model_name_or_path(capsys):
    code, err = _run(capsys, ["eval", "run=tiny", "model.name_or_path=x", "--print-config"])
    assert (code, err) == (
        2,
        "error: config key 'model.name_or_path' is not used by 'grpo eval': the model evaluated is run=PATH",
    )


def test_eval_output_dir_is_the_eval_output_dir(capsys):
    main(["eval", "run=tiny", "output_dir=somewhere/else", "--print-config"])
    assert OmegaConf.create(capsys.readouterr().out).eval.output_dir == "somewhere/else"


def test_each_evaluation_of_a_run_is_kept_and_latest_is_the_newest(sft_run, tmp_path, capsys):
    sft_run = shutil.copytree(sft_run, tmp_path / "sft", symlinks=True)  # eval writes: not into the shared fixture
    evals = sft_run / "eval"
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in [("3+4", 7), ("2*5", 10)])
    )
    first = ["eval", f"run={sft_run}", "eval.limit=2", "trainer.threads=1"]
    main(first)
    arithmetic = evals / "latest"
    assert re.fullmatch(r"arithmetic-test-limit2-[0-9a-f]{6}", arithmetic.resolve().name)
    assert f"wrote {evals / arithmetic.resolve().name}/eval.json" in capsys.readouterr().out
    arithmetic = arithmetic.resolve()
    main(["eval", f"run={sft_run}", "data=jsonl", f"data.path={data}", "trainer.threads=1"])
    mine = (evals / "latest").resolve()
    assert re.fullmatch(r"jsonl-mine-test-[0-9a-f]{6}", mine.name)
    assert json.loads((arithmetic / "eval.json").read_text())["total"] == 2  # the first one is kept
    assert json.loads((mine / "eval.json").read_text())["total"] == 2 and mine.parent == arithmetic.parent
    main(first)  # the same evaluation again replaces its own directory
    assert (evals / "latest").resolve() == arithmetic
    assert sorted(
        p.name for p in evals.iterdir() if p.name.startswith(("arithmetic-test-limit2", "jsonl-mine"))
    ) == sorted([arithmetic.name, mine.name])
    out = tmp_path / "chosen"
    main(["eval", f"run={sft_run}", "eval.limit=2", "trainer.threads=1", f"output_dir={out}"])
    assert (
        json.loads((out / "eval.json").read_text())["total"] == 2
        and f"wrote {out}/eval.json" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["train", "sft_arithmetic"],
            "'sft_arithmetic' is not an override (key=value): did you mean recipe=sft_arithmetic?",
        ),
        (
            ["sweep", "grpo_arithmetc", "trainer.seed=0,1"],
            "'grpo_arithmetc' is not an override (key=value): did you mean recipe=grpo_arithmetic?",
        ),
        (["eval", "runs/x"], "'runs/x' is not an override (key=value): did you mean run=runs/x?"),
        (["eval", "out.jsonl"], "'out.jsonl' is not an override (key=value): did you mean samples=out.jsonl?"),
        (
            ["train", "recipe=sft_arithmetic", "--steps", "10"],
            "unknown option '--steps': did you mean trainer.steps=10?",
        ),
        (
            ["train", "recipe=sft_arithmetic", "--trainer.lr=1e-3"],
            "unknown option '--trainer.lr': settings are overrides without dashes: did you mean trainer.lr=1e-3?",
        ),
        (
            ["train", "recipe=sft_arithmetic", "steps=10", "--print-config"],
            "unknown config key 'steps': did you mean trainer.steps=10?",
        ),
        (["eval", "run=tiny", "n=4", "--print-config"], "unknown config key 'n': did you mean eval.n=4?"),
        (
            ["train", "recipe=sft_arithmetic", "threshold=0.2", "--print-config"],
            "unknown config key 'threshold': did you mean one of: source.threshold, algorithm.threshold?",
        ),
    ],
)
def test_usual_first_mistakes_get_a_one_line_hint(argv, expected, capsys):
    code, err = _run(capsys, argv)
    assert (code, err) == (2, f"error: {expected}")


def test_a_grpo_recipe_before_any_sft_run_says_how_to_make_its_start_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(REPO / "recipes"))
    code, err = _run(capsys, ["train", "recipe=grpo_arithmetic"])
    assert (code, err) == (
        2,
        (
            "error: model.name_or_path: no such directory 'runs/sft_arithmetic/latest': make it "
            "with 'grpo train recipe=sft_arithmetic' or set model.name_or_path=<run or model dir>"
        ),
    )
    code, err = _run(capsys, ["eval", "run=runs/sft_arithmetic/latest"])
    assert (code, err) == (
        2,
        (
            "error: run: no such directory 'runs/sft_arithmetic/latest': make it with "
            "'grpo train recipe=sft_arithmetic' or set run=<run or model dir>"
        ),
    )
    assert not (tmp_path / "runs").exists()


def test_eval_help_names_the_fields_of_a_samples_file():
    text = " ".join(CliRunner().invoke(app, ["eval", "--help"], terminal_width=200).output.split())
    assert 'the completion (field "completion"; another field with eval.completion_field=NAME)' in text
    assert 'the reference final answer (field "answer"' in text and "eval.answer_field=NAME" in text
    assert '"prompt"' in text and "<run>/eval/latest" in text


def test_a_missing_run_under_a_local_directory_is_named_not_looked_up_on_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/x is then a path: a hub id has no local first part
    code, err = _run(capsys, ["eval", "run=runs/nothing"])
    assert (code, err) == (2, "error: run: no such directory 'runs/nothing'")
