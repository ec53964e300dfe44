"""`loku muse ...`: score a model on MUSE, unlearn MUSE's forget corpus with several methods, and compare a
model with the retrained model (PrivLeak)."""

from __future__ import annotations

import json
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="MUSE benchmark (VerbMem, KnowMem, PrivLeak): evaluate, unlearn, "
                  "aggregate against the retrained model.")


_CORPUS = typer.Option("news", help="MUSE corpus: news or books.")
_DATA = typer.Option(None, help="Folder laid out like muse_bench's data/ (default $LOKU_DATA/muse, else the hub).")
_METRICS = typer.Option("verbmem_f,knowmem_f,knowmem_r,privleak", help="Comma-separated MUSE metrics.")
_CONVENTION = typer.Option("muse_bench", help="muse_bench (MUSE paper's tables) or open-unlearning "
                                              "(OpenUnlearning's MUSE tables).")
_LIMIT = typer.Option(0, help="First N items of each evaluation set; 0 = all.")
_BATCH = typer.Option(8, help="Prompts or texts per forward pass / generation batch.")
_MIN_K = typer.Option(0.4, help="k of PrivLeak's Min-K% Prob (MUSE: 0.4).")
_AUC = typer.Option(None, help="The retrained model's AUC for PrivLeak (default: the convention's).")


def _scoring(corpus, data, metrics, convention, limit, batch_size, min_k, auc_retrain):
    from ..muse import MuseScoring

    return MuseScoring(corpus=corpus, data=data, metrics=metrics, convention=convention, limit=limit or None,
                       batch_size=batch_size, min_k=min_k, auc_retrain=auc_retrain)


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="Hub id (muse-bench/MUSE-News_target), local model folder, .gguf file."),
    out: str = typer.Option(..., help="New folder for muse.json and the per-metric logs."),
    adapter: Optional[str] = typer.Option(None, help="A PEFT adapter folder to merge into the model."),
    corpus: str = _CORPUS, data: Optional[str] = _DATA, metrics: str = _METRICS, convention: str = _CONVENTION,
    limit: int = _LIMIT, batch_size: int = _BATCH, min_k: float = _MIN_K, auc_retrain: Optional[float] = _AUC,
    resume: bool = typer.Option(False, "--resume", help="Continue a killed evaluation in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Score MODEL on MUSE: VerbMem, KnowMem (forget, retain), PrivLeak."""
    from ..muse import MuseEvalConfig, eval_model, markdown_table

    cfg = MuseEvalConfig(model=model, out=out, adapter=adapter, resume=resume, overwrite=overwrite,
                         trust_remote_code=trust_remote_code,
                         scoring=_scoring(corpus, data, metrics, convention, limit, batch_size, min_k, auc_retrain))
    summary = eval_model(cfg, log=typer.echo)
    typer.echo(markdown_table({model + (f" + {adapter}" if adapter else ""): summary["metrics"]}))
    if "auc" in summary:
        typer.echo(f"PrivLeak against AUC_retrain {summary['auc_retrain']} ({summary['auc_retrain_from']}); with "
                   f"a retrained model: loku muse aggregate {out} RETRAIN_EVAL")
    typer.echo(f"wrote {out}/muse.json")


@app.command("aggregate")
def aggregate_(
    model_eval: str = typer.Argument(..., help="The model's muse.json (or its folder) from `loku muse eval`."),
    retrain_eval: str = typer.Argument(..., help="The retrained model's muse.json (or its folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """MUSE numbers of a model and of the retrained model; PrivLeak against the retrained model's AUC."""
    from ..muse import aggregate, markdown_table, read_summary

    result = aggregate(read_summary(model_eval), read_summary(retrain_eval))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(markdown_table({"model": result["model"], "retrained model": result["retrain"]}))


def _train_default(name: str):
    from ..config import UnlearnConfig
    from ..muse.run import TRAIN_DEFAULTS

    return TRAIN_DEFAULTS.get(name, getattr(UnlearnConfig, name))


@app.command("unlearn")
def unlearn_(
    target: str = typer.Option(..., help="Target model: muse-bench/MUSE-News_target or a local folder."),
    out: str = typer.Option(..., help="New folder for the runs, results.json and report.md."),
    methods: str = typer.Option("ihl", help="Comma-separated; NAME+INIT picks a LoRA init (ga,npo,ihl,ihl+fila)."),
    corpus: str = _CORPUS, data: Optional[str] = _DATA, metrics: str = _METRICS, convention: str = _CONVENTION,
    limit: int = _LIMIT, batch_size: int = typer.Option(_train_default("batch_size")),
    eval_batch_size: int = _BATCH, min_k: float = _MIN_K, auc_retrain: Optional[float] = _AUC,
    retrain_eval: Optional[str] = typer.Option(None, help="The retrained model's muse.json, for PrivLeak."),
    forget_split: str = typer.Option("forget", help="raw/ split to forget."),
    retain_split: str = typer.Option("retain1", help="raw/ split to keep (OpenUnlearning: retain1)."),
    eval_every_epoch: bool = typer.Option(False, "--eval-every-epoch", help="Score every epoch, not only the last."),
    eval_target: bool = typer.Option(True, "--eval-target/--no-eval-target", help="Score the target (epoch 0)."),
    init: str = typer.Option("auto", help="LoRA init: auto (fila for ihl), default, fila, vila."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of LoRA."),
    lora_rank: int = typer.Option(_train_default("lora_rank")),
    epochs: int = typer.Option(_train_default("epochs")),
    lr: float = typer.Option(_train_default("lr")),
    grad_accum: int = typer.Option(_train_default("grad_accum")),
    max_length: int = typer.Option(_train_default("max_length"), help="Tokens per training example."),
    retain_weight: float = typer.Option(_train_default("retain_weight")),
    seed: int = typer.Option(_train_default("seed")),
    mixed_precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16 (default: the launch "
                                                              "configuration's, else no)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a MUSE run in --out: keep what finished."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Unlearn MUSE's forget corpus from the target with one or more methods and score MUSE; writes
    results.json and report.md."""
    from ..config import UnlearnConfig
    from ..muse import MuseUnlearnConfig, run_muse
    from ..muse.run import TRAIN_DEFAULTS

    train = UnlearnConfig(**{**TRAIN_DEFAULTS, **dict(
        lora=not full, init=init, lora_rank=lora_rank, epochs=epochs, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, retain_weight=retain_weight, seed=seed,
        mixed_precision=mixed_precision, trust_remote_code=trust_remote_code)})
    cfg = MuseUnlearnConfig(target=target, out=out, methods=methods, forget_split=forget_split,
                            retain_split=retain_split, retrain_eval=retrain_eval, eval_every_epoch=eval_every_epoch,
                            eval_target=eval_target, resume=resume, overwrite=overwrite,
                            trust_remote_code=trust_remote_code, train=train,
                            scoring=_scoring(corpus, data, metrics, convention, limit, eval_batch_size, min_k,
                                             auc_retrain))
    run_muse(cfg, log=typer.echo)
    typer.echo(f"wrote {out}/report.md and {out}/results.json")
