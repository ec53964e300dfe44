"""`loku tofu ...`: fine-tune the target and retain models, unlearn with several methods, evaluate a model on
TOFU and aggregate Forget Quality / Model Utility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="TOFU benchmark: fine-tune target and retain models, unlearn, "
                  "per-item evaluation logs, Forget Quality, Model Utility.")

ORDER = ("Forget Quality", "Model Utility")
_FORMAT_HELP = ("Prompt format: tofu-phi (TOFU's for phi-1.5 and most models), tofu-llama2 (TOFU's for "
                "Llama-2-7b-chat), chat, plain or auto. Default: as fine-tuned (tofu_finetune.json beside the "
                "model), else tofu-phi.")


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
    data_dir: Optional[str] = typer.Option(None, help="Data folder whose tofu/ holds TOFU's JSON files (default "
                                                      "$LOKU_DATA, then the hub dataset locuslab/TOFU)."),
    authors: Optional[int] = typer.Option(None, help="Evaluate a K-author TOFU (as fine-tuned with --authors K)."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass / generation batch."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Cap on generated tokens (default: TOFU's 200 "
                                                             "tokens of prompt + answer)."),
    prompt_format: Optional[str] = typer.Option(None, help=_FORMAT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Evaluate MODEL on TOFU's four sets and write TOFU's official per-item logs to --out."""
    from ..io import check_out_dir
    from ..models import load_model
    from ..tofu import evaluate_tofu, load_sets, model_utility
    from ..tofu.finetune import tofu_format

    check_out_dir(out, overwrite)
    fmt, source = tofu_format(prompt_format, model)
    sets = load_sets(data_dir, forget=split, limit=limit or None, authors=authors)  # bad data fails before loading
    lm, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    typer.echo(f"prompt format {fmt} ({source})")
    logs = evaluate_tofu(lm, tokenizer, sets, out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         limit=None, log=typer.echo, prompt_format=fmt)
    _table(model_utility(logs), f"TOFU {split}: {model}")
    typer.echo(f"wrote {Path(out) / 'eval_log_aggregated.json'}; Forget Quality needs a retain model's log: "
               f"loku tofu aggregate {Path(out) / 'eval_log_aggregated.json'} RETAIN_EVAL/eval_log_aggregated.json")


@app.command("aggregate")
def aggregate_(
    ckpt: Path = typer.Argument(..., help="The checkpoint's eval_log_aggregated.json (or its folder)."),
    retain: Path = typer.Argument(..., help="The retain model's eval_log_aggregated.json (or its folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Forget Quality, Model Utility and TOFU's 12 set numbers of CKPT against the RETAIN model (refused when
    the two logs record different prompt formats)."""
    from ..tofu import aggregate, read_logs
    from ..tofu.logs import log_format

    ckpt_logs, retain_logs = read_logs(ckpt), read_logs(retain)
    summary = aggregate(ckpt_logs, retain_logs)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        fmt = log_format(ckpt_logs) or log_format(retain_logs)
        _table(summary, f"TOFU: {ckpt} vs retain {retain}" + (f" (prompt format {fmt})" if fmt else ""))


def _field_help(command: str, name: str) -> str:
    """A config field's help text (one source for the flag and the config key)."""
    from ..tofu.finetune import TofuFinetuneConfig
    from ..tofu.run import TofuUnlearnConfig

    cls = {"finetune": TofuFinetuneConfig, "unlearn": TofuUnlearnConfig}[command]
    return cls.__dataclass_fields__[name].metadata["help"]


def _ft_default(name: str):
    from ..tofu.finetune import TofuFinetuneConfig

    return getattr(TofuFinetuneConfig, name)


@app.command("finetune")
def finetune_(
    out: str = typer.Option(..., help="New folder for target/, retain/ and tofu_finetune.json."),
    model: str = typer.Option(_ft_default("model"), help="Base model: hub id, local folder, .gguf, or 'smollm2-135m'."),
    data_dir: Optional[str] = typer.Option(None, help=_field_help("finetune", "data_dir")),
    split: str = typer.Option(_ft_default("split"), help="Forget split the retain model leaves out "
                                                         "(forget10 -> retain90)."),
    authors: Optional[int] = typer.Option(None, help="Keep K authors (20 QA each) with TOFU's forget share, "
                                                     "e.g. 20 for forget10 = 2 forgotten authors."),
    qa_per_author: int = typer.Option(_ft_default("qa_per_author"), help="First Q QA pairs of every author."),
    prompt_format: str = typer.Option(_ft_default("prompt_format"), help="Prompt format: tofu-phi (TOFU's for "
                                      "phi-1.5 and most models), tofu-llama2 (TOFU's for Llama-2-7b-chat), chat, "
                                      "plain or auto."),
    epochs: int = typer.Option(_ft_default("epochs")),
    lr: float = typer.Option(_ft_default("lr")),
    batch_size: int = typer.Option(_ft_default("batch_size")),
    grad_accum: int = typer.Option(_ft_default("grad_accum"), help="Effective batch = batch size x this (TOFU: 32)."),
    weight_decay: float = typer.Option(_ft_default("weight_decay")),
    warmup_epochs: float = typer.Option(_ft_default("warmup_epochs"), help="Linear warmup, in epochs of updates."),
    max_length: int = typer.Option(_ft_default("max_length")),
    seed: int = typer.Option(_ft_default("seed")),
    mixed_precision: Optional[str] = typer.Option(_ft_default("mixed_precision"),
                                                  help="no, bf16 or fp16 (default: the launch configuration's, else no)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Fine-tune the TOFU target model (on full) and the retain model (on retainYY) from a base model."""
    from ..tofu.finetune import TofuFinetuneConfig, finetune_tofu

    cfg = TofuFinetuneConfig(out=out, model=model, data_dir=data_dir, split=split, authors=authors,
                             qa_per_author=qa_per_author, epochs=epochs, lr=lr, batch_size=batch_size,
                             grad_accum=grad_accum, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                             max_length=max_length, seed=seed, mixed_precision=mixed_precision, overwrite=overwrite,
                             trust_remote_code=trust_remote_code, prompt_format=prompt_format)
    summary = finetune_tofu(cfg, log=typer.echo)
    typer.echo(f"done in {summary['seconds']:.0f} s; wrote {Path(out) / 'target'}, {Path(out) / 'retain'} and "
               f"{Path(out) / 'tofu_finetune.json'}. Next: loku tofu unlearn --target {Path(out) / 'target'} "
               f"--out DIR --methods ga,gd,npo,idk,ihl")


def _train_default(name: str):
    from ..config import UnlearnConfig
    from ..tofu.run import TRAIN_DEFAULTS

    return TRAIN_DEFAULTS.get(name, getattr(UnlearnConfig, name))


@app.command("unlearn")
def unlearn_(
    target: str = typer.Option(..., help="Target model folder (loku tofu finetune's OUT/target) or a hub id."),
    out: str = typer.Option(..., help="New folder for the runs and the report."),
    method: Optional[str] = typer.Option(None, help="One method (default ihl; see `loku list methods`)."),
    methods: Optional[str] = typer.Option(None, help="Several, comma-separated; NAME+INIT picks an init for "
                                                     "one of them, e.g. ga,gd,npo,idk,ihl,ihl+fila."),
    split: str = typer.Option("forget10", help="Forget split: forget01, forget05 or forget10."),
    data_dir: Optional[str] = typer.Option(None, help=_field_help("unlearn", "data_dir")),
    authors: Optional[int] = typer.Option(None, help="K-author TOFU (default: as fine-tuned, else all 200)."),
    qa_per_author: Optional[int] = typer.Option(None, help="First Q QA pairs per author (default: as fine-tuned)."),
    retain_model: Optional[str] = typer.Option(None, help="Retain model folder (default: retain/ beside "
                                                          "--target)."),
    retain_log: Optional[str] = typer.Option(None, help="The retain model's eval_log_aggregated.json, instead "
                                                        "of evaluating it."),
    prompt_format: Optional[str] = typer.Option(None, help=_FORMAT_HELP.replace("the model", "--target")),
    init: str = typer.Option("auto", help="LoRA init: auto (fila for ihl), default, fila, vila."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of LoRA."),
    lora_rank: int = typer.Option(_train_default("lora_rank")),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default 2 x rank)."),
    epochs: int = typer.Option(_train_default("epochs")),
    lr: float = typer.Option(_train_default("lr")),
    batch_size: int = typer.Option(_train_default("batch_size")),
    grad_accum: int = typer.Option(_train_default("grad_accum")),
    weight_decay: float = typer.Option(_train_default("weight_decay")),
    warmup_steps: int = typer.Option(_train_default("warmup_steps")),
    max_length: int = typer.Option(_train_default("max_length")),
    retain_weight: float = typer.Option(_train_default("retain_weight")),
    seed: int = typer.Option(_train_default("seed")),
    mixed_precision: Optional[str] = typer.Option(_train_default("mixed_precision"),
                                                  help="no, bf16 or fp16 (default: the launch configuration's, else no)."),
    limit: int = typer.Option(300, help="First N items of each evaluation set (TOFU's ds_size); 0 = all."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Cap on generated tokens per answer."),
    eval_batch_size: int = typer.Option(8),
    eval_target: bool = typer.Option(True, "--eval-target/--no-eval-target",
                                      help="Evaluate the target as epoch 0."),
    resume: bool = typer.Option(False, "--resume", help="Continue a TOFU run in --out: keep what finished."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Unlearn a TOFU forget split from the target with one or more methods; Forget Quality and Model
    Utility every epoch; writes report.md, results.json and fq_mu.png."""
    from ..config import UnlearnConfig
    from ..errors import LokuError
    from ..tofu.report import markdown_table
    from ..tofu.run import TofuUnlearnConfig, run_tofu

    if method and methods:
        raise LokuError("--method and --methods both given: pass one (--methods takes a comma-separated list)")
    train = UnlearnConfig(lora=not full, init=init, lora_rank=lora_rank, lora_alpha=lora_alpha, epochs=epochs, lr=lr,
                          batch_size=batch_size, grad_accum=grad_accum, weight_decay=weight_decay,
                          warmup_steps=warmup_steps, max_length=max_length, retain_weight=retain_weight, seed=seed,
                          mixed_precision=mixed_precision, trust_remote_code=trust_remote_code)
    cfg = TofuUnlearnConfig(target=target, out=out, methods=methods or method or "ihl", split=split, data_dir=data_dir,
                            authors=authors, qa_per_author=qa_per_author, retain_model=retain_model,
                            retain_log=retain_log, limit=limit or None, max_new_tokens=max_new_tokens,
                            eval_batch_size=eval_batch_size, eval_target=eval_target, resume=resume,
                            overwrite=overwrite, trust_remote_code=trust_remote_code, train=train,
                            prompt_format=prompt_format)
    results = run_tofu(cfg, log=typer.echo)
    typer.echo(markdown_table(results))
    typer.echo(f"wrote {Path(out) / 'report.md'}, {Path(out) / 'results.json'} and {Path(out) / 'fq_mu.png'}")
