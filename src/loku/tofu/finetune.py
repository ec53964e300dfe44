"""TOFU's two starting models: the *target* (fine-tuned on `full`, it knows every author) and the *retain*
model (fine-tuned on `retainYY` only, it never saw the authors of `forgetXX`). Unlearning the target
succeeds when its forget-set answers look like the retain model's (Forget Quality).

TOFU's recipe is the default: 5 epochs, effective batch 32 (batch_size x grad_accum), lr 1e-5, weight
decay 0.01, one epoch of linear warmup, full fine-tuning, loss on the answer tokens only, in TOFU's own
prompt format for phi (`prompt_format`, recorded in tofu_finetune.json and used again by unlearn and eval).

    summary = finetune_tofu(TofuFinetuneConfig(out="runs/tofu-models", data_dir="~/loku-data", authors=20))
    # runs/tofu-models/target/, runs/tofu-models/retain/ (safetensors + tokenizer), tofu_finetune.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import io
from ..config_base import PRECISION_HELP, PRECISIONS, Config, setting
from ..data.qa import PROMPT_FORMAT_HELP, PROMPT_FORMATS, TOFU_PROMPT_FORMAT, check_prompt_format
from ..data.tofu import QA_PER_AUTHOR, load_split, scaled_authors, tokenize_qa
from ..distributed import barrier, is_main, rank_world
from ..errors import LokuError
from ..finetune import finetune
from ..models import load_model, resolve_model_path
from ..registry import unknown_choice

SUMMARY = "tofu_finetune.json"
MODELS = ("target", "retain")
FORGET_SPLITS = ("forget01", "forget05", "forget10")


@dataclass
class TofuFinetuneConfig(Config):
    """Options of `loku tofu finetune` (same names as its flags)."""

    out: str = setting("", "New folder for target/, retain/ and tofu_finetune.json.", group="Output")
    model: str = setting("smollm2-135m", "Base model: hub id, local folder, .gguf, or 'smollm2-135m'.", group="Model")
    data_dir: str | None = setting(None, "Data folder whose tofu/ holds TOFU's JSON files (see README 'Data').", group="Data",
                                   default_text="$LOKU_DATA, then the hub dataset locuslab/TOFU")
    split: str = setting("forget10", "Forget split the retain model leaves out (forget10 -> retain90).",
                         group="Data")
    authors: int | None = setting(None, "Keep K authors (20 QA each) with TOFU's forget share, e.g. 20 for "
                                  "forget10 = 2 forgotten authors.", group="Data", default_text="all 200")
    qa_per_author: int = setting(QA_PER_AUTHOR, "First Q QA pairs of every author.", group="Data")
    prompt_format: str = setting(TOFU_PROMPT_FORMAT, PROMPT_FORMAT_HELP + " TOFU's published numbers: tofu-phi "
                                 "(phi-1.5), tofu-llama2 (Llama-2-7b-chat).", group="Data", choices=PROMPT_FORMATS,
                                 kind="prompt format")
    epochs: int = setting(5, "Passes over the data.", group="Training", bound="positive")
    lr: float = setting(1e-5, "Peak learning rate.", group="Training", bound="positive")
    batch_size: int = setting(4, "Examples per micro-batch.", group="Training", bound="positive")
    grad_accum: int = setting(8, "Micro-batches per step: effective batch = batch size x this (TOFU: 32).",
                              group="Training", bound="positive")
    weight_decay: float = setting(0.01, "AdamW weight decay.", group="Training", bound="non-negative")
    warmup_epochs: float = setting(1.0, "Linear warmup, in epochs of updates.", group="Training",
                                   bound="non-negative")
    max_length: int = setting(500, "Tokens per example (TOFU's fine-tuning max_length).", group="Data",
                              bound="positive")
    seed: int = setting(0, "Seed of the data order.", group="Training")
    mixed_precision: str | None = setting(None, PRECISION_HELP, group="Training", choices=PRECISIONS,
                                          default_text="the launch configuration's, else no")
    overwrite: bool = setting(False, "Replace a non-empty --out folder.", group="Output")
    trust_remote_code: bool = setting(False, "Run the model repository's own code.", group="Model")

    def check(self):
        check_split(self.split)
        check_qa_per_author(self.qa_per_author)
        if self.authors is not None:
            scaled_authors(self.authors, split_percent(self.split))  # raises naming valid author counts


def check_split(split: str) -> None:
    if split not in FORGET_SPLITS:
        raise unknown_choice("forget split", split, FORGET_SPLITS)


def check_qa_per_author(q: int) -> None:
    if not isinstance(q, int) or not 1 <= q <= QA_PER_AUTHOR:
        raise LokuError(f"--qa-per-author must be between 1 and {QA_PER_AUTHOR}, got {q!r}")


def split_percent(split: str) -> int:
    return int(re.fullmatch(r"forget(\d\d)", split).group(1))


def retain_split(split: str) -> str:
    """The retain split that complements a forget split: forget10 -> retain90."""
    check_split(split)
    return f"retain{100 - split_percent(split)}"


def per_author(rows: list, qa_per_author: int) -> list:
    """The first `qa_per_author` rows of every author of an author-major TOFU split (20 rows each)."""
    if qa_per_author >= QA_PER_AUTHOR:
        return rows
    return [r for i, r in enumerate(rows) if i % QA_PER_AUTHOR < qa_per_author]


def check_qa_rows(name: str, rows: list) -> None:
    if not rows:
        raise LokuError(f"TOFU split {name} has no rows: check the data folder and --authors")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise LokuError(f"TOFU split {name} row {i} has no question/answer strings: pass an unmodified TOFU "
                            "data folder")


def training_rows(cfg: TofuFinetuneConfig) -> dict[str, list[dict]]:
    """{"target": rows of full, "retain": rows of retainYY}, both at the configured scale."""
    names = {"target": "full", "retain": retain_split(cfg.split)}
    rows = {}
    for model, split in names.items():
        rows[model] = per_author(load_split(split, cfg.data_dir, authors=cfg.authors, forget=cfg.split),
                                 cfg.qa_per_author)
        check_qa_rows(split, rows[model])
    return rows


def warmup_steps(n_rows: int, batch_size: int, grad_accum: int, warmup_epochs: float) -> tuple[int, int]:
    """(optimizer updates per epoch, warmup updates): TOFU warms up for one epoch of updates."""
    updates = math.ceil(math.ceil(n_rows / batch_size) / grad_accum)
    return updates, round(warmup_epochs * updates)


def train_model(cfg: TofuFinetuneConfig, name: str, rows: list[dict], out_dir: str | Path,
                progress: bool = True) -> dict:
    """Fine-tune a fresh copy of `cfg.model` on `rows` (QA loss on the answers) and write it, with its
    tokenizer, to `out_dir` as safetensors, all at once (a temporary folder renamed into place)."""
    t0 = time.time()
    model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model.requires_grad_(True)
    features = tokenize_qa(tokenizer, rows, cfg.max_length, prompt_format=cfg.prompt_format)
    # Under accelerate launch a step takes batch_size from every process: count updates of that global batch.
    updates, warmup = warmup_steps(len(rows), cfg.batch_size * rank_world()[1], cfg.grad_accum, cfg.warmup_epochs)
    history = finetune(model, features, tokenizer.pad_token_id, epochs=cfg.epochs, lr=cfg.lr,
                       batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, weight_decay=cfg.weight_decay,
                       warmup_steps=warmup, seed=cfg.seed, mixed_precision=cfg.mixed_precision, progress=progress,
                       description=f"fine-tune {name} ({len(rows)} QA)", out_dir=out_dir, tokenizer=tokenizer)
    return {"rows": len(rows), "updates_per_epoch": updates, "warmup_steps": warmup, "history": history,
            "seconds": round(time.time() - t0, 1), "path": str(out_dir)}


def finetune_tofu(cfg: TofuFinetuneConfig, progress: bool = True,
                  log: Callable[[str], None] | None = print) -> dict:
    """Write `cfg.out/target/` (fine-tuned on full) and `cfg.out/retain/` (on retainYY), then
    `cfg.out/tofu_finetune.json` (the config, the splits, each model's loss per epoch and seconds).
    Every input is checked before anything is loaded or written."""
    out = io.check_out_dir(cfg.out, cfg.overwrite)
    rows = training_rows(cfg)
    resolve_model_path(cfg.model)  # a bad --model fails here, before the output folder exists
    barrier()   # under accelerate launch: every process has checked --out before the main one creates it
    if is_main():
        io.start_out_dir(out, cfg.overwrite)
    t0 = time.time()
    summary = {"config": dataclasses.asdict(cfg), "splits": {"target": "full", "retain": retain_split(cfg.split)},
               "forget_split": cfg.split, "authors": cfg.authors, "qa_per_author": cfg.qa_per_author,
               "prompt_format": cfg.prompt_format}
    for name in MODELS:
        if log:
            log(f"fine-tuning the {name} model on {summary['splits'][name]} ({len(rows[name])} QA pairs, "
                f"prompt format {cfg.prompt_format})")
        summary[name] = train_model(cfg, name, rows[name], out / name, progress)
        if log:
            last = summary[name]["history"][-1]
            log(f"  {name}: final epoch loss {last['loss']:.4f}, {summary[name]['seconds']:.0f} s -> {out / name}")
    summary["seconds"] = round(time.time() - t0, 1)
    if is_main():
        io.write_json(out / SUMMARY, summary)
    return summary


def read_summary(model_dir: str | Path) -> dict | None:
    """The tofu_finetune.json beside a target/retain model folder, if it came from finetune_tofu."""
    path = Path(model_dir).expanduser().parent / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LokuError(f"{path} line {e.lineno} is not valid JSON ({e.msg}): rerun loku tofu finetune") from None


def tofu_format(given: str | None, model: str) -> tuple[str, str]:
    """(prompt format, where it came from) for evaluating or unlearning `model`: the format it was fine-tuned
    in, read from the tofu_finetune.json beside it (a summary from before formats could be chosen means
    `auto`), else `given`, else TOFU's phi format. A given format that contradicts the fine-tuning run is an
    error: the model's losses and answers would be measured on texts it was not trained on."""
    if given is not None:
        check_prompt_format(given)
    summary = read_summary(model) if Path(model).expanduser().is_dir() else None
    if summary is None:
        return (given, "given") if given is not None else (TOFU_PROMPT_FORMAT, "TOFU's, the default")
    trained = summary.get("config", {}).get("prompt_format", "auto")
    where = Path(model).expanduser().parent / SUMMARY
    if given is not None and given != trained:
        raise LokuError(f"--prompt-format {given} differs from the fine-tuning run ({where}: {trained}): drop "
                        f"--prompt-format or pass {trained}")
    return trained, f"as fine-tuned, {where}"
