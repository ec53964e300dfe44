"""MUSE unlearning runs: unlearn the forget corpus (raw/forget) from the target with one or more methods,
keeping raw/retain1, and score VerbMem, KnowMem and PrivLeak after the last (or every) epoch.

    results = run_muse(MuseUnlearnConfig(target="muse-bench/MUSE-News_target", out="runs/muse",
                                         methods=["ga", "npo", "ihl"], scoring=MuseScoring(data_dir="DATA")))

The corpora are cut into training examples as OpenUnlearning's PretrainingDataset does: the texts joined by
"\\n\\n", tokenized, cut into pieces of max_length tokens (less the tokenizer's special tokens) and decoded.
Layout of `out`: config.json, target_eval/ (epoch 0), runs/<label>/ (the unlearning run, muse/epoch-N/
evaluations, muse_run.json when finished), results.json and report.md (rewritten after every method).
With `resume`, finished evaluations and methods are kept and the rest run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import io
from ..config import UnlearnConfig
from ..config_base import Config
from ..distributed import barrier, is_main
from ..errors import LokuError
from ..tofu.run import (check_methods, check_model, check_same_run, method_list, parse_method, resumable_config,
                        run_out_dir)
from .data import MuseData
from .evaluate import SUMMARY, MuseScoring, evaluate_muse, load_data, read_summary
from .summary import against_retrain, check_comparable, markdown_table

CONFIG, RESULTS, TABLE, DONE = "config.json", "results.json", "report.md", "muse_run.json"
# OpenUnlearning's MUSE recipe (configs/experiment/unlearn/muse/default.yaml: 10 epochs, batch 4 x 8, 2048
# tokens) with a LoRA learning rate (OpenUnlearning's full fine-tuning uses 1e-5).
TRAIN_DEFAULTS = dict(epochs=10, lr=1e-4, batch_size=4, grad_accum=8, max_length=2048)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class MuseUnlearnConfig(Config):
    """Options of `loku muse unlearn`; `train` holds the settings every method shares."""

    target: str = field(default="", metadata=_help("The target model: muse-bench/MUSE-News_target, a folder."))
    out: str = field(default="", metadata=_help("New folder for the runs, results.json and report.md."))
    methods: list[str] = field(default_factory=lambda: ["ihl"], metadata=_help(
        "Comma-separated methods; NAME+INIT picks a LoRA init for one (ga,npo,ihl,ihl+fila)."))
    forget_split: str = field(default="forget", metadata=_help("raw/ split to forget."))
    retain_split: str = field(default="retain1", metadata=_help("raw/ split to keep (OpenUnlearning: retain1)."))
    retrain_eval: str | None = field(default=None, metadata=_help(
        "The retrained model's muse.json (`loku muse eval` of muse-bench/MUSE-News_retrain) for PrivLeak; "
        "default: the convention's AUC_retrain."))
    eval_every_epoch: bool = field(default=False, metadata=_help("Score MUSE after every epoch, not only the last."))
    eval_target: bool = field(default=True, metadata=_help("Score the target too (epoch 0)."))
    resume: bool = field(default=False, metadata=_help("Continue a run in --out: keep what finished."))
    overwrite: bool = field(default=False, metadata=_help("Replace a non-empty --out folder."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow the model's own code from the hub."))
    scoring: MuseScoring = field(default_factory=MuseScoring, metadata={
        "help": "What MUSE measures and how.", "rename": {"batch_size": "eval_batch_size"}})
    train: UnlearnConfig = field(default_factory=lambda: UnlearnConfig(**TRAIN_DEFAULTS), metadata={
        "help": "The unlearning settings every method shares.",
        "hide": ("model", "forget", "retain", "method", "text_column")})

    def __post_init__(self):
        self.methods = method_list(self.methods)
        super().__post_init__()

    def check(self):
        check_methods(self.methods, "--methods ga,npo,ihl")
        if self.resume and self.overwrite:
            raise LokuError("--resume keeps a run and --overwrite deletes it: pass one of them")


def chunk_corpus(texts: list[str], tokenizer, max_length: int) -> list[str]:
    """OpenUnlearning's PretrainingDataset._chunk_raw_text, leaving room for the special tokens that
    tokenization adds back (a BOS), so no token is cut off in training."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids
    size = max(1, max_length - len(tokenizer("").input_ids))
    return [tokenizer.decode(ids[i:i + size]) for i in range(0, len(ids), size)]


@dataclass
class MuseInputs:
    data: MuseData
    retrain: dict | None


def prepare(cfg: MuseUnlearnConfig) -> MuseInputs:
    """Check every input (methods, output folder, models, data, retrained model's evaluation), writing nothing."""
    run_out_dir(cfg, "MUSE")
    if not cfg.target:
        raise LokuError("no target model given: pass --target (e.g. muse-bench/MUSE-News_target or a folder)")
    check_model(cfg.target, "target")
    retrain = read_summary(cfg.retrain_eval) if cfg.retrain_eval else None
    data = load_data(cfg.scoring, raw=(cfg.forget_split, cfg.retain_split))
    if retrain is not None:
        probe = {"scoring": cfg.scoring.identity(), "items": {}}
        check_comparable(probe, retrain)
    return MuseInputs(data, retrain)


def run_method(spec, cfg: MuseUnlearnConfig, inputs: MuseInputs, run_dir: Path, progress: bool = True,
               log: Callable[[str], None] | None = None) -> dict:
    """Unlearn with one method from the target and score MUSE; returns (and writes to run_dir/muse_run.json)
    the scored epochs. A method that finished earlier is read back."""
    if (run_dir / DONE).is_file():
        return json.loads((run_dir / DONE).read_text(encoding="utf-8"))
    from ..models import load_model
    from ..train import unlearn

    train = dataclasses.replace(cfg.train, method=spec.method, init=spec.init or cfg.train.init, model=cfg.target,
                                out=str(run_dir), overwrite=True, trust_remote_code=cfg.trust_remote_code)
    model, tokenizer = load_model(cfg.target, trust_remote_code=cfg.trust_remote_code)
    forget = chunk_corpus(inputs.data[f"raw/{cfg.forget_split}"], tokenizer, train.max_length)
    retain = chunk_corpus(inputs.data[f"raw/{cfg.retain_split}"], tokenizer, train.max_length)
    epochs: list[dict] = []
    eval_seconds = 0.0

    def score(epoch: int, m) -> dict | None:
        nonlocal eval_seconds
        if not (cfg.eval_every_epoch or epoch == train.epochs):
            return None
        t0 = time.time()
        summary = evaluate_muse(m, tokenizer, inputs.data, cfg.scoring, run_dir / "muse" / f"epoch-{epoch}",
                                progress=False, write=is_main())
        metrics = against_retrain(summary, inputs.retrain)
        eval_seconds += time.time() - t0
        epochs.append({"epoch": epoch, **metrics, "eval_seconds": round(time.time() - t0, 1)})
        if log:
            log(f"  {spec.label} epoch {epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                                                              if v is not None))
        return metrics

    result = unlearn(train, model, tokenizer, callbacks=[score], progress=progress, forget=forget, retain=retain,
                     inplace=True)
    by_epoch = {h["epoch"]: h for h in result.history}
    for e in epochs:
        e.update({k: by_epoch[e["epoch"]][k] for k in ("loss", "forget", "retain") if k in by_epoch[e["epoch"]]})
    record = {"method": spec.method, "init": train.resolved_init, "lora_rank": train.lora_rank if train.lora else None,
              "train_examples": {"forget": len(forget), "retain": len(retain)},
              "seconds": round(result.seconds - eval_seconds, 1), "eval_seconds": round(eval_seconds, 1),
              "epochs": epochs}
    if is_main():
        io.write_json(run_dir / DONE, record)
    return record


def _table(results: dict) -> str:
    rows = {}
    if results.get("retrain"):
        rows["retrained model"] = results["retrain"]
    if results.get("target"):
        rows["target (before)"] = results["target"]
    for label, m in results["methods"].items():
        for e in m["epochs"]:
            rows[f"{label} epoch {e['epoch']}"] = e
    return markdown_table(rows)


def run_muse(cfg: MuseUnlearnConfig, progress: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Every method of `cfg` on MUSE; writes results.json and report.md to `cfg.out` and returns the results."""
    main = is_main()
    log = log if main else None
    inputs = prepare(cfg)
    out = Path(cfg.out)
    barrier()          # every process has checked --out before the main one creates it
    if cfg.resume:
        check_same_run(cfg, out / CONFIG)
    elif main:
        io.start_out_dir(out, cfg.overwrite)
        io.write_json(out / CONFIG, resumable_config(cfg))
    retrain = against_retrain(inputs.retrain, inputs.retrain) if inputs.retrain else None
    results = {"title": f"MUSE {cfg.scoring.corpus} ({cfg.scoring.convention}): {cfg.target}",
               "corpus": cfg.scoring.corpus, "convention": cfg.scoring.convention, "target_model": cfg.target,
               "source": inputs.data.source, "retrain_eval": cfg.retrain_eval, "train": dataclasses.asdict(cfg.train),
               "retrain": retrain, "target": None, "methods": {}}
    if cfg.eval_target:
        target_dir = out / "target_eval"
        if log:
            log(f"scoring the target {cfg.target}" + (" (done earlier)" if (target_dir / SUMMARY).is_file() else ""))
        if (target_dir / SUMMARY).is_file():
            summary = read_summary(target_dir)
        else:
            from ..models import load_model

            model, tokenizer = load_model(cfg.target, trust_remote_code=cfg.trust_remote_code)
            summary = evaluate_muse(model, tokenizer, inputs.data, cfg.scoring, target_dir, log=log,
                                    progress=progress and main, label="  target ", write=main)
            del model
        results["target"] = against_retrain(summary, inputs.retrain)
    for spec in [parse_method(m) for m in cfg.methods]:
        run_dir = out / "runs" / spec.label
        if log:
            log(f"unlearning with {spec.label}" + (" (done earlier)" if (run_dir / DONE).is_file() else ""))
        results["methods"][spec.label] = run_method(spec, cfg, inputs, run_dir, progress and main, log)
        if main:
            io.write_json(out / RESULTS, results)
            io.write_text(out / TABLE, f"# {results['title']}\n\n{_table(results)}\n")
    if main:
        io.write_json(out / RESULTS, results)
        io.write_text(out / TABLE, f"# {results['title']}\n\n{_table(results)}\n")
    return results
