"""Compose a run config from a recipe and Hydra overrides, turning Hydra's errors into one line.

Recipes are found by :mod:`grpo_cli.config.recipes`. Config groups (``model``, ``data``,
``reward``, ``source``, ``algorithm``) and ``base.yaml`` ship inside the package (``grpo_cli/conf``
and the structured configs registered in :mod:`grpo_cli.config.store`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from grpo_cli.config import store, validate
from grpo_cli.config.recipes import list_recipes
from grpo_cli.config.usage import full_key_hint, override_key
from grpo_cli.errors import UserError, nearest

PACKAGE_CONF = Path(__file__).resolve().parent.parent / "conf"


def split_recipe(args: Sequence[str], default: Optional[str] = None) -> tuple[str, List[str]]:
    """Separate ``recipe=NAME`` from the other overrides."""
    recipe, rest = default, []
    for a in args:
        if a.startswith("recipe="):
            recipe = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not recipe:
        raise UserError("missing recipe: pass recipe=NAME (see `grpo recipes`)")
    return recipe, rest


def compose_run(recipe: str, overrides: Sequence[str]) -> DictConfig:
    """The composed, validated config of ``recipe`` with ``overrides`` applied."""
    recipes = list_recipes()
    if recipe not in recipes:
        raise UserError(f"unknown recipe '{recipe}': {nearest(recipe, recipes)}")
    cfg = compose_file(recipes[recipe], overrides)
    cfg.recipe = recipe
    return cfg


def compose_file(path: Path, overrides: Sequence[str]) -> DictConfig:
    """Compose the primary config at ``path`` (a recipe, or a packaged config) with ``overrides``."""
    _check_yaml(path)
    store.register()
    GlobalHydra.instance().clear()
    search = f"hydra.searchpath=[file://{PACKAGE_CONF}]"
    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base=None):
            cfg = compose(config_name=path.stem, overrides=[search, *overrides])
    except Exception as e:  # Hydra/OmegaConf raise many types; all are the user's input here
        raise UserError(explain(e, overrides, path)) from None
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    _check_interpolations(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{path.name}: config key '{missing[0]}' is required (it is ???): pass {missing[0]}=...")
    _refuse_renamed(cfg)
    validate.check(cfg)  # every declared range and choice, before anything runs
    return cfg


def _check_interpolations(cfg: DictConfig) -> None:
    """A ``${...}`` that does not resolve (``trainer.lr=${nope}``) is the user's: one line, naming the key."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as e:  # OmegaConf's interpolation errors carry the key they happened at
        key = getattr(e, "full_key", None) or "?"
        raise UserError(f"config key '{key}': {str(e).strip().splitlines()[0]}") from None


def _check_yaml(path: Path) -> None:
    try:
        yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: malformed YAML: {problem}") from None


def explain(err: BaseException, overrides: Sequence[str], path: Path) -> str:
    """One line for a composition error: which key, what was expected, the nearest valid names."""
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    msg, key = str(root), getattr(root, "full_key", None) or _full_key_in(str(root))
    if key and re.search(r"Key '[^']+' not in", msg):
        return unknown_key(key, overrides)
    m = re.search(r"Value '([^']*)' (?:of type '\w+' could not be converted to (\w+)|is not a valid (\w+))", msg)
    if key and m:
        expected = (m.group(2) or m.group(3)).lower()
        return f"config key '{key}': expected {expected}, got '{m.group(1)}'"
    m = re.search(r"Could not find '([^']+)/([^']+)'", str(err))
    if m:
        group, option = m.group(1), m.group(2)
        return f"unknown {group} '{option}': {nearest(option, store.group_options(group))}"
    m = re.search(r"Could not override '([^']+)'", str(err))
    if m and key and key.startswith(m.group(1) + ".") and "is not in struct" in msg:  # a mapping given new keys
        return (
            f"config key '{m.group(1)}' is a mapping: add each entry on its own, +{key}=VALUE (Hydra's + appends a key)"
        )
    if m:
        return unknown_key(m.group(1), overrides)
    if type(root).__name__ == "OverrideParseException":
        return f"cannot parse override ({msg.splitlines()[0]}): expected key=value in Hydra's override grammar"
    first = msg.strip().splitlines()[0] if msg.strip() else type(root).__name__
    return f"{path.name}: {first}"


def _full_key_in(msg: str) -> Optional[str]:
    """The key an error in a recipe file names in its text (Hydra keeps only the text of its cause)."""
    m = re.search(r"^\s*full_key: (\S+)$", msg, re.MULTILINE)
    return m.group(1) if m else None


RENAMED = {
    "rollout.compile_attention": "rollout.compile_decode_step",
    "rollout.compile_attention_min_mib": "rollout.compile_decode_min_mib",
}
"""Old config key -> its new name: the old one is refused with the new one named, not a guess."""


def renamed_key(key: str) -> Optional[str]:
    """The one-line error for a key that was renamed (:data:`RENAMED`), or None."""
    return f"config key '{key}' was renamed: use {RENAMED[key]}" if key in RENAMED else None


def _refuse_renamed(cfg: DictConfig) -> None:
    """A renamed key that Hydra's ``+key=value`` appended would be silently ignored: refuse it too."""
    for key in RENAMED:
        if OmegaConf.select(cfg, key, default=None) is not None:
            raise UserError(renamed_key(key))


def unknown_key(key: str, overrides: Sequence[str] = ()) -> str:
    """Name the options of a group that do have the key (``source.group_size`` -> source=online), the
    full key of a field named without its section (``steps=10`` -> trainer.steps=10), else the nearest
    valid names."""
    if renamed_key(key):
        return renamed_key(key)
    head, _, field = key.partition(".")
    if not field:
        value = next((o.split("=", 1)[1] for o in overrides if "=" in o and override_key(o) == key), "VALUE")
        hint = full_key_hint(key, value)
        if hint:
            return f"unknown config key '{key}': {hint}"
    owners = [name for name, node in store.options().get(head, {}).items() if field in store.node_fields(node)]
    if owners and "." not in field:
        return f"unknown config key '{key}' for the chosen {head}; it belongs to {head}={'|'.join(owners)}"
    return f"unknown config key '{key}': {nearest(key.split('.')[-1], _siblings(key))}"


def _siblings(key: str) -> List[str]:
    """Valid field names next to ``key`` in the schema (best effort, for suggestions)."""
    return store.field_names(key.rsplit(".", 1)[0] if "." in key else "")
