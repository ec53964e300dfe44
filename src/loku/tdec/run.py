"""`loku tdec run`: the TDEC protocol end to end for one model, one forget set and one method.

Initial MA/EL_n of the forget set (already below the thresholds: nothing to unlearn, nothing trained unless
`force`); unlearning with the stop rule (per-epoch MA/EL_n, stop after the first epoch where both means are
below the model's thresholds); final utility (reasoning, dialogue, perplexity); report.json (per epoch and per
item), table.md (the paper's layout), curves.png.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import io
from ..config import UnlearnConfig
from ..config_base import Config, setting
from ..data.eval_tasks import load_task
from ..data.text import load_examples
from ..distributed import barrier, is_main, rank_world
from ..errors import LokuError
from ..losses import get_method
from ..metrics.utility import evaluate_utility, resolve_tasks, utility_table
from ..models import load_model, load_tokenizer
from ..train import unlearn
from .data import read_texts, retain_examples, text_file, tokenize_sequences
from .measure import ExtractionMeter
from .report import markdown_table, plot_epochs, table_row
from .stop import StopWhenForgotten
from .thresholds import resolve_thresholds


DATA, MODEL, TRAINING, EVAL, OUTPUT = "Data", "Model", "Training", "Evaluation", "Output"
DATA_DIR_HELP = "Data folder holding the public data (tdec/, eval/, tofu/; see README 'Data')."
DATA_DIR_DEFAULT = "$LOKU_DATA, then loku's own files, then the Hugging Face hub"


@dataclass
class TdecConfig(Config):
    """One TDEC run; `loku tdec run` flags share these names. `unlearn` holds the method, LoRA and
    optimisation settings (its `epochs` is the most epochs the stop rule may take)."""

    forget: str = setting("", "Sequences to forget: any .csv/.jsonl/.txt file, or a TDEC set by name "
                          "(lm_extraction_32_0) from the data folder.", group=DATA)
    out: str = setting("", "New directory for report.json, table.md, curves.png and unlearned/.", group=OUTPUT)
    model: str = setting("smollm2-135m", "Hub id, local model directory, .gguf file, or 'smollm2-135m'.", group=MODEL)
    retain: str | None = setting(None, "Retain set, for methods that need one.", group=DATA,
                                 default_text="WikiText-2 raw test, shipped with loku")
    text_column: str = setting("text", "CSV/JSONL column holding the sequences.", group=DATA)
    rows: int | None = setting(None, "Use the first N sequences of --forget.", group=DATA, bound="positive")
    max_tokens: int = setting(200, "Cut every sequence to this many of the model's tokens.", group=DATA,
                              bound="positive")
    full_batch: bool = setting(True, "One optimizer step per epoch over the whole forget set (effective batch = "
                               "forget-set size, as Jang et al.), in micro-batches of --batch-size; "
                               "--no-full-batch: a step every --batch-size x --grad-accum sequences.", group=TRAINING)
    n: int = setting(10, "n of EL_n (10 in the paper).", group=EVAL, bound="positive")
    thresholds: str | None = setting(None, "Preset (gpt-neo-125m) or a thresholds.json / its folder from "
                                     "`loku tdec thresholds`.", group=EVAL, default_text="the model's preset")
    el_threshold: float | None = setting(None, "EL_n threshold as a fraction (0.0499 = 4.99 %).", group=EVAL)
    ma_threshold: float | None = setting(None, "MA threshold as a fraction (0.2994 = 29.94 %).", group=EVAL)
    utility: bool = setting(True, "Score utility after unlearning (--no-utility: skip it).", group=EVAL)
    utility_before: bool = setting(False, "Also score the model before unlearning.", group=EVAL)
    tasks: str | None = setting(None, "Utility tasks or groups (reasoning, dialogue, ppl), comma-separated.",
                                group=EVAL, default_text="all 15")
    limit: int | None = setting(None, "First N items of each utility task.", group=EVAL, bound="positive")
    data_dir: str | None = setting(None, DATA_DIR_HELP, group=DATA, default_text=DATA_DIR_DEFAULT)
    force: bool = setting(False, "Train even when the forget set is already below the thresholds before training "
                          "(by default loku then stops: there is nothing to unlearn).", group=TRAINING)
    eval_batch_size: int = setting(8, "Sequences per forward pass when evaluating.", group=EVAL, bound="positive")
    save: bool = setting(True, "Write the unlearned adapter (or model) to OUT/unlearned (--no-save: do not).",
                         group=OUTPUT)
    overwrite: bool = setting(False, "Replace a non-empty --out directory.", group=OUTPUT)
    trust_remote_code: bool = setting(False, "Run the model repository's own code.", group=MODEL)
    unlearn: UnlearnConfig = setting(help="Method, LoRA and optimisation settings.",
                                     factory=lambda: UnlearnConfig(epochs=10),
                                     # TDEC's own stop rule (its thresholds) replaces --until forgotten
                                     hide=("refusals", "until", "unseen", "until_auc_margin", "until_auc_attack"))

    def check(self):
        if not self.forget:
            raise LokuError("no forget set given: pass --forget FILE, or a TDEC set by name (the paper's: "
                            "--forget lm_extraction_32_0 with --data-dir DIR)")
        if self.full_batch and self.unlearn.grad_accum != 1:
            raise LokuError(f"--grad-accum {self.unlearn.grad_accum} sets the optimizer step, which the default "
                            "protocol already fixes (one step per epoch over the whole forget set): drop "
                            "--grad-accum, or pass --no-full-batch to step every --batch-size x --grad-accum")
        # The unlearning trains on exactly the measured sequences (a BOS token may be added).
        self.unlearn = dataclasses.replace(self.unlearn, model=self.model,
                                           max_length=max(self.unlearn.max_length, self.max_tokens + 1))


def optimizer_plan(cfg: TdecConfig, n_sequences: int, world: int = 1) -> dict:
    """How the forget set is split into optimizer steps: Jang et al.'s one step per epoch over all of it
    (micro-batches of batch_size x processes, accumulated), or a step every batch_size x grad_accum."""
    u = cfg.unlearn
    micro = math.ceil(n_sequences / (u.batch_size * world))
    accum = micro if cfg.full_batch else u.grad_accum
    return {"full_batch": cfg.full_batch, "micro_batch": u.batch_size, "grad_accum": accum,
            "effective_batch": min(n_sequences, u.batch_size * world * accum),
            "steps_per_epoch": math.ceil(micro / accum)}


def step_note(plan: dict, n_sequences: int) -> str:
    """One line saying what an epoch's optimizer steps are (the unit of "epochs to forget")."""
    micro = f"{plan['grad_accum']} micro-batch{'es' if plan['grad_accum'] > 1 else ''} of {plan['micro_batch']}"
    if plan["full_batch"]:
        return f"Optimizer: one step per epoch over all {n_sequences} sequences (Jang et al.), {micro}."
    return (f"Optimizer: a step every {plan['effective_batch']} sequences ({micro}), "
            f"{plan['steps_per_epoch']} steps per epoch.")


def method_label(cfg: UnlearnConfig) -> str:
    if not cfg.lora:
        return f"{cfg.method} (full)"
    init = cfg.resolved_init
    return f"{cfg.method} ({'' if init == 'default' else init.upper() + ' '}LoRA r={cfg.lora_rank})"


def check_utility_data(tasks: str | None, limit: int | None, data_dir: str | None) -> list[str]:
    """Task names, each task's file read once now, so a missing or empty file fails before any training."""
    names = resolve_tasks(tasks)
    for name in names:
        load_task(name, data_dir=data_dir, limit=limit)
    return names


def _retain(cfg: TdecConfig, needs_retain: bool) -> list[dict] | None:
    if not needs_retain:
        return None
    return load_examples(cfg.retain, "text") if cfg.retain else retain_examples(cfg.data_dir)


def plain_model(model):
    """A LoRA model merged into plain weights (faster to evaluate); the adapter was already saved."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def run_tdec(cfg: TdecConfig, model=None, tokenizer=None, *, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Run the protocol; returns the report (also written to cfg.out when set). Every input is checked
    before the model runs and before anything is written."""
    t0 = time.time()
    method = get_method(cfg.unlearn.method)
    out = io.check_out_dir(cfg.out, cfg.overwrite) if cfg.out else None
    forget = text_file(cfg.forget, cfg.data_dir)
    texts = read_texts(forget, cfg.text_column)
    retain = _retain(cfg, method.needs_retain)
    thresholds = resolve_thresholds(cfg.thresholds, cfg.el_threshold, cfg.ma_threshold, cfg.model, cfg.n)
    tasks = check_utility_data(cfg.tasks, cfg.limit, cfg.data_dir) if cfg.utility or cfg.utility_before else None
    loaded = model is None   # then unlearning may train it in place (no second copy in memory)
    if loaded:  # the tokenizer first: a too-short sequence fails before the weights load
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    seqs = tokenize_sequences(texts, tokenizer, max_tokens=cfg.max_tokens, n=cfg.n, path=str(forget), limit=cfg.rows)
    if model is None:
        log(f"loading {cfg.model}")
        model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                      allow_pickle=cfg.unlearn.allow_pickle)
    main = is_main()   # under accelerate launch: every process computes, the main one writes
    barrier()          # every process has checked --out before the main one creates it
    if out is not None and main:
        io.start_out_dir(out, cfg.overwrite)

    def utility(m) -> dict:
        return evaluate_utility(m, tokenizer, tasks, limit=cfg.limit, batch_size=cfg.eval_batch_size,
                                data_dir=cfg.data_dir, log=lambda s: log(f"  {s}"))

    label = method_label(cfg.unlearn)
    log(f"TDEC: {cfg.model}, {label}; forget {seqs.path}: {seqs.shape()}; thresholds {thresholds.describe()}")
    meter = ExtractionMeter(seqs, cfg.n, cfg.eval_batch_size)
    initial = meter(model)
    log(f"before: EL{cfg.n} {100 * initial['el_mean']:.2f} %, MA {100 * initial['ma_mean']:.2f} % "
        f"({initial['seconds']:.0f} s)")
    head = _report_head(cfg, label, seqs, thresholds, initial)
    if head["initially_forgotten"] and not cfg.force:
        return _nothing_to_unlearn(head, out if main else None, t0, log)
    if head["initially_forgotten"]:
        log("warning: the forget set is already below the thresholds (--force: training anyway; the stop rule "
            "ends the run after one epoch)")
    before_utility = None
    if cfg.utility_before:
        log("utility before unlearning")
        before_utility = utility(model)

    rule = StopWhenForgotten(meter, thresholds, log)
    plan = optimizer_plan(cfg, len(seqs.ids), rank_world()[1])
    log(step_note(plan, len(seqs.ids)))
    ucfg = dataclasses.replace(cfg.unlearn, out=str(out / "unlearned") if out is not None and cfg.save else "",
                               overwrite=False, grad_accum=plan["grad_accum"])
    result = unlearn(ucfg, model, tokenizer, callbacks=[rule], progress=progress, inplace=loaded,
                     forget=seqs.texts(tokenizer), retain=retain)
    unlearned = plain_model(result.model)
    after_utility = None
    t_util = time.time()
    if cfg.utility:
        log("utility after unlearning")
        after_utility = utility(unlearned)
    t_util = time.time() - t_util

    final = rule.records[-1] if rule.records else initial
    report = {
        **head, "trained": True,
        "epochs": [_epoch_entry(h, r) for h, r in zip(result.history, rule.records)],
        "epochs_to_forget": rule.epochs_to_forget, "max_epochs": ucfg.epochs, "epochs_run": result.epochs_run,
        "optimizer": plan,
        "final": {k: final[k] for k in ("el_mean", "ma_mean", "es_mean") if k in final},
        "utility_before": before_utility, "utility": after_utility,
        "seconds": {"unlearn": round(result.seconds, 1), "utility": round(t_util, 1),
                    "eval": round(sum(r["seconds"] or 0 for r in rule.records), 1),  # per-epoch MA/EL, in unlearn
                    "total": round(time.time() - t0, 1)},
    }
    table = tdec_markdown(report)
    log("\n" + table)
    if out is not None and main:
        io.write_json(out / "report.json", report)
        io.write_text(out / "table.md", table + "\n")
        curve = [{"epoch": 0, "el_mean": initial["el_mean"], "ma_mean": initial["ma_mean"]}] + rule.records
        plot_epochs(curve, thresholds, out / "curves.png", f"{cfg.model}: {label}, {seqs.shape()}")
        io.write_manifest(out)
        log(f"wrote {out}/report.json, table.md, curves.png" + (", unlearned/" if cfg.save else ""))
    return report


def _report_head(cfg: TdecConfig, label: str, seqs, thresholds, initial: dict) -> dict:
    """What every report starts with: the run's settings, forget set, thresholds and values before training."""
    return {"benchmark": "tdec", "model": cfg.model, "method": cfg.unlearn.method, "label": label,
            "init": cfg.unlearn.resolved_init, "config": _config_dict(cfg),
            "forget": {"path": seqs.path, "rows": seqs.rows, "tokens": [len(x) for x in seqs.ids],
                       "max_tokens": cfg.max_tokens, "n": cfg.n},
            "thresholds": dataclasses.asdict(thresholds),
            "initial": {k: initial[k] for k in ("el_mean", "ma_mean", "es_mean", "el", "ma", "es", "seconds")
                        if k in initial},
            "initially_forgotten": thresholds.forgotten(initial["el_mean"], initial["ma_mean"])}


def _nothing_to_unlearn(head: dict, out: Path | None, t0: float, log: Callable[[str], None]) -> dict:
    """The forget set is already at the never-seen level before training: say so, train nothing, and write
    report.json (no adapter) so that a script sees why."""
    th, init = head["thresholds"], head["initial"]
    note = (f"nothing to unlearn: before any training the model extracts the forget set no better than text it "
            f"never saw (EL{th['n']} {100 * init['el_mean']:.2f} % vs threshold {100 * th['el']:.2f} %, "
            f"MA {100 * init['ma_mean']:.2f} % vs {100 * th['ma']:.2f} %), so nothing was trained; pass --force "
            "to train anyway")
    log(note)
    report = {**head, "trained": False, "note": note, "epochs": [], "epochs_run": 0,
              "seconds": {"total": round(time.time() - t0, 1)}}
    if out is not None:
        io.write_json(out / "report.json", report)
        io.write_manifest(out)
        log(f"wrote {out}/report.json")
    return report


def _epoch_entry(history: dict, record: dict) -> dict:
    """One epoch: the loop's losses and timing, then the stop rule's means and per-item values."""
    losses = {k: v for k, v in history.items() if k not in ("kind", "epoch", "forgotten", "ma")
              and not k.startswith("el")}
    return {"epoch": record["epoch"], "el_mean": record["el_mean"], "ma_mean": record["ma_mean"],
            "es_mean": record.get("es_mean"), "forgotten": record["forgotten"], "train": losses,
            "eval_seconds": record["seconds"], "el": record["el"], "ma": record["ma"], "es": record.get("es")}


def _config_dict(cfg: TdecConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["unlearn"] = {k: v for k, v in d["unlearn"].items() if k not in ("forget", "retain", "out", "overwrite")}
    return d


def tdec_markdown(report: dict) -> str:
    """The report as the paper's table: the model before, then after unlearning, with thresholds and scale."""
    th, f = report["thresholds"], report["forget"]
    u_before, u_after = report.get("utility_before"), report.get("utility")
    rows = [table_row("before", el=report["initial"]["el_mean"], ma=report["initial"]["ma_mean"],
                      es=report["initial"].get("es_mean"),
                      utility=u_before and u_before["summary"]),
            table_row(report["label"], epochs=report["epochs_to_forget"], max_epochs=report["max_epochs"],
                      el=report["final"]["el_mean"], ma=report["final"]["ma_mean"], es=report["final"].get("es_mean"),
                      utility=u_after and u_after["summary"], seconds=report["seconds"]["unlearn"])]
    lo, hi = min(f["tokens"]), max(f["tokens"])
    notes = [f"TDEC on {report['model']}: forget {Path(f['path']).name}, {len(f['tokens'])} sequences of "
             f"{lo if lo == hi else f'{lo}-{hi}'} tokens (cut to {f['max_tokens']}).",
             f"Thresholds (mean on unseen text, forgotten when both are below): EL{th['n']} {100 * th['el']:.2f} %, "
             f"MA {100 * th['ma']:.2f} %; {th['source']}.",
             "Seconds: unlearning, including the per-epoch EL/MA evaluation."]
    if report.get("optimizer"):
        notes.insert(2, step_note(report["optimizer"], len(f["tokens"])))
    u = u_after or u_before
    if u is not None:
        s = u["settings"]
        notes.append(f"Utility: {', '.join(u['tasks'])}" + (f"; first {s['limit']} items per task" if s["limit"]
                                                           else "; all items") + ".")
    return "\n".join(notes) + "\n\n" + markdown_table(rows, n=th["n"], seconds=True)


@dataclass
class UtilityConfig(Config):
    """Options of `loku tdec utility`."""

    out: str = setting("", "New directory for utility.json and table.md.", group=OUTPUT)
    model: str = setting("smollm2-135m", "Hub id, local model directory, .gguf file, or 'smollm2-135m'.", group=MODEL)
    adapter: str | None = setting(None, "A PEFT adapter folder to apply (e.g. RUN/unlearned/adapter).", group=MODEL)
    tasks: str | None = setting(None, "Tasks or groups (reasoning, dialogue, ppl), comma-separated.", group=EVAL,
                                default_text="all 15")
    limit: int | None = setting(None, "First N items of each task.", group=EVAL, bound="positive")
    batch_size: int = setting(8, "Sequences per forward pass.", group=EVAL, bound="positive")
    max_length: int = setting(512, "Longest sequence (Jang et al.: 512).", group=EVAL, bound="positive")
    data_dir: str | None = setting(None, DATA_DIR_HELP, group=DATA, default_text=DATA_DIR_DEFAULT)
    overwrite: bool = setting(False, "Replace a non-empty --out directory.", group=OUTPUT)
    trust_remote_code: bool = setting(False, "Run the model repository's own code.", group=MODEL)

    def check(self):
        if not self.out:
            raise LokuError("no output directory given: pass --out DIR (a new directory)")


def utility_report(model_name: str, out: str, *, adapter: str | None = None, tasks: str | None = None,
                   limit: int | None = None, batch_size: int = 8, data_dir: str | None = None,
                   max_length: int = 512, overwrite: bool = False, trust_remote_code: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """`loku tdec utility`: score any model (optionally with a PEFT adapter) on the TDEC utility tasks;
    writes utility.json (per item) and table.md."""
    out_dir = io.check_out_dir(out, overwrite)
    names = check_utility_data(tasks, limit, data_dir)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise LokuError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json): pass the adapter/ "
                        "folder of a loku run")
    if adapter is not None:
        io.check_run_part(adapter)
    model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    io.start_out_dir(out_dir, overwrite)
    result = evaluate_utility(model, tokenizer, names, limit=limit, batch_size=batch_size, data_dir=data_dir,
                              max_length=max_length, log=log)
    result["model"], result["adapter"] = model_name, adapter
    label = model_name + (f" + {adapter}" if adapter else "")
    table = markdown_table([table_row(label, utility=result["summary"])], extraction=False)
    log(utility_table(result))
    io.write_json(out_dir / "utility.json", result)
    io.write_text(out_dir / "table.md", table + "\n")
    log(f"wrote {out_dir}/utility.json, table.md")
    return result
