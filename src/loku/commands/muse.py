"""`loku muse ...`: score a model on MUSE, unlearn MUSE's forget corpus with several methods, and compare a
model with the retrained model (PrivLeak)."""

from __future__ import annotations

import json

import typer

from ..muse import MuseEvalConfig, MuseUnlearnConfig, aggregate, eval_model, markdown_table, read_summary, run_muse
from ..muse.summary import MuseAggregateConfig
from .options import config_command

app = typer.Typer(no_args_is_help=True, help="MUSE benchmark (VerbMem, KnowMem, PrivLeak): evaluate, unlearn, "
                  "aggregate against the retrained model.")


@app.command("eval")
@config_command(MuseEvalConfig)
def eval_(cfg: MuseEvalConfig):
    """Score MODEL on MUSE: VerbMem, KnowMem (forget, retain), PrivLeak."""
    summary = eval_model(cfg, log=typer.echo)
    typer.echo(markdown_table({cfg.model + (f" + {cfg.adapter}" if cfg.adapter else ""): summary["metrics"]}))
    if "auc" in summary:
        typer.echo(f"PrivLeak against AUC_retrain {summary['auc_retrain']} ({summary['auc_retrain_from']}); with "
                   f"a retrained model: loku muse aggregate {cfg.out} RETRAIN_EVAL")
    typer.echo(f"wrote {cfg.out}/muse.json")


@app.command("aggregate")
@config_command(MuseAggregateConfig)
def aggregate_(cfg: MuseAggregateConfig):
    """MUSE numbers of a model and of the retrained model; PrivLeak against the retrained model's AUC."""
    result = aggregate(read_summary(cfg.model_eval), read_summary(cfg.retrain_eval))
    if cfg.as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(markdown_table({"model": result["model"], "retrained model": result["retrain"]}))


@app.command("unlearn")
@config_command(MuseUnlearnConfig)
def unlearn_(cfg: MuseUnlearnConfig):
    """Unlearn MUSE's forget corpus from the target with one or more methods and score MUSE; writes
    results.json and report.md."""
    run_muse(cfg, log=typer.echo)
    typer.echo(f"wrote {cfg.out}/report.md and {cfg.out}/results.json")
