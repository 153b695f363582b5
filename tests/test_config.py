"""Recipes compose; bad configs give one line naming the key and exit 2."""

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from grpo_cli.cli import main
from grpo_cli.config.compose import compose_run
from grpo_cli.config.recipes import list_recipes, recipe_description
from grpo_cli.errors import UserError


def test_every_recipe_composes_and_starts_with_its_command():
    recipes = list_recipes()
    assert "sft_arithmetic" in recipes and "grpo_arithmetic" in recipes
    for name, path in recipes.items():
        cfg = compose_run(name, [])
        assert cfg.recipe == name
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        assert path.read_text().splitlines()[0].startswith(f"# grpo train recipe={name}")
        assert recipe_description(path), f"{name} has no description"


def test_overrides_apply_with_types():
    cfg = compose_run("sft_arithmetic", ["trainer.steps=7", "trainer.lr=1e-4", "lora.enabled=true", "algorithm=grpo"])
    assert cfg.trainer.steps == 7 and cfg.trainer.lr == pytest.approx(1e-4)
    assert cfg.lora.enabled is True
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.beta == pytest.approx(0.04)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["recipe=sft_arithmatic"], "unknown recipe 'sft_arithmatic': did you mean: sft_arithmetic"),
        (["recipe=sft_arithmetic", "trainer.stepz=3"], "unknown config key 'trainer.stepz': did you mean: steps?"),
        (["recipe=sft_arithmetic", "trainer.steps=abc"], "config key 'trainer.steps': expected integer, got 'abc'"),
        (["recipe=sft_arithmetic", "lora.enabled=maybe"], "config key 'lora.enabled': expected bool, got 'maybe'"),
        (["recipe=sft_arithmetic", "algorithm=grpp"], "unknown algorithm 'grpp': did you mean: grpo, ppo?"),
        (["recipe=sft_arithmetic", "data=gsm9k"], "unknown data 'gsm9k': did you mean: gsm8k?"),
        (
            ["recipe=sft_arithmetic", "source.group_size=4"],
            "'source.group_size' for the chosen source; it belongs to source=online",
        ),
        (["recipe=sft_arithmetic", "algorithm.beta=0.1"], "it belongs to algorithm=grpo"),
        (["recipe=sft_arithmetic", "trainer=["], "cannot parse override"),
        (
            ["recipe=grpo_arithmetic", "rollout.compile_attention=false"],
            "config key 'rollout.compile_attention' was renamed: use rollout.compile_decode_step",
        ),
        (
            ["recipe=grpo_arithmetic", "+rollout.compile_attention_min_mib=0"],
            "config key 'rollout.compile_attention_min_mib' was renamed: use rollout.compile_decode_min_mib",
        ),
        ([], "missing recipe"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *args, "--print-config"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert "Traceback" not in err


def test_malformed_recipe_yaml_names_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "broken.yaml").write_text("# grpo train recipe=broken\ndefaults:\n  - base\ntrainer: [1,\n")
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"broken.yaml:\d+: malformed YAML"):
        compose_run("broken", [])


def test_a_recipe_with_a_renamed_or_unknown_key_is_one_line(tmp_path, monkeypatch):
    head = "# grpo train recipe={}\ndefaults:\n  - base\n  - _self_\ndescription: x\n"
    (tmp_path / "old.yaml").write_text(head.format("old") + "rollout:\n  compile_attention: false\n")
    (tmp_path / "typo.yaml").write_text(head.format("typo") + "trainer:\n  stepz: 3\n")
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(tmp_path))
    renamed = r"^config key 'rollout.compile_attention' was renamed: use rollout.compile_decode_step$"
    with pytest.raises(UserError, match=renamed):
        compose_run("old", [])
    with pytest.raises(UserError, match=r"^unknown config key 'trainer.stepz': did you mean: steps\?$"):
        compose_run("typo", [])


def test_user_recipe_dir_and_print_config(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.yaml").write_text(
        "# grpo train recipe=mine\ndefaults:\n  - base\n  - _self_\ndescription: mine\ntrainer:\n  steps: 3\n"
    )
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(tmp_path))
    main(["train", "recipe=mine", "trainer.lr=0.5", "--print-config"])
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.trainer.steps == 3 and printed.trainer.lr == 0.5 and printed.recipe == "mine"


def test_recipes_command_lists_descriptions(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    assert "sft_arithmetic" in out and "grpo_arithmetic" in out


def test_packaged_recipes_are_the_repository_ones():
    from grpo_cli.config.recipes import _packaged_recipes

    assert (_packaged_recipes() / "sft_arithmetic.yaml").exists()
    assert (REPO / "recipes" / "sft_arithmetic.yaml").exists()


def test_missing_model_directory_is_one_line_and_creates_no_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(REPO / "recipes"))
    with pytest.raises(SystemExit) as e:
        main(["train", "recipe=grpo_arithmetic", "model.name_or_path=./no/such/run"])
    assert e.value.code == 2
    assert "model.name_or_path: no such directory './no/such/run'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_unknown_precision_is_one_line_and_creates_no_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRPO_RECIPE_PATH", str(REPO / "recipes"))
    with pytest.raises(SystemExit) as e:
        main(["train", "recipe=sft_arithmetic", "trainer.precision=fp8", "output_dir=out"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config key 'trainer.precision': expected fp32 or bf16, got 'fp8'" in err
    assert not (tmp_path / "out").exists()
