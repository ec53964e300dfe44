"""`loku audit`: a thin typer layer over `loku.audit.run_audit(AuditConfig(...))`; the help text of every option
is the AuditConfig field's."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer

from ..audit.config import AuditConfig

_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(AuditConfig)}


def _opt(name: str, *flags: str):
    return typer.Option(None, *flags, help=_HELP[name])


def command(
    model: Optional[str] = _opt("model"),
    adapter: Optional[str] = _opt("adapter"),
    original: Optional[str] = _opt("original"),
    reference: Optional[str] = _opt("reference"),
    forget: Optional[str] = _opt("forget"),
    unseen: Optional[str] = _opt("unseen"),
    retain: Optional[str] = _opt("retain"),
    text_column: Optional[str] = _opt("text_column"),
    prompt_format: Optional[str] = _opt("prompt_format"),
    rows: Optional[int] = _opt("rows"),
    max_tokens: Optional[int] = _opt("max_tokens"),
    n: Optional[int] = _opt("n"),
    k: Optional[float] = _opt("k"),
    el: Optional[str] = _opt("el"),
    attacks: Optional[str] = _opt("attacks"),
    quantizers: Optional[str] = _opt("quantizers"),
    quantize_modes: Optional[str] = _opt("quantize_modes"),
    quantize_head: Optional[bool] = _opt("quantize_head", "--quantize-head/--no-quantize-head"),
    quantize_embeddings: Optional[bool] = _opt("quantize_embeddings",
                                               "--quantize-embeddings/--no-quantize-embeddings"),
    relearn_steps: Optional[str] = _opt("relearn_steps"),
    relearn_lr: Optional[float] = _opt("relearn_lr"),
    relearn_batch_size: Optional[int] = _opt("relearn_batch_size"),
    relearn_fraction: Optional[float] = _opt("relearn_fraction"),
    relearn_data: Optional[str] = _opt("relearn_data"),
    paraphrase_kinds: Optional[str] = _opt("paraphrase_kinds"),
    prefix_fraction: Optional[float] = _opt("prefix_fraction"),
    perturb_rate: Optional[float] = _opt("perturb_rate"),
    bootstrap: Optional[int] = _opt("bootstrap"),
    confidence: Optional[float] = _opt("confidence"),
    tolerance: Optional[float] = _opt("tolerance"),
    seed: Optional[int] = _opt("seed"),
    batch_size: Optional[int] = _opt("batch_size"),
    decode_batch_size: Optional[int] = _opt("decode_batch_size"),
    out: Optional[str] = _opt("out"),
    overwrite: bool = typer.Option(False, "--overwrite", help=_HELP["overwrite"]),
    resume: bool = typer.Option(False, "--resume", help=_HELP["resume"]),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=_HELP["trust_remote_code"]),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=_HELP["allow_pickle"]),
):
    """Is the forget set really gone? Membership AUCs, MA/EL/ES/EM against never-seen text, before and after
    quantization, relearning and paraphrased probes; writes audit.json, audit.md, audit.png."""
    from ..audit import run_audit

    given = {k: v for k, v in locals().items() if k in _HELP and v is not None}
    run_audit(AuditConfig(**given), log=typer.echo)
