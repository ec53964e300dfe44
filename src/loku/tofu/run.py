"""TOFU unlearning runs: unlearn a forget split from the target model with one or more methods, scoring
every epoch with TOFU's Forget Quality (against the retain model) and Model Utility.

    results = run_tofu(TofuUnlearnConfig(target="runs/tofu-models/target", out="runs/tofu-unlearn",
                                         methods=["ga", "gd", "npo", "idk", "ihl"]))

The retain model is evaluated once and its log cached in `out/retain_eval/` (or taken from `retain_log`);
the target is evaluated once as epoch 0 (`out/target_eval/`). Each method runs with `loku.train.unlearn`
into `out/runs/<label>/` (adapter, metrics.jsonl, and TOFU's official logs per epoch under `tofu/`),
and the report (`results.json`, `report.md`, `fq_mu.png`) is rewritten after every method. With
`resume`, finished evaluations and methods are kept and the rest run.

A method is `name` or `name+init` (`ihl+fila`, `ihl+default`): the init overrides `train.init` for it;
`name+full` (`ga+full`, `npo+full`) trains that method with full fine-tuning instead of LoRA.
The prompt format (`prompt_format`: as fine-tuned, else TOFU's phi format) serves training and every
evaluation, replacing `train.prompt_format`; it is recorded in results.json, each tofu.json and every log.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import io
from ..config import UnlearnConfig
from ..config_base import Config, setting
from ..data.qa import PROMPT_FORMAT_HELP, PROMPT_FORMATS, resolve_format
from ..data.tofu import QA_PER_AUTHOR, load_split
from ..distributed import barrier, is_main
from ..errors import LokuError
from ..inits import INITS
from ..losses import get_method
from ..models import load_model, resolve_model_path
from ..train import unlearn
from .evaluate import TOFU_DS_SIZE, evaluate_tofu, load_sets
from .finetune import (check_qa_per_author, check_qa_rows, check_split, per_author, read_summary, retain_split,
                       tofu_format)
from .logs import AGGREGATED, FORGET, RETAIN, log_format, read_logs
from .report import headline, write_report
from .summary import aggregate

CONFIG = "config.json"
# TOFU's unlearning recipe (5 epochs, effective batch 32, weight decay 0.01) with a LoRA learning rate.
TRAIN_DEFAULTS = dict(epochs=5, lr=1e-4, batch_size=8, grad_accum=4, weight_decay=0.01, max_length=500)


FULL = "full"   # NAME+full: full fine-tuning for that method


@dataclass(frozen=True)
class MethodSpec:
    label: str          # as given: "ihl", "ihl+fila", "ga+full"
    method: str
    init: str | None    # None: the run's init
    lora: bool = True   # False: NAME+full, every weight trains

    def train_config(self, train: UnlearnConfig, **changes) -> UnlearnConfig:
        """`train` (the run's shared settings) for this method: its name, and its init or full fine-tuning."""
        if not self.lora:   # the run's LoRA init does not apply to full fine-tuning
            return dataclasses.replace(train, method=self.method, lora=False, init="auto", **changes)
        return dataclasses.replace(train, method=self.method, init=self.init or train.init, **changes)


def parse_method(spec: str) -> MethodSpec:
    name, _, init = spec.strip().partition("+")
    get_method(name)  # unknown names fail with "did you mean"
    if init == FULL:
        return MethodSpec(spec.strip(), name, None, lora=False)
    if init and init != "auto" and init not in INITS:
        raise LokuError(f"unknown init {init!r} in method {spec!r}: write NAME+INIT with INIT one of auto, "
                        f"{', '.join(INITS.names())}, or NAME+full for full fine-tuning")
    return MethodSpec(spec.strip(), name, init or None)


@dataclass
class TofuUnlearnConfig(Config):
    """Options of `loku tofu unlearn`; `train` holds the unlearning settings every method shares."""

    target: str = setting("", "Target model folder (loku tofu finetune's OUT/target) or a hub id.", group="Model")
    out: str = setting("", "New folder for the runs and the report.", group="Output")
    methods: list[str] = setting(help="Methods, comma-separated; NAME+INIT picks an init for one of them, NAME+full "
                                 "full fine-tuning, e.g. ga,gd,npo,idk,ihl,ihl+fila,ga+full (see `loku list "
                                 "methods`).", group="Method settings",
                                 factory=lambda: ["ihl"], aliases=("--method",))
    split: str = setting("forget10", "Forget split: forget01, forget05 or forget10.", group="Data")
    data_dir: str | None = setting(None, "Data folder whose tofu/ holds TOFU's JSON files (see README 'Data').", group="Data",
                                   default_text="as fine-tuned, else $LOKU_DATA, else the hub dataset locuslab/TOFU")
    authors: int | None = setting(None, "K-author TOFU.", group="Data", default_text="as fine-tuned, else all 200")
    qa_per_author: int | None = setting(None, "First Q QA pairs per author.", group="Data",
                                        default_text="as fine-tuned, else 20")
    prompt_format: str | None = setting(None, PROMPT_FORMAT_HELP, group="Data", choices=PROMPT_FORMATS,
                                        kind="prompt format",
                                        default_text="as fine-tuned (tofu_finetune.json beside --target), else "
                                                     "tofu-phi")
    retain_model: str | None = setting(None, "Retain model folder.", group="Evaluation",
                                       default_text="retain/ beside --target")
    retain_log: str | None = setting(None, "The retain model's eval_log_aggregated.json, instead of evaluating it.",
                                     group="Evaluation")
    limit: int | None = setting(TOFU_DS_SIZE, "First N items of each evaluation set (TOFU's ds_size); 0 = all.",
                                group="Evaluation", bound="non-negative")
    max_new_tokens: int | None = setting(None, "Cap on generated tokens per answer.", group="Evaluation",
                                         bound="positive", default_text="TOFU's 200 tokens of prompt + answer")
    eval_batch_size: int = setting(8, "Sequences per forward pass / generation batch.", group="Evaluation",
                                   bound="positive")
    eval_target: bool = setting(True, "Evaluate the target as epoch 0 of every line.", group="Evaluation")
    resume: bool = setting(False, "Continue a TOFU run in --out: keep what finished.", group="Output")
    overwrite: bool = setting(False, "Replace a non-empty --out folder.", group="Output")
    trust_remote_code: bool = setting(False, "Run the model repository's own code.", group="Model")
    train: UnlearnConfig = setting(help="The unlearning settings every method shares.",
                                   factory=lambda: UnlearnConfig(**TRAIN_DEFAULTS),
                                   hide=("model", "forget", "retain", "method", "text_column"))

    def __post_init__(self):
        self.methods = method_list(self.methods)
        super().__post_init__()

    def check(self):
        check_methods(self.methods, "--method NAME or --methods ga,gd,ihl")
        check_split(self.split)
        if self.qa_per_author is not None:
            check_qa_per_author(self.qa_per_author)
        if self.limit == 0:   # 0 = every item
            self.limit = None
        if self.resume and self.overwrite:
            raise LokuError("--resume keeps a run and --overwrite deletes it: pass one of them")

    @property
    def specs(self) -> list[MethodSpec]:
        return [parse_method(m) for m in self.methods]


@dataclass
class TofuInputs:
    """Everything a run reads, checked before anything is written."""

    sets: dict[str, list[dict]]       # evaluation sets keyed by log file name
    forget: list[dict]                # training rows (question, answer)
    retain: list[dict]
    refusals: list[str]               # TOFU's idontknow answers for idk
    data_dir: str | None
    authors: int | None
    qa_per_author: int
    retain_model: str | None
    retain_logs: dict | None          # given with retain_log
    prompt_format: str                # for training and every evaluation


def _is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or p.is_absolute() or path.startswith((".", "~")) or \
        (str(p.parent) != "." and p.parent.exists())


def check_model(path: str, role: str) -> None:
    """A local model folder must exist and hold a model; anything else is left to the hub."""
    if not _is_local(path):
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise LokuError(f"{role} model folder {p} does not exist: run `loku tofu finetune --out DIR` and pass "
                        f"DIR/{role}")
    resolve_model_path(str(p))  # config.json and weights, or a clear error


def _scale(cfg: TofuUnlearnConfig) -> tuple[str | None, int | None, int, str]:
    """(data_dir, authors, qa_per_author, note): the fine-tuning run's scale where not given, and an error if
    a given one contradicts it (a 20-author target knows nothing of the other 180 authors)."""
    data, authors, q = cfg.data_dir, cfg.authors, cfg.qa_per_author
    summary = read_summary(cfg.target) if _is_local(cfg.target) else None
    if summary is None:
        return data, authors, q or QA_PER_AUTHOR, ""
    ft = summary.get("config", {})
    where = Path(cfg.target).expanduser().parent / "tofu_finetune.json"
    given = {"--authors": (authors, ft.get("authors")), "--qa-per-author": (q, ft.get("qa_per_author", QA_PER_AUTHOR))}
    for flag, (mine, theirs) in given.items():
        if mine is not None and mine != theirs:
            raise LokuError(f"{flag} {mine} differs from the fine-tuning run ({where}: {theirs}): drop {flag} "
                            "or fine-tune at this scale")
    scaled = ft.get("authors") is not None
    default_retain = cfg.retain_model is None and cfg.retain_log is None
    if cfg.split != ft.get("split") and (scaled or default_retain):
        raise LokuError(f"--split {cfg.split} differs from the fine-tuning run ({where}: {ft.get('split')}, its "
                        f"retain model never saw {ft.get('split')}'s authors): pass --split {ft.get('split')}")
    note = []
    if data is None and ft.get("data_dir") is not None:
        data = ft["data_dir"]
        note.append(f"--data-dir {data}")
    if authors is None and ft.get("authors") is not None:
        authors = ft["authors"]
        note.append(f"--authors {authors}")
    if q is None:
        q = ft.get("qa_per_author", QA_PER_AUTHOR)
        if q != QA_PER_AUTHOR:
            note.append(f"--qa-per-author {q}")
    return data, authors, q, (f"as fine-tuned ({where}): " + " ".join(note)) if note else ""


def _eval_sets(cfg: TofuUnlearnConfig, data, authors, q) -> dict[str, list[dict]]:
    sets = load_sets(data, forget=cfg.split, limit=None, authors=authors)
    for name in (RETAIN, FORGET):  # the author-major sets; real authors and world facts are not
        sets[name] = per_author(sets[name], q)
    return {k: rows[:cfg.limit] if cfg.limit else rows for k, rows in sets.items()}


def _qa(rows: list[dict]) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def prepare(cfg: TofuUnlearnConfig, log: Callable[[str], None] | None = None) -> TofuInputs:
    """Check every input (methods, split, output folder, models, data) without writing anything."""
    for spec in cfg.specs:   # each method's training settings (e.g. ihl+fila under --full is refused)
        spec.train_config(cfg.train)
    out = run_out_dir(cfg, "TOFU")
    if not cfg.target:
        raise LokuError("no target model given: pass --target DIR (loku tofu finetune's OUT/target)")
    check_model(cfg.target, "target")
    retain_model, retain_logs = None, None
    if cfg.retain_log:
        retain_logs = read_logs(cfg.retain_log)
        if FORGET not in retain_logs:
            raise LokuError(f"retain log {cfg.retain_log} has no {FORGET}: pass the retain model's "
                            "eval_log_aggregated.json")
    else:
        retain_model = cfg.retain_model
        if retain_model is None:
            if not _is_local(cfg.target):
                raise LokuError("a hub target has no retain model beside it: pass --retain-model or --retain-log")
            retain_model = str(Path(cfg.target).expanduser().parent / "retain")
        check_model(retain_model, "retain")
    data, authors, q, note = _scale(cfg)
    if note and log:
        log(note)
    prompt_format = _prompt_format(cfg, retain_logs, log)
    sets = _eval_sets(cfg, data, authors, q)
    for name, rows in sets.items():
        if not rows:
            raise LokuError(f"TOFU set {name} has no items: check the data folder, --authors and --limit")
    if retain_logs is not None and len(retain_logs[FORGET].get("avg_gt_loss", {})) != len(sets[FORGET]):
        raise LokuError(f"retain log {cfg.retain_log} covers {len(retain_logs[FORGET].get('avg_gt_loss', {}))} "
                        f"forget items but this run evaluates {len(sets[FORGET])}: evaluate the retain model "
                        "with the same --split, --authors and --limit (or drop --retain-log)")
    forget = per_author(load_split(cfg.split, data, authors=authors), q)
    retain = per_author(load_split(retain_split(cfg.split), data, authors=authors), q)
    check_qa_rows(cfg.split, forget)
    check_qa_rows(retain_split(cfg.split), retain)
    refusals = load_split("idontknow", data)   # the data folder's, else the copy shipped with loku
    return TofuInputs(sets, _qa(forget), _qa(retain), refusals, data, authors, q, retain_model, retain_logs,
                      prompt_format)


def _prompt_format(cfg: TofuUnlearnConfig, retain_logs: dict | None, log) -> str:
    """The run's prompt format, made concrete (`auto` becomes chat or plain for the target's tokenizer); a
    --retain-log recorded in another format is refused here, before anything is written."""
    fmt, source = tofu_format(cfg.prompt_format, cfg.target)
    if fmt == "auto":
        from ..models import load_tokenizer

        fmt = resolve_format(load_tokenizer(cfg.target, trust_remote_code=cfg.trust_remote_code), fmt)
    if log:
        log(f"prompt format {fmt} ({source})")
    recorded = log_format(retain_logs, "retain log") if retain_logs is not None else None
    if recorded is not None and recorded != fmt:
        raise LokuError(f"retain log {cfg.retain_log} was made with prompt format {recorded}, this run uses {fmt}: "
                        f"evaluate the retain model with --prompt-format {fmt} (or drop --retain-log)")
    return fmt


def method_list(methods: str | list[str]) -> list[str]:
    """The Python API takes "ga,gd" as the flag does."""
    return [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else methods


def check_methods(methods: list[str], example: str) -> None:
    """At least one method, each listed once (`example`: the flag to show when none is given)."""
    if not methods:
        raise LokuError(f"no method given: pass {example}")
    labels = [parse_method(m).label for m in methods]
    dup = sorted({m for m in labels if labels.count(m) > 1})
    if dup:
        raise LokuError(f"method {dup[0]!r} is listed twice: list each method once")


def run_out_dir(cfg, kind: str) -> Path:
    """A TOFU or MUSE run's folder: new (or --overwrite), or with --resume one that holds a `kind` run."""
    if not cfg.out:
        raise LokuError("no output directory given: pass --out DIR (a new directory)")
    out = Path(cfg.out)
    if cfg.resume:
        if not (out / CONFIG).is_file():
            raise LokuError(f"{out} holds no {kind} run to resume (no {CONFIG}): drop --resume or check the path")
    else:
        io.check_out_dir(out, cfg.overwrite)
    return out


def resumable_config(cfg) -> dict:
    """A TOFU or MUSE run's config as saved in its folder, less what may change between a run and its
    resumption."""
    d = dataclasses.asdict(cfg)
    for k in ("resume", "overwrite", "methods"):
        d.pop(k)
    return json.loads(json.dumps(d, default=str))


def check_same_run(cfg, saved: Path) -> None:
    """--resume continues only the run that `saved` (its config.json) describes; else name the first setting
    that differs (the nested one, train.lr, not all of train)."""
    was_all, now_all = json.loads(saved.read_text(encoding="utf-8")), resumable_config(cfg)
    for key in sorted(set(was_all) | set(now_all)):
        was, now = was_all.get(key), now_all.get(key)
        if was != now:
            if isinstance(was, dict) and isinstance(now, dict):
                sub = next(k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
                key, was, now = f"{key}.{sub}", was.get(sub), now.get(sub)
            raise LokuError(f"--resume: {key} was {was!r} in {saved}, now {now!r}: "
                            "resume with the same options, or start a new --out")


def evaluate_model(path: str, sets: dict, eval_dir: Path, cfg: TofuUnlearnConfig, prompt_format: str,
                   log: Callable[[str], None] | None = None) -> dict:
    """A model's TOFU logs, from `eval_dir` when an earlier evaluation finished there (its aggregated
    log is written last), else evaluated now and written there."""
    if (eval_dir / AGGREGATED).is_file():
        return read_logs(eval_dir)
    model, tokenizer = load_model(path, trust_remote_code=cfg.trust_remote_code)
    return evaluate_tofu(model, tokenizer, sets, eval_dir, limit=None, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.eval_batch_size, log=_prefixed(log, f"  {eval_dir.name}: "),
                         prompt_format=prompt_format)


def _eval_note(what: str, path: str, eval_dir: Path) -> str:
    if (eval_dir / AGGREGATED).is_file():
        return f"{what} {path}: evaluated earlier ({eval_dir})"
    return f"evaluating the {what} {path} (once; logs in {eval_dir})"


def _prefixed(log, prefix: str):
    return (lambda msg: log(prefix + msg)) if log else None


def run_method(spec: MethodSpec, cfg: TofuUnlearnConfig, inputs: TofuInputs, retain_logs: dict, run_dir: Path,
               progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Unlearn with one method from the target, evaluating every epoch; returns (and writes to
    `run_dir/tofu.json`) its epochs' Forget Quality, Model Utility, losses and seconds. A run that
    finished earlier is read back."""
    done = run_dir / "tofu.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    train = spec.train_config(cfg.train, model=cfg.target, out=str(run_dir), overwrite=True,
                              trust_remote_code=cfg.trust_remote_code, prompt_format=inputs.prompt_format)
    model, tokenizer = load_model(cfg.target, trust_remote_code=cfg.trust_remote_code,
                                  allow_pickle=cfg.train.allow_pickle)
    epochs: list[dict] = []
    eval_seconds = 0.0

    def evaluate(epoch: int, m) -> dict:
        nonlocal eval_seconds
        t0 = time.time()
        logs = evaluate_tofu(m, tokenizer, inputs.sets, run_dir / "tofu" / f"epoch-{epoch}", limit=None,
                             max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                             prompt_format=inputs.prompt_format)
        summary = aggregate(logs, retain_logs)
        eval_seconds += time.time() - t0
        epochs.append({"epoch": epoch, **headline(summary), "eval_seconds": round(time.time() - t0, 1),
                       "summary": summary})
        if log:
            log(f"  {spec.label} epoch {epoch}: Forget Quality {summary['Forget Quality']:.3g}, "
                f"Model Utility {summary['Model Utility']:.4f}, ES Forget {summary['ES Forget']:.4f}, "
                f"EM Forget {summary['EM Forget']:.4f} ({time.time() - t0:.0f} s to evaluate)")
        return {"forget_quality": summary["Forget Quality"], "model_utility": summary["Model Utility"],
                "forget_es": summary["ES Forget"], "forget_em": summary["EM Forget"]}

    result = unlearn(train, model, tokenizer, callbacks=[evaluate], progress=progress, inplace=True,
                     forget=inputs.forget, retain=inputs.retain, refusals=inputs.refusals)
    for e, h in zip(epochs, result.history):
        e.update({k: h[k] for k in ("loss", "forget", "retain") if k in h})
        e["train_seconds"] = h.get("seconds")
    record = {"method": spec.method, "init": train.resolved_init, "lora_rank": train.lora_rank if train.lora else None,
              "prompt_format": inputs.prompt_format, "seconds": round(result.seconds - eval_seconds, 1),
              "eval_seconds": round(eval_seconds, 1), "epochs": epochs}
    if is_main():
        io.write_json(done, record)
    return record


def run_tofu(cfg: TofuUnlearnConfig, progress: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Every method of `cfg` on TOFU, each epoch scored; writes results.json, report.md and fq_mu.png to
    `cfg.out` and returns the results (see loku.tofu.report)."""
    main = is_main()   # under accelerate launch every process computes, the main one reports and writes
    log = log if main else None
    inputs = prepare(cfg, log)
    out = Path(cfg.out)
    barrier()          # every process has checked --out before the main one creates it
    if cfg.resume:
        check_same_run(cfg, out / CONFIG)
    elif main:
        io.start_out_dir(out, cfg.overwrite)
        io.write_json(out / CONFIG, resumable_config(cfg))
    if inputs.retain_logs is not None:
        retain_logs = inputs.retain_logs
    else:
        if log:
            log(_eval_note("retain model", inputs.retain_model, out / "retain_eval"))
        retain_logs = evaluate_model(inputs.retain_model, inputs.sets, out / "retain_eval", cfg, inputs.prompt_format,
                                     log)
    results = {
        "title": f"TOFU {cfg.split}" + (f", {inputs.authors} authors" if inputs.authors else "")
                 + (f" x {inputs.qa_per_author} QA" if inputs.qa_per_author != QA_PER_AUTHOR else "")
                 + f": {cfg.target} (prompt format {inputs.prompt_format})",
        "split": cfg.split, "authors": inputs.authors, "qa_per_author": inputs.qa_per_author,
        "eval_items": {k: len(v) for k, v in inputs.sets.items()}, "train_rows": {"forget": len(inputs.forget),
                                                                                   "retain": len(inputs.retain)},
        "limit": cfg.limit, "max_new_tokens": cfg.max_new_tokens, "target_model": cfg.target,
        "prompt_format": inputs.prompt_format, "retain_model": inputs.retain_model or cfg.retain_log,
        "train": dataclasses.asdict(dataclasses.replace(cfg.train, prompt_format=inputs.prompt_format)),
        "retain": aggregate(retain_logs, retain_logs), "target": None, "methods": {},
    }
    if cfg.eval_target:
        if log:
            log(_eval_note("target model (epoch 0)", cfg.target, out / "target_eval"))
        target_logs = evaluate_model(cfg.target, inputs.sets, out / "target_eval", cfg, inputs.prompt_format, log)
        results["target"] = aggregate(target_logs, retain_logs)
    for spec in cfg.specs:
        run_dir = out / "runs" / spec.label
        if log:
            log(f"unlearning with {spec.label}" + (" (done earlier)" if (run_dir / "tofu.json").is_file() else ""))
        results["methods"][spec.label] = run_method(spec, cfg, inputs, retain_logs, run_dir, progress and main, log)
        if main:
            write_report(results, out)
    return results
