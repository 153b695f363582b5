"""Where recipes are found: ``./recipes``, the directories of ``$GRPO_RECIPE_PATH`` (colon-separated)
and the recipes shipped with the package, first match wins."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import yaml


def recipe_dirs() -> List[Path]:
    """Directories searched for recipes, first match wins."""
    dirs = [Path.cwd() / "recipes"]
    dirs += [Path(p) for p in os.environ.get("GRPO_RECIPE_PATH", "").split(":") if p]
    dirs.append(_packaged_recipes())
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def _packaged_recipes() -> Path:
    try:
        import grpo_cli.recipes as pkg  # installed wheel: recipes/ is mapped to this package

        return Path(list(pkg.__path__)[0])
    except ImportError:  # source checkout without install
        return Path(__file__).resolve().parents[2] / "recipes"


def list_recipes() -> Dict[str, Path]:
    """Recipe name -> file, first directory wins."""
    found: Dict[str, Path] = {}
    for d in recipe_dirs():
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def recipe_description(path: Path) -> str:
    """The recipe's ``description:`` field, read without composing."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        return f"(unreadable: {str(e).splitlines()[0]})"
    return str(data.get("description", "")) if isinstance(data, dict) else ""
