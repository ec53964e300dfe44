"""`loku tdec ...`: the TDEC protocol (run), a model's forgetting thresholds, and utility scoring."""

from __future__ import annotations

import typer

from ..errors import LokuError
from ..tdec import TdecConfig, heldout_thresholds, run_tdec, utility_report
from ..tdec.run import UtilityConfig
from ..tdec.thresholds import ThresholdsConfig
from .options import config_command

app = typer.Typer(no_args_is_help=True, help="TDEC benchmark: unlearn extractable sequences until a model extracts "
                                             "them no better than unseen text; thresholds; utility.")


@app.command("run")
@config_command(TdecConfig)
def run(cfg: TdecConfig):
    """Unlearn FORGET from MODEL with the TDEC stop rule, then score utility; writes the paper's table."""
    if not cfg.out:
        raise LokuError("no output directory given: pass --out DIR (a new directory)")
    run_tdec(cfg, log=typer.echo)


@app.command("thresholds")
@config_command(ThresholdsConfig)
def thresholds_(cfg: ThresholdsConfig):
    """A model's forgetting thresholds: its mean EL_n and MA on held-out text. Preset: gpt-neo-125m
    (EL10 0.0499, MA 0.2994)."""
    options = cfg.to_dict()
    heldout_thresholds(options.pop("model"), options.pop("data"), **options, log=typer.echo)


@app.command("utility")
@config_command(UtilityConfig)
def utility(cfg: UtilityConfig):
    """Score any model on the TDEC utility tasks (reasoning accuracy, dialogue F1, Pile/WikiText perplexity)."""
    utility_report(cfg.model, cfg.out, adapter=cfg.adapter, tasks=cfg.tasks, limit=cfg.limit,
                   batch_size=cfg.batch_size, data_dir=cfg.data_dir, max_length=cfg.max_length,
                   overwrite=cfg.overwrite, trust_remote_code=cfg.trust_remote_code, log=typer.echo)
