"""`loku wmdp eval`: WMDP accuracy (hazardous knowledge, lower after unlearning) and MMLU accuracy (utility)
with lm-evaluation-harness's own tasks, as OpenUnlearning's `configs/experiment/eval/wmdp` runs them
(zero-shot, `acc`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import io
from ..config_base import Config, setting
from ..distributed import barrier, is_main
from ..errors import LokuError
from ..registry import unknown_choice
from .tasks import PREFIX, TASKS, WMDP, local_tasks, task_sources

RESULTS = "wmdp.json"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class WmdpEvalConfig(Config):
    """Options of `loku wmdp eval`."""

    model: str = field(default="", metadata=_help("Hub id, local model folder, .gguf file, or 'smollm2-135m'."))
    out: str = field(default="", metadata=_help("New folder for wmdp.json."))
    adapter: str | None = field(default=None, metadata=_help(
        "A PEFT adapter folder to merge into the model, or a T3 run's t3/ head folder (put on the model)."))
    tasks: list[str] = field(default_factory=lambda: ["wmdp_bio", "wmdp_cyber", "mmlu"], metadata=_help(
        "Comma-separated: wmdp_bio, wmdp_cyber, wmdp_chem, mmlu."))
    data_dir: str | None = setting(None, "Data folder whose wmdp/ and mmlu/ hold snapshots of the hub datasets "
                                   "cais/wmdp and cais/mmlu (see README 'Data').",
                                   default_text="$LOKU_DATA, then the hub datasets cais/wmdp, cais/mmlu")
    limit: int | None = field(default=None, metadata=_help("First N questions of each task (MMLU: each subject); "
                                                            "0 or None: all."))
    batch_size: int = field(default=8, metadata=_help("Sequences per forward pass."))
    num_fewshot: int = field(default=0, metadata=_help("Few-shot examples (MMLU only; WMDP is zero-shot)."))
    overwrite: bool = field(default=False, metadata=_help("Replace a non-empty --out folder."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow the model's own code from the hub."))

    RENAMED = {"data": "write data_dir: a data folder holding wmdp/ and mmlu/ (README 'Data')"}

    def __post_init__(self):
        if isinstance(self.tasks, str):   # the Python API takes "wmdp_bio,mmlu" as the flag does
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if self.limit == 0:   # 0 = every question
            self.limit = None
        super().__post_init__()

    def check(self):
        if not self.tasks:
            raise LokuError(f"no task given: pass --tasks with some of {', '.join(TASKS)}")
        for t in self.tasks:
            if t not in TASKS:
                raise unknown_choice("WMDP task", t, TASKS)
        if self.limit is not None and self.limit < 1:
            raise LokuError(f"--limit must be a positive number of questions (0 for all), got {self.limit}")
        if self.batch_size < 1 or self.num_fewshot < 0:
            raise LokuError("--batch-size must be 1 or more and --num-fewshot 0 or more: fix the flag")
        if self.num_fewshot and any(t in WMDP for t in self.tasks):
            raise LokuError("WMDP has no few-shot split (the harness runs it zero-shot): pass --num-fewshot 0")


def _item(sample: dict) -> dict:
    """One question: correct (0/1) and the log-likelihood of each choice (" A" .. " D")."""
    return {"acc": float(sample["acc"]), "loglikelihoods": [float(r[0]) for r in sample["filtered_resps"]]}


def _summary(names: dict[str, str], raw: dict) -> dict:
    """Per task: accuracy, its standard error, the number of questions and the per-question results."""
    results, groups, samples = raw.get("results", {}), raw.get("groups", {}), raw.get("samples", {})
    out = {}
    for task, name in names.items():
        metrics = groups.get(name) or results.get(name, {})
        entry = {"acc": metrics.get("acc,none"), "acc_stderr": metrics.get("acc_stderr,none")}
        parts = [k for k in samples if k == name or (task == "mmlu" and k.startswith(f"{name}_"))]
        items = {k.removeprefix(PREFIX): [_item(s) for s in sorted(samples[k], key=lambda s: s["doc_id"])]
                 for k in sorted(parts)}
        entry["n"] = sum(len(v) for v in items.values())
        if task == "mmlu":
            entry["subjects"] = len(items)
        entry["items"] = items if task == "mmlu" else next(iter(items.values()), [])
        out[task] = entry
    return out


def evaluate_wmdp(model, tokenizer, cfg: WmdpEvalConfig, sources: dict | None = None) -> dict | None:
    """Run the harness on `model` (in memory) for `cfg.tasks`, each on the local files or the hub dataset that
    loku.data.sources finds (`sources`: `task_sources` worked out earlier, else now). None in the processes
    of a launch other than the main one."""
    from ..harness import harness_evaluate

    sources = sources if sources is not None else task_sources(cfg.tasks, cfg.data_dir)
    with tempfile.TemporaryDirectory(prefix="loku-wmdp-") as folder:
        names = local_tasks(sources, cfg.num_fewshot, Path(folder))
        raw = harness_evaluate(model, tokenizer, tasks=list(names.values()), limit=cfg.limit,
                               batch_size=cfg.batch_size, num_fewshot=cfg.num_fewshot,
                               include_path=folder if any(f.path for f in sources.values()) else None,
                               log_samples=True)["raw"]
    if raw is None:   # under accelerate launch the harness hands its results to the main process only
        return None
    return {"model": cfg.model, "adapter": cfg.adapter, "num_fewshot": cfg.num_fewshot, "limit": cfg.limit,
            "sources": {t: f.where for t, f in sources.items()}, "tasks": _summary(names, raw)}


def eval_wmdp(cfg: WmdpEvalConfig, log: Callable[[str], None] | None = print) -> dict | None:
    """`loku wmdp eval`: check the inputs, load the model (+ adapter), score it, write `cfg.out`/wmdp.json."""
    from ..models import check_adapter, load_for_eval

    if not cfg.out:
        raise LokuError("no output directory given: pass --out DIR (a new directory)")
    out = io.check_out_dir(cfg.out, cfg.overwrite)
    if not cfg.model:
        raise LokuError("no model given: pass --model (a hub id, a local folder or smollm2-135m)")
    if cfg.adapter is not None:
        check_adapter(cfg.adapter)
    sources = task_sources(cfg.tasks, cfg.data_dir)   # the files checked, or the hub reached, before the model loads
    with tempfile.TemporaryDirectory(prefix="loku-wmdp-") as folder:
        local_tasks(sources, cfg.num_fewshot, Path(folder))
    model, tokenizer = load_for_eval(cfg.model, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    barrier()   # under accelerate launch: every process has checked --out before the main one creates it
    result = evaluate_wmdp(model, tokenizer, cfg, sources)
    if not is_main():   # every process ran the whole harness (a model in memory is one process to it)
        return result
    io.start_out_dir(out, cfg.overwrite)
    io.write_json(out / RESULTS, result)
    if log:
        for task, r in result["tasks"].items():
            log(f"{task}: acc {r['acc']:.4f} on {r['n']} questions")
    return result
