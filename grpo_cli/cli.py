"""The ``grpo`` command line: train, eval and list recipes, configured with Hydra overrides.

    grpo train recipe=sft_arithmetic trainer.steps=200 output_dir=runs/sft
    grpo train recipe=sft_arithmetic --print-config
    grpo train recipe=sft_arithmetic output_dir=runs/sft resume=true     # continue after an interruption
    grpo eval run=runs/sft
    grpo eval run=runs/sft eval.n=16 eval.ks=[1,4,16]
    grpo eval samples=outputs.jsonl
    grpo sweep recipe=sft_arithmetic 'trainer.lr=1e-3,3e-3' 'trainer.seed=range(3)' sweep.parallel=2
    grpo report run=runs/sft          # runs/sft/report.html: curves, evals, completions, config
    grpo export run=runs/grpo output_dir=exports/grpo          # a Hugging Face model directory (vLLM, hub)
    grpo recipes

A mistake in the input (recipe, key, type, file) prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer
from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from grpo_cli.config.compose import PACKAGE_CONF, compose_file, compose_run, split_recipe
from grpo_cli.config.recipes import list_recipes, recipe_description
from grpo_cli.config.usage import EXPORT_SHORTHANDS, REPORT_SHORTHANDS, SHORTHANDS, check_used, check_words
from grpo_cli.errors import Interrupted, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models with the DeepSeekMath methods (SFT, RFT, DPO, PPO, GRPO) from YAML recipes.",
)
out = Console()
err = Console(stderr=True, soft_wrap=True)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
OVERRIDES = typer.Argument(
    None, help="recipe=NAME and Hydra overrides key=value (e.g. trainer.lr=1e-4 lora.enabled=true)"
)


@app.command(context_settings=EXTRA)
def train(
    overrides: Optional[List[str]] = OVERRIDES,
    print_config: bool = typer.Option(False, "--print-config", "-p", help="Print the composed config and exit."),
) -> None:
    """Train with a recipe: grpo train recipe=NAME key=value ..."""
    check_words("grpo train", overrides or [])
    recipe, rest = split_recipe(overrides or [])
    cfg = compose_run(recipe, rest)
    check_used("grpo train", rest)
    if print_config:
        typer.echo(OmegaConf.to_yaml(cfg, resolve=True), nl=False)
        return
    from grpo_cli.runner import run_training  # deferred: torch and transformers load only when a command needs them

    run_training(cfg)


EVAL_HELP = (
    "Evaluate a run or model (greedy pass@1; maj@K and pass@K with eval.n=N samples), or score a JSONL of completions."
    "\n\nEach evaluation of a run is kept in <run>/eval/<data>-<split>[-limitN][-nN]-<hash of its settings>/ "
    "(eval.json, samples.jsonl); <run>/eval/latest is the newest. output_dir=DIR writes to DIR instead."
    '\n\nsamples=FILE.jsonl holds one JSON object per line: the completion (field "completion"; another field '
    'with eval.completion_field=NAME), the reference final answer (field "answer", e.g. "72"; another with '
    'eval.answer_field=NAME) and, optionally, the "prompt" (copied to samples.jsonl).'
)


@app.command(name="eval", context_settings=EXTRA, help=EVAL_HELP)
def evaluate(
    overrides: Optional[List[str]] = typer.Argument(
        None,
        help="run=<run dir|model dir|hub name> or samples=<file.jsonl>, then overrides "
        "(data=gsm8k eval.limit=100 output_dir=DIR)",
    ),
    print_config: bool = typer.Option(False, "--print-config", "-p", help="Print the composed config and exit."),
) -> None:
    """``grpo eval``: its help is ``EVAL_HELP`` (typer keeps a docstring's line breaks)."""
    from grpo_cli.evaluate import evaluate_model, inherit_run_config, results_table, score_samples  # deferred: torch

    check_words("grpo eval", overrides or [])
    args = [_shorthand(a) for a in (overrides or [])]
    cfg = inherit_run_config(compose_file(PACKAGE_CONF / "eval.yaml", args), args)
    check_used("grpo eval samples=..." if cfg.eval.samples else "grpo eval", args)
    if print_config:
        typer.echo(OmegaConf.to_yaml(cfg, resolve=True), nl=False)
        return
    result = score_samples(cfg) if cfg.eval.samples else evaluate_model(cfg)
    out.print(results_table(result))
    out.print(f"wrote {result['output_dir']}/eval.json and samples.jsonl", highlight=False, soft_wrap=True)


@app.command(context_settings=EXTRA)
def sweep(
    overrides: Optional[List[str]] = typer.Argument(
        None,
        help="recipe=NAME, overrides, swept ones in Hydra's grammar "
        "('trainer.lr=1e-3,3e-3' 'trainer.seed=range(3)'), sweep.* settings",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List the runs of the grid and exit."),
) -> None:
    """Train a grid of runs (resumable, crashes isolated) and summarise them: grpo sweep recipe=NAME 'a=1,2' ..."""
    from grpo_cli.sweep import run_sweep, summary_tables  # deferred: torch

    check_words("grpo sweep", overrides or [])
    recipe, rest = split_recipe(overrides or [])
    sweep_dir, cfg, outcomes = run_sweep(recipe, rest, dry_run=dry_run)
    if dry_run:
        for o in outcomes:
            typer.echo(
                f"{o.run.name}: grpo train recipe={recipe} {' '.join(o.run.overrides)}"
            )  # unwrapped: copy-pasteable
        return
    for table in summary_tables(sweep_dir, cfg, outcomes):
        out.print(table)
    failed = [o for o in outcomes if o.status == "failed"]
    out.print(
        f"wrote {sweep_dir}/summary.csv"
        + (" and summary.png" if (sweep_dir / "summary.png").exists() else "")
        + (f"; {len(failed)} of {len(outcomes)} runs failed (see their train.log)" if failed else "")
    )
    if failed:
        sys.exit(1)  # a script running the sweep sees that some runs failed


def _shorthand(arg: str, section: str = "eval") -> str:
    """``run=X`` is short for ``eval.run=X``; so are ``samples``, ``split``, ``limit`` and ``output_dir``
    (the key ``grpo train`` knows: for ``grpo eval`` it is where the results go). With
    ``section="export"``: ``run`` and ``output_dir`` of ``grpo export``."""
    for key in SHORTHANDS if section == "eval" else EXPORT_SHORTHANDS:
        if arg.startswith(key + "="):
            return f"{section}.{arg}"
    return arg


@app.command(context_settings=EXTRA)
def report(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="run=<run dir> or sweep=<sweep dir>, then output=FILE.html smoothing=0.6"
    ),
    print_config: bool = typer.Option(False, "--print-config", "-p", help="Print the composed config and exit."),
) -> None:
    """Write a self-contained report.html of a run (curves, evals, completions, config) or sweep: grpo report run=DIR"""
    check_words("grpo report", overrides or [])
    args = [f"report.{a}" if a.split("=", 1)[0] in REPORT_SHORTHANDS else a for a in (overrides or [])]
    cfg = compose_file(PACKAGE_CONF / "report.yaml", args)
    check_used("grpo report", args)
    if print_config:
        typer.echo(OmegaConf.to_yaml(cfg, resolve=True), nl=False)
        return
    r = cfg.report
    if bool(r.run) == bool(r.sweep):
        raise UserError("grpo report: pass one of run=DIR (a run directory) or sweep=DIR (a sweep directory)")
    from grpo_cli.report import write_report  # deferred: matplotlib loads only when a report is drawn

    kind = "run" if r.run else "sweep"
    path = write_report(kind, r.run or r.sweep, r.output, r.smoothing)
    out.print(f"report: {path}", highlight=False, soft_wrap=True)


EXPORT_HELP = (
    "Export a run's policy as a Hugging Face model directory: LoRA merged into the base, safetensors in "
    "export.dtype (bf16, fp16, fp32), the tokenizer with its chat template, generation_config.json stopping "
    "at the run's stop tokens. Loads with AutoModelForCausalLM.from_pretrained(DIR) and vllm.LLM(DIR)."
    "\n\nexport.adapter_only=true writes the LoRA adapter alone (PeftModel.from_pretrained(base, DIR)); "
    "export.push_to_hub=USER/NAME uploads the directory (export.private=true for a new private repository)."
)


@app.command(name="export", context_settings=EXTRA, help=EXPORT_HELP)
def export(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="run=<run dir|checkpoint dir> output_dir=DIR, then overrides (export.dtype=fp32 ...)"
    ),
    print_config: bool = typer.Option(False, "--print-config", "-p", help="Print the composed config and exit."),
) -> None:
    """``grpo export``: its help is ``EXPORT_HELP``."""
    check_words("grpo export", overrides or [])
    args = [_shorthand(a, "export") for a in (overrides or [])]
    cfg = compose_file(PACKAGE_CONF / "export.yaml", args)
    check_used("grpo export", args)
    if print_config:
        typer.echo(OmegaConf.to_yaml(cfg, resolve=True), nl=False)
        return
    from grpo_cli.export import export_run  # deferred: torch

    done = export_run(cfg)
    out.print(f"wrote {done}", highlight=False, soft_wrap=True)


@app.command()
def recipes() -> None:
    """List the recipes found (./recipes, $GRPO_RECIPE_PATH, the packaged ones)."""
    table = Table(title="recipes")
    table.add_column("recipe", style="bold")
    table.add_column("description")
    table.add_column("file", style="dim")
    for name, path in list_recipes().items():
        table.add_row(name, recipe_description(path), str(path))
    out.print(table)


def _quiet_libraries() -> None:
    """Our own progress bar and tables say what is happening; silence the libraries' bars and notices."""
    from transformers.utils import logging as hf_logging  # deferred: transformers loads only when needed

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user errors become one line and exit code 2."""
    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except Interrupted as e:  # SIGINT/SIGTERM: a checkpoint was saved, the message says where
        err.print(str(e), highlight=False)
        sys.exit(e.exit_code)
    except UserError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # "[wandb]" is text, not markup
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # the command-line parser's own usage errors (typer vendors click)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
