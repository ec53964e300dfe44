"""`loku audit`: its options are AuditConfig's fields (`loku.commands.options`); the command runs one function."""

from __future__ import annotations

import typer

from ..audit.config import AuditConfig
from .options import config_command


@config_command(AuditConfig)
def command(cfg: AuditConfig):
    """Is the forget set really gone? Membership AUCs, MA/EL/ES/EM against never-seen text, before and after
    quantization, relearning and paraphrased probes; writes audit.json, audit.md, audit.png."""
    from ..audit import run_audit

    run_audit(cfg, log=typer.echo)
