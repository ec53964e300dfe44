"""The `loku` command: a thin typer layer; every command builds a config and calls one function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .commands.options import config_command
from .config import UnlearnConfig
from .demo import DemoConfig, run_demo
from .errors import LokuError
from .heap import keep_freed_memory
from .quiet import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make a language model forget specific data (LoKU: inverted hinge loss + FILA).")
list_app = typer.Typer(no_args_is_help=True, help="List what loku knows.")
app.add_typer(list_app, name="list")


@app.command()
@config_command(UnlearnConfig)
def unlearn(cfg: UnlearnConfig, given: dict,
            resume: Optional[Path] = typer.Option(None, help="Continue a killed run from its directory (its "
                                                             "saved config; no other option).")):
    """Unlearn a forget set from a model and write the adapter to --out."""
    from .train import resume_run
    from .train import unlearn as run

    if resume is not None:
        if given:
            raise LokuError(f"--resume continues {resume} with its saved config: drop the other options "
                            f"({', '.join(sorted(given))})")
        result = resume_run(resume)
        typer.echo(f"resumed and finished in {result.seconds:.0f} s, {result.epochs_run} epochs; wrote {result.out}")
        return
    if not cfg.out:
        raise LokuError("no output directory given: pass --out DIR (a new directory)")
    result = run(cfg)
    last = result.history[-1] if result.history else {}
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one line, not one per process
        typer.echo(f"done in {result.seconds:.0f} s, {result.epochs_run} epochs; final loss "
                   f"{last.get('loss', float('nan')):.4f}; wrote {result.out}")
        if cfg.until:
            from .audit.stop import verdict_line

            typer.echo(verdict_line(result.history, cfg.epochs))


@list_app.command("methods")
def list_methods():
    """Unlearning methods, what each optimises, and its own settings with their defaults."""
    import dataclasses

    from .methods import METHODS

    for name, m in METHODS.items():
        needs = [w for w, on in (("retain", m.needs_retain), ("reference model", m.needs_reference)) if on]
        facts = ([f"needs {', '.join(needs)}"] if needs else []) + [f"init auto = {m.default_init}"]
        if m.forget_weight != 1.0:
            facts.append(f"forget weight {m.forget_weight:g}")
        typer.echo(f"{name:8s} {m.summary}  [{'; '.join(facts)}]")
        for f in dataclasses.fields(m.settings) if m.settings else ():
            key = f"--{name}-{f.name}".replace("_", "-")
            typer.echo(f"{'':8s}   {key} (default {f.default}): {f.metadata.get('help', '')}")
    typer.echo("Every method: --forget-weight (default: the method's) and --retain-weight (default 1) scale its "
               "two terms.")


@app.command()
@config_command(DemoConfig)
def demo(cfg: DemoConfig):
    """Unlearn fictitious private records that SmolLM2-135M memorized, end to end on the CPU."""
    run_demo(cfg)


def _register_subapps() -> None:
    """Feature commands live beside their features (`loku/commands/*.py`), each a typer sub-app."""
    import importlib

    for name in ("tofu", "tdec", "fisher", "muse", "wmdp", "audit"):
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
    from .distributed import exit_process

    # Under `accelerate launch` a process must not leave through Python's teardown (see exit_process).
    exit_process(_run())


def _run() -> int:
    """Run the command line; the exit code."""
    import warnings

    # Deprecation notices from inside transformers/peft are for their maintainers, not loku's users,
    # and would break the one-line error contract.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    quiet_libraries()
    keep_freed_memory()   # a step's large tensors reuse the last step's memory (loku.heap)
    from .distributed import is_main, join_launch

    try:
        join_launch()
        if not is_main():   # under `accelerate launch` the main process reports; the others stay quiet
            sys.stdout = open(os.devnull, "w")
        app(standalone_mode=False)
    except LokuError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        return 130
    except typer.Exit as e:
        return e.exit_code
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
            return getattr(e, "exit_code", 2) or 2
        if isinstance(e, OSError):  # a full disk or a read-only place outside loku's atomic writers
            from .io import write_error

            err = write_error(e, Path(e.filename or "."))
            if err is not None:
                typer.echo(f"error: {err}", err=True)
                return 2
        raise
    return 0
