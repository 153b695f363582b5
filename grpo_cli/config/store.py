"""Register the structured configs with Hydra's ConfigStore: the schema and each group's options.

Options of ``algorithm`` and ``source`` are the subclasses of ``AlgorithmConfig`` and ``SourceConfig``
in :mod:`grpo_cli.config.schema`, named by their ``name`` default: adding a dataclass there adds the
option here.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from grpo_cli.config import schema as S


def _subclass_options(base: type) -> Dict[str, type]:
    out: Dict[str, type] = {}
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        out[cls.name] = cls  # dataclass default of the `name` field
        stack.extend(cls.__subclasses__())
    return out


def options() -> Dict[str, Dict[str, object]]:
    """Every config group and its options (dataclass types or preset instances)."""
    return {
        "model": {"tiny": S.ModelConfig()},
        "data": {
            "arithmetic": S.DataConfig(),
            "gsm8k": S.DataConfig(name="gsm8k", question_field="question", solution_field="answer"),
            "jsonl": S.DataConfig(name="jsonl"),
            "math": S.DataConfig(name="math", question_field="problem", solution_field="solution"),
        },
        "reward": {
            "none": S.RewardConfig(),
            "outcome": S.RewardConfig(name="outcome"),
            "outcome_rm": S.RewardConfig(name="outcome_rm"),
            "custom": S.RewardConfig(name="custom"),
            "functions": S.RewardConfig(name="functions"),
            "steps": S.RewardConfig(name="steps"),
            "process_rm": S.RewardConfig(name="process_rm"),
        },
        "source": _subclass_options(S.SourceConfig),
        "algorithm": _subclass_options(S.AlgorithmConfig),
    }


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="grpo_schema", node=S.RunConfig)
    for group, opts in options().items():
        for name, node in opts.items():
            cs.store(group=group, name=name, node=node)


def group_options(group: str) -> List[str]:
    return sorted(options().get(group, {}))


def node_fields(node: object) -> List[str]:
    """Top-level field names of a group option (a dataclass type or instance)."""
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def field_names(prefix: str) -> List[str]:
    """Field names of the schema node at ``prefix`` ("" is the top level); union over group options."""
    if not prefix:
        return [f.name for f in dataclasses.fields(S.RunConfig)]
    head, _, rest = prefix.partition(".")
    nodes = list(options().get(head, {}).values()) or [getattr(S.RunConfig(), head, None)]
    names: set = set()
    for node in nodes:
        try:
            cfg = OmegaConf.structured(node)
            sub = OmegaConf.select(cfg, rest) if rest else cfg
            names.update(sub.keys())
        except Exception:  # a missing or scalar node: no suggestions from it
            continue
    return sorted(names)
