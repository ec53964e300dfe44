"""`loku fisher`: compute FILA's (or VILA's) Fisher statistics alone and save them, so that
`loku unlearn --init fila --fisher-cache FILE` starts from them instead of recomputing.

The cache only hits when the statistics were taken on the very batches the unlearning run will see, so
this command builds the run's `UnlearnConfig` and takes the run's own set-up (`loku.training.setup`: the same
batches, the same LoRA plan, so VILA's rank and scaling); `loku.fisher.cached_statistics` then recognises the
file by model, modules, data hash and settings.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from accelerate import PartialState

from ..config import UnlearnConfig
from ..config_base import Config, setting
from ..distributed import barrier, is_main
from ..errors import LokuError
from ..fisher import STATISTICS, relative_importance, run_statistics, statistics_function
from ..lora import plan_lora
from ..losses import get_method
from ..train import load_data
from ..training.setup import model_to_train, run_batches
from .options import config_command


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
    """The statistics to compute: the flag (checked by compute_fisher), else the config's init when it takes
    statistics, else fila."""
    return method or (cfg.init if cfg.init in STATISTICS else "fila")


def compute_fisher(cfg: UnlearnConfig, out: str | Path, method: str = "fila", *, overwrite: bool = False,
                   model=None, tokenizer=None, progress: bool = True) -> FisherRun:
    """Fisher statistics of `cfg`'s model on the first-epoch batches `unlearn(cfg)` would train on (the run's
    own set-up), saved (atomically) to `out`. Inputs are checked before the model pass; nothing is written
    on error. A given `model` is read, not changed."""
    statistics_function(method)
    if not cfg.lora:
        raise LokuError("Fisher statistics initialise LoRA adapters: drop lora: false (full fine-tuning) "
                        "from the config")
    out = check_out_file(out, overwrite)
    forget_ex, retain_ex = load_data(cfg, get_method(cfg.method))
    if not retain_ex:
        raise LokuError("Fisher statistics weigh the forget set against a retain set: pass --retain FILE")
    state = PartialState(cpu=not torch.cuda.is_available())   # under accelerate launch: the process group
    loaded = model is None
    model, tokenizer = model_to_train(cfg, model, tokenizer, inplace=True)
    if loaded:   # where unlearn would train; the statistics do not depend on it (cache keys are on CPU)
        model.to(state.device)
    plan = plan_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.alpha)   # a run with a bad rank fails here too
    # The processes split the batches and all-reduce the sums (loku.fisher): the file equals a one-process run's.
    pairs = list(run_batches(cfg, forget_ex, retain_ex, tokenizer, state.num_processes).epoch(0))
    t0 = time.time()
    stats = run_statistics(method, model, pairs, plan, progress=progress)
    seconds = time.time() - t0
    means = {n: float(t.double().mean()) for n, t in relative_importance(stats, cfg.fisher_eps).items()}
    if is_main():
        stats.save(out)
    barrier()
    return FisherRun(stats, out, method, seconds, dict(sorted(means.items(), key=lambda kv: -kv[1])))


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
                                 "the run's rank and alpha).", group="Output", choices=tuple(STATISTICS), kind="Fisher method",
                                 default_text="the run's --init if fila or vila, else fila")
    out: str | None = setting(None, "New .safetensors file.", group="Output", default_text="the run's fisher_cache")
    overwrite: bool = setting(False, "Replace an existing --out file.", group="Output")
    run: UnlearnConfig = setting(help="The unlearning run the statistics are for.", factory=UnlearnConfig,
                                 # the statistics are taken before training: the run's stop rule plays no part
                                 hide=("until", "unseen", "until_auc_margin", "until_auc_attack"))


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
