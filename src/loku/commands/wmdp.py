"""`loku wmdp eval`: WMDP accuracy and MMLU (utility) with lm-evaluation-harness's tasks."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="WMDP benchmark (hazardous knowledge) with MMLU as the utility, "
                  "through lm-evaluation-harness.")


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="Hub id, local model folder, .gguf file, or 'smollm2-135m'."),
    out: str = typer.Option(..., help="New folder for wmdp.json."),
    adapter: Optional[str] = typer.Option(None, help="A PEFT adapter folder to merge into the model."),
    tasks: str = typer.Option("wmdp_bio,wmdp_cyber,mmlu", help="Comma-separated: wmdp_bio, wmdp_cyber, "
                                                                "wmdp_chem, mmlu."),
    data: Optional[str] = typer.Option(None, help="Folder holding wmdp/ and mmlu/ (snapshots of cais/wmdp and "
                                                  "cais/mmlu); default $LOKU_DATA, else the hub."),
    limit: int = typer.Option(0, help="First N questions of each task (MMLU: of each subject); 0 = all."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    num_fewshot: int = typer.Option(0, help="Few-shot examples (MMLU only; WMDP is zero-shot)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Score MODEL on WMDP (bio, cyber) and MMLU; writes wmdp.json (accuracy and per-question results)."""
    from ..wmdp import WmdpEvalConfig, eval_wmdp

    cfg = WmdpEvalConfig(model=model, out=out, adapter=adapter, tasks=tasks, data=data, limit=limit or None,
                         batch_size=batch_size, num_fewshot=num_fewshot, overwrite=overwrite,
                         trust_remote_code=trust_remote_code)
    eval_wmdp(cfg, log=typer.echo)
    typer.echo(f"wrote {out}/wmdp.json")
