"""`loku fisher`: compute FILA's (or VILA's) Fisher statistics alone and save them, so that
`loku unlearn --init fila --fisher-cache FILE` starts from them instead of recomputing.

The cache only hits when the statistics were taken on the very batches the unlearning run will see, so
this command builds the run's `UnlearnConfig` and the run's batches exactly as `loku.train.unlearn` does
(same loader, tokenizer, `PairedBatches(forget, retain, batch_size, pad_id, seed).epoch(0)`, same targets,
same VILA rank and scaling); `loku.fisher.cached_statistics` then recognises the file by model, modules,
data hash and settings.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from ..config import UnlearnConfig
from ..config_base import Config, setting
from ..distributed import barrier, is_main
from ..errors import LokuError
from .options import config_command

METHODS = ("fila", "vila")


@dataclass
class FisherRun:
    """What `compute_fisher` did: the statistics, where they went, and the numbers for the summary."""

    stats: object                  # loku.fisher.FisherStats
    out: Path
    method: str
    seconds: float
    mean_importance: dict[str, float]   # module -> mean of F_forget / (eps + F_retain), largest first


def check_out_file(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing file (unless overwriting), a directory, or an unwritable place; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise LokuError(f"--out {path} is a directory: pass a file name such as {path / 'fisher.safetensors'}")
    if path.exists() and not overwrite:
        raise LokuError(f"{path} already exists: choose a new --out, or pass --overwrite to replace it")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise LokuError(f"cannot write under {parent}: choose a writable --out")
    return path


def fisher_method(cfg: UnlearnConfig, method: str | None) -> str:
    """The statistics to compute: the flag, else the config's FILA/VILA init, else fila."""
    if method is not None:
        if method not in METHODS:
            raise LokuError(f"unknown Fisher method {method!r}: choose fila or vila")
        return method
    return cfg.init if cfg.init in METHODS else "fila"


def compute_fisher(cfg: UnlearnConfig, out: str | Path, method: str = "fila", *, overwrite: bool = False,
                   model=None, tokenizer=None, progress: bool = True) -> FisherRun:
    """Fisher statistics of `cfg`'s model on the first-epoch batches `unlearn(cfg)` would train on,
    saved (atomically) to `out`. Every input is checked before the model pass; nothing is written on error."""
    from ..data.batches import PairedBatches
    from ..data.text import tokenize_examples
    from ..fisher import fisher_statistics, relative_importance, vila_statistics
    from ..lora import check_rank, resolve_targets, targeted_modules
    from ..losses import get_method
    from ..train import load_data

    if method not in METHODS:
        raise LokuError(f"unknown Fisher method {method!r}: choose fila or vila")
    if not cfg.lora:
        raise LokuError("Fisher statistics initialise LoRA adapters: drop lora: false (full fine-tuning) "
                        "from the config")
    out = check_out_file(out, overwrite)
    forget_ex, retain_ex = load_data(cfg, get_method(cfg.method))
    if not retain_ex:
        raise LokuError("Fisher statistics weigh the forget set against a retain set: pass --retain FILE")
    world = _state().num_processes
    n_batches = math.ceil(len(forget_ex) / (cfg.batch_size * world))
    if method == "vila" and n_batches < 2:   # E[g^2] - E[g]^2 over one batch is 0 up to rounding
        raise LokuError(f"VILA's statistics are variances over batches, but the {len(forget_ex)} forget examples "
                        f"make {n_batches} batch of --batch-size {cfg.batch_size}: lower --batch-size to at most "
                        f"{max(len(forget_ex) // 2, 1)}, or use --method fila")
    if model is None:
        from ..models import load_model

        model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                      allow_pickle=cfg.allow_pickle)
        model.to(_device())   # the statistics do not depend on where they are computed (cache keys are on CPU)
    elif tokenizer is None:
        raise LokuError("a model object was given without its tokenizer: pass tokenizer= too")
    else:
        from ..models import ensure_pad_token

        ensure_pad_token(tokenizer)
    targets = resolve_targets(model, cfg.lora_targets)
    check_rank(model, targets, cfg.lora_rank)   # the run these are for would fail; say so before the pass
    names = sorted(targeted_modules(model, targets))
    forget = tokenize_examples(forget_ex, tokenizer, cfg.max_length, "forget", cfg.prompt_format)
    retain = tokenize_examples(retain_ex, tokenizer, cfg.max_length, "retain", cfg.prompt_format)
    # unlearn's global batch is batch_size x processes; under accelerate launch the processes split the
    # batches and all-reduce the sums (loku.fisher), so the file equals a one-process run's.
    batches = PairedBatches(forget, retain, cfg.batch_size * world, tokenizer.pad_token_id, cfg.seed,
                            (cfg.retain_batch_size or cfg.batch_size) * world)
    pairs = list(batches.epoch(0))
    model.config.use_cache = False   # as unlearn sets it before FILA (the statistics do not depend on it)

    t0 = time.time()
    if method == "fila":
        stats = fisher_statistics(model, pairs, names, progress=progress)
    else:   # the rank and LoRA scaling the adapter will train with, as loku.fila.fila_init passes them
        stats = vila_statistics(model, pairs, names, rank=cfg.lora_rank, scaling=cfg.alpha / cfg.lora_rank,
                                progress=progress)
    seconds = time.time() - t0
    importance = relative_importance(stats, cfg.fisher_eps)
    means = {n: float(t.double().mean()) for n, t in importance.items()}
    if is_main():
        stats.save(out)
    barrier()
    return FisherRun(stats, out, method, seconds, dict(sorted(means.items(), key=lambda kv: -kv[1])))


def _state():
    """accelerate's process state (starts the process group under accelerate launch)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _device():
    """Where unlearn would train (accelerate's choice: the GPU when there is one)."""
    return _state().device


def _summary(run: FisherRun, cfg: UnlearnConfig, top: int = 5) -> list[str]:
    s = run.stats
    size = run.out.stat().st_size / 2**20
    lines = [f"{run.method.upper()} Fisher statistics of {cfg.model}: {len(s.forget)} modules, "
             f"{s.forget_tokens:,} forget + {s.retain_tokens:,} retain tokens, {run.seconds:.1f} s",
             f"top modules by mean relative importance F_forget / ({cfg.fisher_eps:g} + F_retain):"]
    width = max(len(n) for n in list(run.mean_importance)[:top])
    lines += [f"  {n:<{width}}  {v:.4g}" for n, v in list(run.mean_importance.items())[:top]]
    flags = f"--init {run.method} --fisher-cache {run.out}"
    if run.method == "vila" or cfg.lora_rank != 8 or cfg.lora_alpha is not None:
        flags += f" --lora-rank {cfg.lora_rank} --lora-alpha {cfg.alpha:g}"
    hint = f"wrote {run.out} ({size:.1f} MiB); reuse it with the same model, data, batch size and seed: " \
           f"loku unlearn ... {flags}"
    if cfg.lora_targets:
        hint += f" (and lora_targets: [{', '.join(cfg.lora_targets)}] in its --config)"
    return lines + [hint]


@dataclass
class FisherConfig(Config):
    """Options of `loku fisher`: which statistics, where they go, and the unlearning run they are for."""

    method: str | None = setting(None, "fila (Fisher diagonal) or vila (variance over random LoRA factors; needs "
                                 "the run's rank and alpha).", group="Output", choices=METHODS, kind="Fisher method",
                                 default_text="the run's --init if fila or vila, else fila")
    out: str | None = setting(None, "New .safetensors file.", group="Output", default_text="the run's fisher_cache")
    overwrite: bool = setting(False, "Replace an existing --out file.", group="Output")
    run: UnlearnConfig = setting(help="The unlearning run the statistics are for.", factory=UnlearnConfig)


@config_command(FisherConfig, config_file="run",
                config_help="The unlearning run's YAML config; flags given here override it.")
def command(cfg: FisherConfig):
    """Compute the Fisher statistics FILA/VILA start from and save them for `loku unlearn --fisher-cache`."""
    kind = fisher_method(cfg.run, cfg.method)
    out = cfg.out or cfg.run.fisher_cache
    if not out:
        raise LokuError("no output file given: pass --out FILE (e.g. fisher.safetensors)")
    run = compute_fisher(cfg.run, out, kind, overwrite=cfg.overwrite)
    if not is_main():   # the statistics file was written by the main process
        return
    for line in _summary(run, cfg.run):
        typer.echo(line)
