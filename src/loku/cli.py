"""The `loku` command: a thin typer layer; every command builds a config and calls one function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import LokuError
from .quiet import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make a language model forget specific data (LoKU: inverted hinge loss + FILA).")
list_app = typer.Typer(no_args_is_help=True, help="List what loku knows.")
app.add_typer(list_app, name="list")


@app.command()
def unlearn(
    config: Optional[Path] = typer.Option(None, help="YAML config; flags given here override it."),
    model: Optional[str] = typer.Option(None, help="Hub id, local model directory, .gguf file, or 'smollm2-135m'."),
    forget: Optional[str] = typer.Option(None, help="Data to forget: .csv, .jsonl, .json (QA) or .txt."),
    retain: Optional[str] = typer.Option(None, help="Data to keep (used by every method but ga; default: "
                                                     "built-in general text, builtin:wikitext-2)."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Train even when forget and retain share "
                                                                      "examples (refused by default)."),
    method: Optional[str] = typer.Option(None, help="Unlearning method (see `loku list methods`)."),
    out: Optional[str] = typer.Option(None, help="New directory for the adapter, config and metrics."),
    text_column: Optional[str] = typer.Option(None, help="CSV/JSONL column holding the text."),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default 2 x rank)."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of LoRA."),
    init: Optional[str] = typer.Option(None, help="LoRA init: auto (fila for ihl), default, fila, vila."),
    fisher_cache: Optional[str] = typer.Option(None, help="Fisher statistics file: reused when it matches."),
    epochs: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    grad_accum: Optional[int] = typer.Option(None),
    max_length: Optional[int] = typer.Option(None),
    retain_weight: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    mixed_precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16 (default: the launch "
                                                              "configuration's, else no)."),
    save_merged: bool = typer.Option(False, "--save-merged", help="Also write the merged model (safetensors)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights."),
    save_every: Optional[int] = typer.Option(None, help="Also checkpoint every N steps (default: each epoch)."),
    resume: Optional[Path] = typer.Option(None, help="Continue a killed run from its directory."),
):
    """Unlearn a forget set from a model and write the adapter to --out."""
    from .config import UnlearnConfig
    from .train import resume_run
    from .train import unlearn as run

    if resume is not None:
        result = resume_run(resume)
        typer.echo(f"resumed and finished in {result.seconds:.0f} s, {result.epochs_run} epochs; wrote {result.out}")
        return

    base = UnlearnConfig.from_yaml(config).to_dict() if config else {}
    flags = dict(model=model, forget=forget, retain=retain, method=method, out=out, text_column=text_column,
                 lora_rank=lora_rank, lora_alpha=lora_alpha, init=init, fisher_cache=fisher_cache, epochs=epochs, lr=lr,
                 batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, retain_weight=retain_weight,
                 seed=seed, mixed_precision=mixed_precision, save_every=save_every)
    base.update({k: v for k, v in flags.items() if v is not None})
    for name, on in dict(save_merged=save_merged, overwrite=overwrite, trust_remote_code=trust_remote_code,
                         allow_pickle=allow_pickle, allow_overlap=allow_overlap).items():
        if on:
            base[name] = True
    if full:
        base["lora"] = False
    cfg = UnlearnConfig.from_dict(base, source=str(config or "flags"))
    if not cfg.out:
        raise LokuError("no output directory given: pass --out DIR (a new directory)")
    result = run(cfg)
    last = result.history[-1] if result.history else {}
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one line, not one per process
            typer.echo(f"done in {result.seconds:.0f} s, {result.epochs_run} epochs; final loss "
                   f"{last.get('loss', float('nan')):.4f}; wrote {result.out}")


@list_app.command("methods")
def list_methods():
    """Unlearning methods and what each optimises."""
    from .losses import METHODS

    for name, m in METHODS.items():
        needs = [w for w, on in (("retain", m.needs_retain), ("reference model", m.needs_reference)) if on]
        typer.echo(f"{name:8s} {m.summary}" + (f"  [needs {', '.join(needs)}]" if needs else ""))


@app.command()
def demo(
    out: Optional[str] = typer.Option(None, help="New directory for the report (default runs/demo-<time>)."),
    quick: bool = typer.Option(False, help="A smaller demo for a smoke test."),
    model: str = typer.Option("smollm2-135m", help="Model to run the demo on."),
    retain: str = typer.Option("records", help="What unlearning keeps: records (the other people's) or builtin "
                                               "(loku's built-in general text, as `loku unlearn` without --retain)."),
):
    """Unlearn fictitious private records that SmolLM2-135M memorized, end to end on the CPU."""
    import time

    from .demo import DemoConfig, run_demo

    out = out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_demo(DemoConfig(out=out, model=model, retain=retain, **(DemoConfig.quick_overrides() if quick else {})))


def _register_subapps() -> None:
    """Feature commands live beside their features (`loku/commands/*.py`), each a typer sub-app."""
    import importlib

    for name in ("tofu", "tdec", "fisher"):
        try:
            module = importlib.import_module(f"loku.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("loku.commands"):
                continue
            raise
        if hasattr(module, "app"):
            app.add_typer(module.app, name=name)
        elif hasattr(module, "command"):
            app.command(name)(module.command)


_register_subapps()


def main() -> None:
    import warnings

    # Deprecation notices from inside transformers/peft are for their maintainers, not loku's users,
    # and would break the one-line error contract.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    quiet_libraries()
    from .distributed import is_main, join_launch

    try:
        join_launch()
        if not is_main():   # under `accelerate launch` the main process reports; the others stay quiet
            sys.stdout = open(os.devnull, "w")
        app(standalone_mode=False)
    except LokuError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # typer >= 0.29 raises its vendored click's exceptions (not click.ClickException) for usage
        # errors: an unknown flag, a value of the wrong type, no arguments.
        import click

        if isinstance(e, (click.ClickException, typer.TyperException)) and hasattr(e, "format_message"):
            if type(e).__name__ == "NoArgsIsHelpError":  # `loku`, `loku list`: the help text
                e.show()
            else:
                ctx = getattr(e, "ctx", None)
                command = ctx.command_path if ctx is not None else "loku"
                typer.echo(f"error: {e.format_message().rstrip('.')}: see `{command} --help`", err=True)
            sys.exit(getattr(e, "exit_code", 2) or 2)
        if isinstance(e, OSError):  # a full disk or a read-only place outside loku's atomic writers
            from .io import write_error

            err = write_error(e, Path(e.filename or "."))
            if err is not None:
                typer.echo(f"error: {err}", err=True)
                sys.exit(2)
        raise
