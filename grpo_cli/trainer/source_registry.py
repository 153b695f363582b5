"""The data sources ``source.name`` chooses from, listed in one place."""

from __future__ import annotations

from typing import Any, Dict, Type

from grpo_cli.errors import UserError, nearest
from grpo_cli.trainer.offline import LabelledSource, PairSource, RFTSource
from grpo_cli.trainer.sources import DatasetSource, OnlineSource, Source

SOURCES: Dict[str, Type[Source]] = {
    "dataset": DatasetSource,
    "online": OnlineSource,
    "rft": RFTSource,
    "labelled": LabelledSource,
    "pairs": PairSource,
}


def build_source(cfg: Any, **kwargs) -> Source:
    """The source ``cfg.name`` names, built from its config section and the run's shared pieces."""
    if cfg.name not in SOURCES:
        raise UserError(f"source.name: unknown source '{cfg.name}': {nearest(cfg.name, SOURCES)}")
    return SOURCES[cfg.name](cfg, **kwargs)
