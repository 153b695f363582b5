"""Every number of the schema declares its valid range (and closed sets of strings their options);
composition rejects a value outside them with one line naming the key, before anything runs (issue 28).

The cases are generated from the dataclasses, so a new numeric field without a range fails here, and
a new range is exercised without editing this file.
"""

import dataclasses
import math
import re
import sys
import typing

import pytest
from conftest import REPO

from grpo_cli.cli import main
from grpo_cli.config import schema as S
from grpo_cli.config import store
from grpo_cli.config.compose import compose_run
from grpo_cli.config.validate import CHOICES, RANGE
from grpo_cli.errors import UserError

RECIPE = "sft_arithmetic"
"""Every section composes on it; source=... and algorithm=... select the other options."""


def schema_classes():
    """Every dataclass defined in schema.py."""
    return [c for c in vars(S).values() if dataclasses.is_dataclass(c) and c.__module__ == S.__name__]


def is_numeric(hint) -> bool:
    """int, float, Optional/List of them (bool is not a number here)."""
    return hint in (int, float) or any(is_numeric(a) for a in typing.get_args(hint))


def is_integer(hint) -> bool:
    return hint is int or any(is_integer(a) for a in typing.get_args(hint))


def sections():
    """(key prefix, dataclass, overrides selecting it): every node reachable from RunConfig, and every
    option of the ``source`` and ``algorithm`` groups (typed Any in RunConfig)."""
    found = []

    def walk(cls, prefix, select):
        found.append((prefix, cls, select))
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{name}.", select)

    walk(S.RunConfig, "", [])
    for group in ("source", "algorithm"):
        for option, cls in sorted(store.options()[group].items()):
            walk(cls, f"{group}.", [f"{group}={option}"])
    return found


def numeric_fields():
    """(key, field, type hint, overrides selecting its section), each declared field once."""
    seen, out = set(), []
    for prefix, cls, select in sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if is_numeric(hints[f.name]) and (prefix, id(f)) not in seen:  # inherited fields: once
                seen.add((prefix, id(f)))
                out.append((f"{prefix}{f.name}", f, hints[f.name], select))
    return out


def out_of_range(bounds, integer: bool):
    """A value just outside each bounded side; NaN for a number bounded on neither side."""
    step = 1 if integer else 0.5
    values = []
    if bounds.gt is not None or bounds.ge is not None:
        values.append(bounds.gt if bounds.gt is not None else bounds.ge - step)
    if bounds.lt is not None or bounds.le is not None:
        values.append(bounds.lt if bounds.lt is not None else bounds.le + step)
    if not values and not integer:
        values.append(math.nan)
    return [int(v) if integer else float(v) for v in values]


def range_cases():
    cases = []
    for key, f, hint, select in numeric_fields():
        bounds, integer = f.metadata.get(RANGE), is_integer(hint)
        if bounds is None:  # test_every_numeric_field_declares_a_range names it
            continue
        listed = list in {typing.get_origin(h) for h in (hint, *typing.get_args(hint))}  # Optional[List] too
        for value in out_of_range(bounds, integer):
            shown = f"[{value!r}]" if listed else repr(value)
            what = ("integers" if listed else "an integer") if integer else ("numbers" if listed else "a number")
            expected = f"config key '{key}': expected {bounds.describe(what)}, got {shown}"
            overrides = [*select, f"{key}={shown}"]
            cases.append(pytest.param(overrides, expected, id=" ".join(overrides)))
    return cases


BOUNDS = re.compile(
    r"expected (a number|an integer|numbers|integers|a finite number|finite numbers)"
    r"( (>|>=|<|<=) -?[\d.]+| in [\[(]-?[\d.]+, -?[\d.]+[\])])?, got "
)


def test_every_numeric_field_declares_a_range():
    missing = [
        f"{c.__name__}.{f.name}"
        for c in schema_classes()
        for f in dataclasses.fields(c)
        if is_numeric(typing.get_type_hints(c)[f.name]) and RANGE not in f.metadata
    ]
    assert not missing, f"declare a range beside these fields (num/nums in schema.py): {missing}"


def test_every_dataclass_with_numbers_is_composed_somewhere():
    """Else its fields would escape the composition test below."""
    reached = {cls for _, cls, _ in sections()}
    numeric = {c for c in schema_classes() if any(is_numeric(h) for h in typing.get_type_hints(c).values())}
    assert numeric <= reached, sorted(c.__name__ for c in numeric - reached)


def test_every_default_lies_in_its_range_and_choices():
    for c in schema_classes():
        for f in dataclasses.fields(c):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if RANGE in f.metadata and default is not None:
                assert all(v in f.metadata[RANGE] for v in (default if isinstance(default, list) else [default])), f
            if CHOICES in f.metadata:
                assert default in f.metadata[CHOICES], f


@pytest.mark.parametrize("overrides, expected", range_cases())
def test_out_of_range_number_is_rejected_at_composition(overrides, expected):
    with pytest.raises(UserError) as e:
        compose_run(RECIPE, overrides)
    assert str(e.value) == expected
    assert BOUNDS.search(expected), expected  # the message's form, whatever the bounds


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer.lr=-1"], "config key 'trainer.lr': expected a number > 0, got -1.0"),
        (["trainer.steps=-3"], "config key 'trainer.steps': expected an integer >= 0, got -3"),
        (["lora.r=0"], "config key 'lora.r': expected an integer >= 1, got 0"),
        (["trainer.batch_size=0"], "config key 'trainer.batch_size': expected an integer >= 1, got 0"),
        (["rollout.temperature=-1"], "config key 'rollout.temperature': expected a number >= 0, got -1.0"),
        (["algorithm=grpo", "algorithm.eps=-0.2"], "config key 'algorithm.eps': expected a number > 0, got -0.2"),
        (
            ["algorithm=ppo", "algorithm.gamma=1.5"],
            "config key 'algorithm.gamma': expected a number in [0, 1], got 1.5",
        ),
        (["rollout.top_p=0"], "config key 'rollout.top_p': expected a number in (0, 1], got 0.0"),
        (["lora.dropout=1"], "config key 'lora.dropout': expected a number in [0, 1), got 1.0"),
        (["trainer.betas=[0.9,1.5]"], "config key 'trainer.betas': expected numbers in [0, 1), got [0.9, 1.5]"),
        (["eval.ks=[4,0]"], "config key 'eval.ks': expected integers >= 1, got [4, 0]"),
        (["reward.correct=inf"], "config key 'reward.correct': expected a finite number, got inf"),
        (["trainer.lr=nan"], "config key 'trainer.lr': expected a number > 0, got nan"),
        (["data.arithmetic.digits=19"], "config key 'data.arithmetic.digits': expected an integer in [1, 18], got 19"),
    ],
)
def test_messages_of_the_issue(overrides, expected):
    with pytest.raises(UserError) as e:
        compose_run(RECIPE, overrides)
    assert str(e.value) == expected


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.lr=1"],
        ["rollout.temperature=0"],
        ["lora.dropout=0"],
        ["rollout.top_p=1"],
        ["trainer.max_grad_norm=0"],
        ["algorithm=grpo", "algorithm.eps_high=null"],
        ["data.max_examples=null"],
        ["reward.incorrect=-1"],
        ["trainer.betas=[0,0.999]"],
        ["model.logprob_backend=naive"],
    ],
)
def test_values_at_the_edges_of_their_ranges_compose(overrides):
    compose_run(RECIPE, overrides)


def choice_cases():
    cases = []
    for prefix, cls, select in sections():
        for f in dataclasses.fields(cls):
            if CHOICES in f.metadata:
                key, options = f"{prefix}{f.name}", f.metadata[CHOICES]
                listed = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"
                expected = f"config key '{key}': expected {listed}, got 'bogus'"
                overrides = [*select, f"{key}=bogus"]
                cases.append(pytest.param(overrides, expected, id=" ".join(overrides)))
    return cases


@pytest.mark.parametrize("overrides, expected", choice_cases())
def test_unknown_choice_is_rejected_at_composition(overrides, expected):
    with pytest.raises(UserError) as e:
        compose_run(RECIPE, overrides)
    assert str(e.value) == expected


def test_logprob_backend_typo_is_rejected():
    """It used to mean fused silently: any value but ``naive`` did."""
    with pytest.raises(UserError) as e:
        compose_run(RECIPE, ["model.logprob_backend=fuzed"])
    assert str(e.value) == "config key 'model.logprob_backend': expected fused or naive, got 'fuzed'"


def test_cli_prints_one_line_exits_2_and_creates_no_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(REPO / "recipes"))
    with pytest.raises(SystemExit) as e:
        main(["train", "recipe=sft_arithmetic", "trainer.lr=-1", "output_dir=out"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: config key 'trainer.lr': expected a number > 0, got -1.0\n"
    assert captured.out == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_eval_checks_its_config_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "run=no/such/run", "eval.n=-1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: config key 'eval.n': expected an integer >= 0, got -1\n"


def test_hydra_entry_checks_the_config_it_is_given():
    """``python -m grpo_cli.hydra_app`` composes through Hydra itself, not compose_run."""
    from grpo_cli.hydra_app import train_and_measure

    cfg = compose_run(RECIPE, [])
    cfg.trainer.steps = -3
    with pytest.raises(UserError, match=re.escape("config key 'trainer.steps': expected an integer >= 0, got -3")):
        train_and_measure(cfg)


def test_cli_subprocess_has_no_traceback(tmp_path):
    """The installed entry point end to end: exit code 2, one line on stderr."""
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo_cli.cli",
            "train",
            "recipe=sft_arithmetic",
            "lora.r=0",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == "error: config key 'lora.r': expected an integer >= 1, got 0\n"
    assert not (tmp_path / "out").exists()


def test_an_interpolation_that_does_not_resolve_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "recipe=sft_arithmetic", "trainer.lr=${nope}", "--print-config"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: config key 'trainer.lr': Interpolation key 'nope' not found\n"
