"""`loku tofu ...`: evaluate a model on TOFU and aggregate Forget Quality / Model Utility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="TOFU benchmark: per-item evaluation logs, Forget Quality, Model Utility.")

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
def eval_(
    model: str = typer.Option(..., help="Hub id, local model directory, .gguf file, or 'smollm2-135m'."),
    out: str = typer.Option(..., help="Folder for the TOFU logs (eval_log*.json, eval_log_aggregated.json)."),
    split: str = typer.Option("forget10", help="Forget split: forget01, forget05 or forget10."),
    limit: int = typer.Option(300, help="First N items of each set (TOFU's ds_size is 300); 0 = all."),
    data: Optional[str] = typer.Option(None, help="Folder of TOFU's JSON files (default: hub locuslab/TOFU)."),
    authors: Optional[int] = typer.Option(None, help="Evaluate a K-author TOFU (as fine-tuned with --authors K)."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass / generation batch."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Cap on generated tokens (default: TOFU's 200 "
                                                             "tokens of prompt + answer)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Evaluate MODEL on TOFU's four sets and write TOFU's official per-item logs to --out."""
    from ..io import check_out_dir
    from ..models import load_model
    from ..tofu import evaluate_tofu, load_sets, model_utility

    check_out_dir(out, overwrite)
    sets = load_sets(data, forget=split, limit=limit or None, authors=authors)  # bad data fails before loading
    lm, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    logs = evaluate_tofu(lm, tokenizer, sets, out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         limit=None, log=typer.echo)
    _table(model_utility(logs), f"TOFU {split}: {model}")
    typer.echo(f"wrote {Path(out) / 'eval_log_aggregated.json'}; Forget Quality needs a retain model's log: "
               f"loku tofu aggregate {Path(out) / 'eval_log_aggregated.json'} RETAIN_EVAL/eval_log_aggregated.json")


@app.command("aggregate")
def aggregate_(
    ckpt: Path = typer.Argument(..., help="The checkpoint's eval_log_aggregated.json (or its folder)."),
    retain: Path = typer.Argument(..., help="The retain model's eval_log_aggregated.json (or its folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Forget Quality, Model Utility and TOFU's 12 set numbers of CKPT against the RETAIN model."""
    from ..tofu import aggregate, read_logs

    ckpt_logs, retain_logs = read_logs(ckpt), read_logs(retain)
    summary = aggregate(ckpt_logs, retain_logs)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _table(summary, f"TOFU: {ckpt} vs retain {retain}")
