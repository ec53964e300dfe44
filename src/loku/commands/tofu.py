"""`loku tofu ...`: fine-tune the target and retain models, unlearn with several methods, evaluate a model on
TOFU and aggregate Forget Quality / Model Utility."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import LokuError
from ..tofu.evaluate import TofuEvalConfig
from ..tofu.finetune import TofuFinetuneConfig, finetune_tofu
from ..tofu.run import TofuUnlearnConfig, run_tofu
from ..tofu.summary import AggregateConfig
from .options import config_command

app = typer.Typer(no_args_is_help=True, help="TOFU benchmark: fine-tune target and retain models, unlearn, "
                  "per-item evaluation logs, Forget Quality, Model Utility.")

ORDER = ("Forget Quality", "Model Utility")


def _table(summary: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in [k for k in ORDER if k in summary] + [k for k in summary if k not in ORDER]:
        table.add_row(key, f"{summary[key]:.4g}")
    Console().print(table)


@app.command("eval")
@config_command(TofuEvalConfig)
def eval_(cfg: TofuEvalConfig):
    """Evaluate MODEL on TOFU's four sets and write TOFU's official per-item logs to --out."""
    from ..io import check_out_dir
    from ..models import load_model
    from ..tofu import evaluate_tofu, load_sets, model_utility
    from ..tofu.finetune import tofu_format

    check_out_dir(cfg.out, cfg.overwrite)
    fmt, source = tofu_format(cfg.prompt_format, cfg.model)
    sets = load_sets(cfg.data_dir, forget=cfg.split, limit=cfg.limit or None,
                     authors=cfg.authors)  # bad data fails before loading
    lm, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    typer.echo(f"prompt format {fmt} ({source})")
    logs = evaluate_tofu(lm, tokenizer, sets, cfg.out, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         limit=None, log=typer.echo, prompt_format=fmt)
    _table(model_utility(logs), f"TOFU {cfg.split}: {cfg.model}")
    out = Path(cfg.out)
    typer.echo(f"wrote {out / 'eval_log_aggregated.json'}; Forget Quality needs a retain model's log: "
               f"loku tofu aggregate {out / 'eval_log_aggregated.json'} RETAIN_EVAL/eval_log_aggregated.json")


@app.command("aggregate")
@config_command(AggregateConfig)
def aggregate_(cfg: AggregateConfig):
    """Forget Quality, Model Utility and TOFU's 12 set numbers of CKPT against the RETAIN model (refused when
    the two logs record different prompt formats)."""
    from ..tofu import aggregate, read_logs
    from ..tofu.logs import log_format

    ckpt_logs, retain_logs = read_logs(cfg.ckpt), read_logs(cfg.retain)
    summary = aggregate(ckpt_logs, retain_logs)
    if cfg.as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        fmt = log_format(ckpt_logs) or log_format(retain_logs)
        _table(summary, f"TOFU: {cfg.ckpt} vs retain {cfg.retain}" + (f" (prompt format {fmt})" if fmt else ""))


@app.command("finetune")
@config_command(TofuFinetuneConfig)
def finetune_(cfg: TofuFinetuneConfig):
    """Fine-tune the TOFU target model (on full) and the retain model (on retainYY) from a base model."""
    if not cfg.out:
        raise LokuError("no output folder given: pass --out DIR (a new folder for target/ and retain/)")
    summary = finetune_tofu(cfg, log=typer.echo)
    out = Path(cfg.out)
    typer.echo(f"done in {summary['seconds']:.0f} s; wrote {out / 'target'}, {out / 'retain'} and "
               f"{out / 'tofu_finetune.json'}. Next: loku tofu unlearn --target {out / 'target'} "
               f"--out DIR --methods ga,gd,npo,idk,ihl")


@app.command("unlearn")
@config_command(TofuUnlearnConfig)
def unlearn_(cfg: TofuUnlearnConfig):
    """Unlearn a TOFU forget split from the target with one or more methods; Forget Quality and Model
    Utility every epoch; writes report.md, results.json and fq_mu.png."""
    from ..tofu.report import markdown_table

    results = run_tofu(cfg, log=typer.echo)
    typer.echo(markdown_table(results))
    out = Path(cfg.out)
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'} and {out / 'fq_mu.png'}")
