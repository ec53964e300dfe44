"""`loku wmdp eval`: WMDP accuracy and MMLU (utility) with lm-evaluation-harness's tasks."""

from __future__ import annotations

import typer

from ..wmdp import WmdpEvalConfig, eval_wmdp
from .options import config_command

app = typer.Typer(no_args_is_help=True, help="WMDP benchmark (hazardous knowledge) with MMLU as the utility, "
                  "through lm-evaluation-harness.")


@app.command("eval")
@config_command(WmdpEvalConfig)
def eval_(cfg: WmdpEvalConfig):
    """Score MODEL on WMDP (bio, cyber) and MMLU; writes wmdp.json (accuracy and per-question results)."""
    eval_wmdp(cfg, log=typer.echo)
    typer.echo(f"wrote {cfg.out}/wmdp.json")
