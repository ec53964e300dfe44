"""`loku tdec ...`: the TDEC protocol (run), a model's forgetting thresholds, and utility scoring."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="TDEC benchmark: unlearn extractable sequences until a model extracts "
                                             "them no better than unseen text; thresholds; utility.")

_MODEL = typer.Option("smollm2-135m", help="Hub id, local model directory, .gguf file, or 'smollm2-135m'.")


def _field_help(name: str) -> str:
    """A TdecConfig field's help text (one source for the flag and the config key)."""
    from ..tdec.run import TdecConfig

    return TdecConfig.__dataclass_fields__[name].metadata["help"]


@app.command("run")
def run(
    forget: str = typer.Option(..., help="Sequences to forget: any .csv/.jsonl/.txt file, or a TDEC set by name "
                                          "(lm_extraction_32_0) from the data folder."),
    out: str = typer.Option(..., help="New directory for report.json, table.md, curves.png and unlearned/."),
    model: str = _MODEL,
    method: str = typer.Option("ihl", help="Unlearning method (see `loku list methods`)."),
    retain: Optional[str] = typer.Option(None, help="Retain set (default: WikiText-2 raw test, shipped with loku, "
                                                    "when the method needs one)."),
    text_column: str = typer.Option("text", help="CSV/JSONL column holding the sequences."),
    rows: Optional[int] = typer.Option(None, help="Use the first N sequences of --forget."),
    max_tokens: int = typer.Option(200, help="Cut every sequence to this many of the model's tokens."),
    n: int = typer.Option(10, help="n of EL_n (10 in the paper)."),
    thresholds: Optional[str] = typer.Option(None, help="Preset (gpt-neo-125m) or a thresholds.json / its folder "
                                                        "from `loku tdec thresholds`; default: the model's preset."),
    el_threshold: Optional[float] = typer.Option(None, help="EL_n threshold as a fraction (0.0499 = 4.99 %)."),
    ma_threshold: Optional[float] = typer.Option(None, help="MA threshold as a fraction (0.2994 = 29.94 %)."),
    lora_rank: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default 2 x rank)."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of LoRA."),
    init: str = typer.Option("auto", help="LoRA init: auto (fila for ihl), default, fila, vila."),
    epochs: int = typer.Option(10, help="Most epochs; the stop rule ends the run at the first forgotten epoch."),
    lr: float = typer.Option(2e-4),
    batch_size: int = typer.Option(8),
    retain_weight: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    mixed_precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16 (default: the launch "
                                                              "configuration's, else no)."),
    tasks: Optional[str] = typer.Option(None, help="Utility tasks or groups (reasoning, dialogue, ppl), "
                                                   "comma-separated; default all 15."),
    limit: Optional[int] = typer.Option(None, help="First N items of each utility task."),
    no_utility: bool = typer.Option(False, "--no-utility", help="Skip the utility evaluation."),
    utility_before: bool = typer.Option(False, "--utility-before", help="Also score the model before unlearning."),
    data_dir: Optional[str] = typer.Option(None, help=_field_help("data_dir")),
    force: bool = typer.Option(False, "--force", help=_field_help("force")),
    eval_batch_size: int = typer.Option(8, help="Sequences per forward pass when evaluating."),
    no_save: bool = typer.Option(False, "--no-save", help="Do not write the unlearned adapter/model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Unlearn FORGET from MODEL with the TDEC stop rule, then score utility; writes the paper's table."""
    from ..config import UnlearnConfig
    from ..tdec import TdecConfig, run_tdec

    ucfg = UnlearnConfig(model=model, method=method, lora=not full, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         init=init, epochs=epochs, lr=lr,
                         batch_size=batch_size, retain_weight=retain_weight, seed=seed,
                         mixed_precision=mixed_precision, trust_remote_code=trust_remote_code)
    cfg = TdecConfig(forget=forget, out=out, model=model, retain=retain, text_column=text_column, rows=rows,
                     max_tokens=max_tokens, n=n, thresholds=thresholds, el_threshold=el_threshold,
                     ma_threshold=ma_threshold, utility=not no_utility, utility_before=utility_before, tasks=tasks,
                     limit=limit, data_dir=data_dir, force=force, eval_batch_size=eval_batch_size, save=not no_save,
                     overwrite=overwrite, trust_remote_code=trust_remote_code, unlearn=ucfg)
    run_tdec(cfg, log=typer.echo)


@app.command("thresholds")
def thresholds_(
    data: str = typer.Option(..., help="Held-out text the model never saw (.csv/.jsonl/.txt/.raw), or a TDEC set "
                                        "by name (lm_extraction_32_1) from the data folder."),
    model: str = _MODEL,
    out: Optional[str] = typer.Option(None, help="New directory for thresholds.json (default: print only)."),
    text_column: str = typer.Option("text"),
    rows: Optional[int] = typer.Option(None, help="Use the first N usable texts."),
    max_tokens: int = typer.Option(200, help="Cut every text to this many tokens (as the forget set)."),
    min_tokens: Optional[int] = typer.Option(None, help="Skip texts shorter than this (default n + 1)."),
    n: int = typer.Option(10, help="n of EL_n."),
    batch_size: int = typer.Option(8),
    data_dir: Optional[str] = typer.Option(None, help=_field_help("data_dir")),
    overwrite: bool = typer.Option(False, "--overwrite"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """A model's forgetting thresholds: its mean EL_n and MA on held-out text. Preset: gpt-neo-125m
    (EL10 0.0499, MA 0.2994)."""
    from ..tdec import heldout_thresholds

    heldout_thresholds(model, data, out=out, text_column=text_column, rows=rows, max_tokens=max_tokens, n=n,
                       min_tokens=min_tokens, batch_size=batch_size, overwrite=overwrite,
                       trust_remote_code=trust_remote_code, data_dir=data_dir, log=typer.echo)


@app.command("utility")
def utility(
    out: str = typer.Option(..., help="New directory for utility.json and table.md."),
    model: str = _MODEL,
    adapter: Optional[str] = typer.Option(None, help="A PEFT adapter folder to apply (e.g. RUN/unlearned/adapter)."),
    tasks: Optional[str] = typer.Option(None, help="Tasks or groups (reasoning, dialogue, ppl); default all 15."),
    limit: Optional[int] = typer.Option(None, help="First N items of each task."),
    batch_size: int = typer.Option(8),
    max_length: int = typer.Option(512, help="Longest sequence (Jang et al.: 512)."),
    data_dir: Optional[str] = typer.Option(None, help=_field_help("data_dir")),
    overwrite: bool = typer.Option(False, "--overwrite"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Score any model on the TDEC utility tasks (reasoning accuracy, dialogue F1, Pile/WikiText perplexity)."""
    from ..tdec import utility_report

    utility_report(model, out, adapter=adapter, tasks=tasks, limit=limit, batch_size=batch_size, data_dir=data_dir,
                   max_length=max_length, overwrite=overwrite, trust_remote_code=trust_remote_code, log=typer.echo)
