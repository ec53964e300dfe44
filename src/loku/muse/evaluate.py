"""Score a model on MUSE (VerbMem, KnowMem forget/retain, PrivLeak) and write muse_bench-style logs.

    scoring = MuseScoring(corpus="news", data_dir="DATA")   # DATA/muse/news/ is muse_bench's data/news/
    result = evaluate_muse(model, tokenizer, load_data(scoring), scoring, out="runs/muse-target")

`out` receives one `<metric>.json` per metric ({"value", ..., "items": [...]}, as muse_bench's temp_dir
agg/log) as each finishes, and `muse.json` (the summary) last; a killed evaluation resumes from the
finished metrics.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import io
from ..config_base import Config, setting
from ..distributed import barrier, is_main
from ..errors import LokuError
from .conventions import get_convention
from .data import METRIC_FILES, METRICS, MuseData, check_corpus, check_metrics, load_muse
from .memorization import knowmem, verbmem
from .privleak import privleak, privleak_eval

SUMMARY = "muse.json"
LABELS = {"verbmem_f": "VerbMem forget", "knowmem_f": "KnowMem forget", "knowmem_r": "KnowMem retain",
          "privleak": "PrivLeak"}


def _help(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass
class MuseScoring(Config):
    """What MUSE measures and how; shared by `loku muse eval` and `loku muse unlearn`."""

    corpus: str = field(default="news", metadata=_help("MUSE corpus: news or books."))
    data_dir: str | None = setting(None, "Data folder whose muse/ is muse_bench's data/ (news/, books/; see README "
                                   "'Data').", default_text="$LOKU_DATA, then the hub dataset muse-bench/MUSE-News "
                                                            "or MUSE-Books")
    metrics: list[str] = field(default_factory=lambda: list(METRICS), metadata=_help(
        "Comma-separated subset of verbmem_f, knowmem_f, knowmem_r, privleak."))
    convention: str = field(default="muse_bench", metadata=_help(
        "muse_bench (the MUSE paper's tables) or open-unlearning (OpenUnlearning's MUSE tables): stemmer, "
        "Min-K rounding, AUC_retrain default; see the README."))
    limit: int | None = field(default=None, metadata=_help("First N items of each evaluation set (0 or None: all)."))
    batch_size: int = field(default=8, metadata=_help("Prompts or texts per forward pass / generation batch."))
    verbmem_max_new_tokens: int = field(default=128, metadata=_help("Greedy tokens per VerbMem continuation."))
    knowmem_max_new_tokens: int = field(default=32, metadata=_help("Greedy tokens per KnowMem answer."))
    min_k: float = field(default=0.4, metadata=_help("k of PrivLeak's Min-K% Prob (MUSE: 0.4)."))
    auc_retrain: float | None = field(default=None, metadata=_help(
        "The retrained model's AUC for PrivLeak (default: the convention's; `loku muse aggregate` takes it "
        "from the retrained model's evaluation)."))

    RENAMED = {"data": "write data_dir: a data folder whose muse/ is muse_bench's data/ (README 'Data')"}

    def __post_init__(self):
        if isinstance(self.metrics, str):   # the Python API takes "verbmem_f,privleak" as the flag does
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if self.limit == 0:   # 0 = every item
            self.limit = None
        super().__post_init__()

    def check(self):
        check_corpus(self.corpus)
        self.metrics = check_metrics(self.metrics)
        get_convention(self.convention)
        for name in ("batch_size", "verbmem_max_new_tokens", "knowmem_max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LokuError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}: pass "
                                f"--{name.replace('_', '-')} 1 or more")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise LokuError(f"--limit must be a positive number of items, got {self.limit!r}: pass 1 or more "
                            "(0 on the command line for all)")
        if not 0 < self.min_k <= 1:
            raise LokuError(f"--min-k must be in (0, 1], got {self.min_k!r}: pass e.g. --min-k 0.4 (MUSE's)")
        if self.auc_retrain is not None and not 0 < self.auc_retrain <= 1:
            raise LokuError(f"--auc-retrain must be in (0, 1], got {self.auc_retrain!r}: pass the retrained "
                            "model's AUC (about 0.5)")

    def auc_reference(self) -> tuple[float | None, str]:
        """AUC_retrain for PrivLeak without a retrained model's evaluation, and where it comes from."""
        if self.auc_retrain is not None:
            return self.auc_retrain, "--auc-retrain"
        return get_convention(self.convention).auc_retrain(self.corpus, self.min_k)

    def identity(self) -> dict:
        """What must match between two evaluations whose numbers are compared (PrivLeak's two AUCs)."""
        return {k: v for k, v in asdict(self).items() if k not in ("data_dir", "batch_size", "metrics", "auc_retrain")}


def load_data(scoring: MuseScoring, raw: tuple[str, ...] = ()) -> MuseData:
    return load_muse(scoring.data_dir, scoring.corpus, scoring.metrics, raw=raw, limit=scoring.limit)


def _bar(enabled: bool, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not enabled, transient=True)
    return bar, bar.add_task("MUSE", total=total)


def score_metric(metric: str, model, tokenizer, data: MuseData, scoring: MuseScoring, advance=None) -> dict:
    conv = get_convention(scoring.convention)
    common = dict(batch_size=scoring.batch_size, progress=advance)
    if metric == "verbmem_f":
        return verbmem(model, tokenizer, data["verbmem/forget"], conv, scoring.verbmem_max_new_tokens, **common)
    if metric in ("knowmem_f", "knowmem_r"):
        split = "forget" if metric == "knowmem_f" else "retain"
        return knowmem(model, tokenizer, data[f"knowmem/{split}_qa"], data[f"knowmem/{split}_qa_icl"], conv,
                       scoring.knowmem_max_new_tokens, **common)
    result = privleak_eval(model, tokenizer, data["privleak/forget"], data["privleak/holdout"], conv,
                           scoring.min_k, **common)
    ref, where = scoring.auc_reference()
    result["value"] = None if ref is None else privleak(result["auc"], ref, conv.eps)
    return {**result, "auc_retrain": ref, "auc_retrain_from": where}


def _n_items(metric: str, data: MuseData) -> int:
    """Items a metric scores: its files' rows, not counting the few-shot examples."""
    return sum(len(data.files.get(f"{part}/{split}", [])) for part, split in METRIC_FILES[metric]
               if not split.endswith("_icl"))


def evaluate_muse(model, tokenizer, data: MuseData, scoring: MuseScoring, out: str | Path | None = None,
                  log: Callable[[str], None] | None = None, progress: bool = True, label: str = "",
                  write: bool = True, meta: dict | None = None) -> dict:
    """Every metric of `scoring` on `model`; per-metric logs and the summary go to `out` when given (a
    metric whose log is already there is read back, so a killed evaluation resumes). Under several
    processes every process scores everything (FSDP needs every forward pass collective); only the one
    with `write` writes."""
    from ..metrics.utility import eval_mode

    out = Path(out) if out is not None else None
    logs, seconds = {}, {}
    bar, task = _bar(progress, sum(_n_items(m, data) for m in scoring.metrics))
    with bar, eval_mode(model):
        for metric in scoring.metrics:
            path = out / f"{metric}.json" if out is not None else None
            if path is not None and path.is_file():
                logs[metric] = json.loads(path.read_text(encoding="utf-8"))
                bar.update(task, advance=_n_items(metric, data))
                continue
            t0 = time.time()
            bar.update(task, description=f"{label}{metric}")
            logs[metric] = score_metric(metric, model, tokenizer, data, scoring,
                                        advance=lambda n: bar.update(task, advance=n))
            seconds[metric] = round(time.time() - t0, 1)
            if path is not None and write:
                io.write_json(path, logs[metric])
            if log:
                value = logs[metric]["value"]
                log(f"{label}{LABELS[metric]}: {'n/a' if value is None else f'{value:.2f}'} ({seconds[metric]:.0f} s)")
    summary = {**(meta or {}), **summarize(logs, data, scoring), "seconds": seconds}
    if out is not None and write:
        io.write_json(out / SUMMARY, summary)
    return summary


def summarize(logs: dict[str, dict], data: MuseData, scoring: MuseScoring) -> dict:
    values = {m: logs[m]["value"] for m in scoring.metrics}
    summary = {"corpus": scoring.corpus, "source": data.source, "convention": scoring.convention,
               "scoring": scoring.identity(), "metrics": values,
               "items": {m: _n_items(m, data) for m in scoring.metrics}}
    if "privleak" in logs:
        p = logs["privleak"]
        summary.update(auc=p["auc"], auc_retrain=p["auc_retrain"], auc_retrain_from=p["auc_retrain_from"])
    return summary


def read_summary(path: str | Path) -> dict:
    """A muse.json (or the folder holding it) from `loku muse eval`."""
    p = Path(path).expanduser()
    p = p / SUMMARY if p.is_dir() else p
    if not p.is_file():
        raise LokuError(f"{p} does not exist: pass the muse.json (or its folder) that `loku muse eval` wrote")
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LokuError(f"{p} is not valid JSON ({e}): evaluate the model again with `loku muse eval`") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict) or "scoring" not in summary:
        raise LokuError(f"{p} is not a `loku muse eval` summary (no metrics/scoring): pass its muse.json")
    return summary



@dataclass
class MuseEvalConfig(Config):
    """Options of `loku muse eval`."""

    model: str = field(default="", metadata=_help("Hub id, local model folder, .gguf file, or 'smollm2-135m'."))
    out: str = field(default="", metadata=_help("New folder for muse.json and the per-metric logs."))
    adapter: str | None = field(default=None, metadata=_help(
        "A PEFT adapter folder to merge into the model, or a T3 run's t3/ head folder (put on the model)."))
    resume: bool = field(default=False, metadata=_help("Continue a killed evaluation in --out."))
    overwrite: bool = field(default=False, metadata=_help("Replace a non-empty --out folder."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow the model's own code from the hub."))
    scoring: MuseScoring = field(default_factory=MuseScoring)

    def check(self):
        if self.resume and self.overwrite:
            raise LokuError("--resume keeps an evaluation and --overwrite deletes it: pass one of them")


def eval_model(cfg: MuseEvalConfig, log: Callable[[str], None] | None = print, progress: bool = True) -> dict:
    """`loku muse eval`: check everything, load the model (+ adapter), score it, write `cfg.out`."""
    from ..models import check_adapter, load_for_eval

    out = Path(cfg.out) if cfg.out else None
    if out is None:
        raise LokuError("no output directory given: pass --out DIR (a new directory)")
    config = json.loads(json.dumps({"model": cfg.model, "adapter": cfg.adapter, **asdict(cfg.scoring)}))
    if cfg.resume:
        saved = out / "config.json"
        if not saved.is_file():
            raise LokuError(f"{out} holds no MUSE evaluation to resume (no config.json): drop --resume")
        before = json.loads(saved.read_text(encoding="utf-8"))
        for key in sorted(set(before) | set(config)):
            if before.get(key) != config.get(key) and key not in ("batch_size", "data_dir"):
                raise LokuError(f"--resume: {key} was {before.get(key)!r}, now {config.get(key)!r}: resume with "
                                "the same options, or start a new --out")
    else:
        io.check_out_dir(out, cfg.overwrite)
    if not cfg.model:
        raise LokuError("no model given: pass --model (a hub id, a local folder or smollm2-135m)")
    if cfg.adapter is not None:
        check_adapter(cfg.adapter)
    data = load_data(cfg.scoring)             # bad data fails before the model loads
    model, tokenizer = load_for_eval(cfg.model, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    main = is_main()   # under accelerate launch every process scores everything; the main one reports and writes
    barrier()          # every process has checked --out before the main one creates it
    if not cfg.resume and main:
        io.start_out_dir(out, cfg.overwrite)
        io.write_json(out / "config.json", config)
    return evaluate_muse(model, tokenizer, data, cfg.scoring, out, log=log, progress=progress, write=main,
                         meta={"model": cfg.model, "adapter": cfg.adapter})
