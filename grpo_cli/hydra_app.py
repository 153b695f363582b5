"""Hydra's own entry point over the same recipes and schema, for Hydra's multirun and its plugins.

    python -m grpo_cli.hydra_app --config-name sft_arithmetic -m 'trainer.lr=1e-3,3e-3' \
        hydra/launcher=joblib hydra.launcher.n_jobs=2            # pip install hydra-joblib-launcher
    python -m grpo_cli.hydra_app --config-name sft_arithmetic -m 'trainer.seed=range(8)' \
        hydra/launcher=submitit_slurm hydra.launcher.partition=gpu  # hydra-submitit-launcher

``grpo sweep`` runs a grid on one machine (isolated, resumable, summarised); this entry hands the same
grid to Hydra's launchers (joblib, SLURM through submitit, ...) and sweepers. Each job trains in its
Hydra output directory, evaluates with ``sweep.eval=true`` and returns ``sweep.metric`` (so a sweeper
such as Optuna can optimise it). Recipes are found where ``grpo`` finds them (``--config-name NAME``).
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from grpo_cli.cli import _quiet_libraries
from grpo_cli.config import store, validate
from grpo_cli.config.compose import PACKAGE_CONF
from grpo_cli.config.recipes import list_recipes, recipe_dirs
from grpo_cli.errors import UserError, nearest
from grpo_cli.evaluate import evaluate_model
from grpo_cli.runner import run_training
from grpo_cli.sweep import metric_name, read_metric
from grpo_cli.trainer.run import last_row

store.register()  # the schema and groups must be in the ConfigStore before Hydra composes


def search_path_override() -> str:
    """``hydra.searchpath=[...]``: the recipe directories and the packaged ``base`` config."""
    dirs = [*recipe_dirs(), PACKAGE_CONF]
    return "hydra.searchpath=[" + ",".join(f"file://{d.resolve()}" for d in dirs) + "]"


def train_and_measure(cfg: DictConfig) -> Optional[float]:
    """Train into the job's output directory, evaluate if asked; the metric ``sweep.metric`` names."""
    _quiet_libraries()  # in each job: launchers may run it in a fresh process
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"config key '{missing[0]}' is required (it is ???): pass {missing[0]}=...")
    validate.check(cfg)  # Hydra composed it, not compose_run: the declared ranges and choices
    with open_dict(cfg):
        cfg.recipe = HydraConfig.get().job.config_name
        cfg.output_dir = cfg.output_dir or HydraConfig.get().runtime.output_dir
    run = run_training(cfg)
    result = None
    if cfg.sweep.eval:
        eval_cfg = cfg.copy()  # the run's own data and rollout settings, and the eval.* overrides
        with open_dict(eval_cfg):
            eval_cfg.eval.run = str(run)
        result = evaluate_model(eval_cfg)
    metrics = last_row(run)
    (run / "done.json").write_text(json.dumps({"metrics": metrics, "eval": result}, indent=2) + "\n")
    return read_metric(metrics, result, metric_name(cfg))


def recipe_name(argv: List[str], default: str = "sft_arithmetic") -> str:
    """The ``--config-name``/``-cn`` of the command line: the recipe."""
    for i, arg in enumerate(argv):
        if arg in ("--config-name", "-cn") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1]
    return default


def main() -> None:
    """``python -m grpo_cli.hydra_app --config-name RECIPE [Hydra arguments]``.

    Hydra finds its primary config only in the primary config directory, so that is the recipe's
    own directory; ``base`` and the other recipe directories come through the search path.
    """
    name = recipe_name(sys.argv[1:])
    recipes = list_recipes()
    if name not in recipes:
        print(f"error: unknown recipe '{name}': {nearest(name, recipes)}", file=sys.stderr)
        sys.exit(2)
    sys.argv.append(search_path_override())  # last: argparse takes the overrides as one positional run
    app = hydra.main(version_base=None, config_path=str(recipes[name].parent.resolve()), config_name=name)
    app(train_and_measure)()


if __name__ == "__main__":
    main()
