"""Evaluate a model on TOFU's four sets and write the official per-item logs (TOFU `evaluate_util.py`).

Per item: the loss of the ground-truth answer, of the "base" answer (paraphrased for retain/forget, the
answer itself for real authors/world facts) and of each perturbed answer, all per-token averages; the
greedy answer and its ROUGE recall; and, added by loku, the extraction strength and exact memorization of
the ground-truth answer (OpenUnlearning's ES and EM) from the same logits. Each distinct (question, answer)
text is scored by one batched forward pass, so the real-author sets, whose base answer is the answer, cost
no second pass.

Texts, labels, the generation prompt and the ground truth for ROUGE follow the prompt format
(`loku.data.qa`); TOFU's own (`tofu-phi`, default) reproduces its logs: the labels are the answer tag,
the answer and EOS, and generation starts from `question_start_tag + question + question_end_tag`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config_base import Config, setting
from ..data.qa import PROMPT_FORMAT_HELP, PROMPT_FORMATS, TOFU_PROMPT_FORMAT, answer_text, prompt_ids, resolve_format
from ..data.tofu import format_qa, load_split
from ..distributed import is_main, map_items
from ..errors import LokuError
from .generate import rouge_recalls
from ..metrics.forward import pad_id
from ..metrics.generate import greedy_answers
from .logs import (EM_KEY, ES_KEY, FORGET, LOG_FILES, NORMALIZED_KEY, REAL_AUTHORS, REAL_WORLD, RETAIN,
                   has_normalized, stamp_format, write_logs)
from .scores import answer_scores

TOFU_MAX_LENGTH = 200  # TOFU's generation.max_length: tokenization cap and prompt + generated tokens
TOFU_DS_SIZE = 300     # TOFU's ds_size: only the first 300 items of each set are evaluated


@dataclass
class TofuEvalConfig(Config):
    """Options of `loku tofu eval`."""

    model: str = setting("", "Hub id, local model directory, .gguf file, or 'smollm2-135m'.", group="Model")
    out: str = setting("", "Folder for the TOFU logs (eval_log*.json, eval_log_aggregated.json).", group="Output")
    split: str = setting("forget10", "Forget split: forget01, forget05 or forget10.", group="Data")
    limit: int = setting(TOFU_DS_SIZE, "First N items of each set (TOFU's ds_size); 0 = all.", group="Data",
                         bound="non-negative")
    data_dir: str | None = setting(None, "Data folder whose tofu/ holds TOFU's JSON files (see README 'Data').", group="Data",
                                   default_text="$LOKU_DATA, then the hub dataset locuslab/TOFU")
    authors: int | None = setting(None, "Evaluate a K-author TOFU (as fine-tuned with --authors K).", group="Data")
    batch_size: int = setting(8, "Sequences per forward pass / generation batch.", group="Evaluation",
                              bound="positive")
    max_new_tokens: int | None = setting(None, "Cap on generated tokens.", group="Evaluation", bound="positive",
                                         default_text="TOFU's 200 tokens of prompt + answer")
    prompt_format: str | None = setting(None, PROMPT_FORMAT_HELP, group="Data", choices=PROMPT_FORMATS,
                                        kind="prompt format",
                                        default_text="as fine-tuned (tofu_finetune.json beside the model), else "
                                                     "tofu-phi")
    overwrite: bool = setting(False, "Replace a non-empty --out folder.", group="Output")
    trust_remote_code: bool = setting(False, "Run the model repository's own code.", group="Model")

    def check(self):
        if not self.model:
            raise LokuError("no model given: pass --model DIR (e.g. loku tofu finetune's OUT/target)")
        if not self.out:
            raise LokuError("no output folder given: pass --out DIR")


@dataclass(frozen=True)
class Task:
    """One TOFU evaluation set: its log file, split, and TOFU's base_answer_key."""
    log: str
    split: str
    base_key: str


TASKS = (
    Task(RETAIN, "retain_perturbed", "paraphrased_answer"),
    Task(REAL_AUTHORS, "real_authors_perturbed", "answer"),
    Task(REAL_WORLD, "world_facts_perturbed", "answer"),
    Task(FORGET, "{forget}_perturbed", "paraphrased_answer"),
)
TASK_BY_LOG = {t.log: t for t in TASKS}


def _check_rows(name: str, rows: list[dict], base_key: str) -> None:
    if not rows:
        raise LokuError(f"TOFU set {name} has no items: check the data folder and --limit")
    for i, r in enumerate(rows):
        for key in dict.fromkeys(("question", "answer", base_key, "perturbed_answer")):
            if not isinstance(r, dict) or key not in r:
                raise LokuError(f"TOFU set {name} item {i} has no {key!r}: use the *_perturbed splits, which "
                                "carry paraphrased and perturbed answers")
        if r["perturbed_answer"] in ([], ""):
            raise LokuError(f"TOFU set {name} item {i} has no perturbed answers: use an unmodified *_perturbed split")


def evaluate_set(model, tokenizer, rows: list[dict], base_key: str = "paraphrased_answer", *,
                 normalized: bool = False, max_length: int = TOFU_MAX_LENGTH, max_new_tokens: int | None = None,
                 batch_size: int = 8, prompt_format: str = TOFU_PROMPT_FORMAT) -> dict[str, dict]:
    """One set's TOFU log: {metric: {item index as string: value}} with TOFU's keys (logs.LOG_KEYS), the
    texts in `prompt_format`. The model runs in eval mode (no dropout) and gets its training flag back."""
    _check_rows("rows", rows, base_key)
    fmt = resolve_format(tokenizer, prompt_format)
    was_training = model.training
    model.eval()
    try:   # under several DDP processes each scores every world-th item; all get every value back
        items = map_items(lambda part: _evaluate_rows(model, tokenizer, part, base_key, normalized, max_length,
                                                      max_new_tokens, batch_size, fmt), rows)
    finally:
        model.train(was_training)
    keys = [str(i) for i in range(len(rows))]
    return {metric: {k: item[metric] for k, item in zip(keys, items)} for metric in items[0]} if items else {}


def _evaluate_rows(model, tokenizer, rows, base_key, normalized, max_length, max_new_tokens, batch_size,
                   fmt) -> list[dict]:
    """One {metric: value} per row, in row order."""
    if not rows:
        return []
    texts: dict[tuple[str, str], int] = {}  # distinct (question, answer) -> position in `features`
    features = []

    def slot(question: str, answer: str) -> int:
        if (question, answer) not in texts:
            texts[(question, answer)] = len(features)
            features.append(format_qa(tokenizer, question, answer, max_length, fmt))
        return texts[(question, answer)]

    perturbed = [r["perturbed_answer"] if isinstance(r["perturbed_answer"], list) else [r["perturbed_answer"]]
                 for r in rows]
    gt = [slot(r["question"], r["answer"]) for r in rows]
    base = [slot(r["question"], r[base_key]) for r in rows]
    pert = [[slot(r["question"], p) for p in ps] for r, ps in zip(rows, perturbed)]
    scores = answer_scores(model, features, pad_id(tokenizer), batch_size)
    sums, counts = scores["loss"], scores["tokens"]

    prompts = [prompt_ids(tokenizer, r["question"], fmt) for r in rows]
    budgets = [max_new_tokens if max_new_tokens is not None else max_length - len(p) for p in prompts]
    answers = greedy_answers(model, tokenizer, prompts, budgets, batch_size)
    generations = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    truths = [answer_text(tokenizer, features[g]["input_ids"], features[g]["labels"], fmt) for g in gt]
    inputs = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    rouge = rouge_recalls(generations, truths)

    avg = [s / n if n else math.nan for s, n in zip(sums, counts)]
    per_item = {
        "avg_gt_loss": [avg[g] for g in gt],
        "gt_loss": [sums[g] for g in gt],
        "num_token_gt": [counts[g] for g in gt],
        "generated_text": [[i, g, t] for i, g, t in zip(inputs, generations, truths)],
        **rouge,
        "average_perturb_loss": [[avg[p] for p in ps] for ps in pert],
        "avg_paraphrased_loss": [avg[b] for b in base],
        # TOFU's per-item truth ratio: geometric-mean perturbed probability over the base answer's
        "truth_ratio": [math.exp(avg[b] - sum(avg[p] for p in ps) / len(ps)) for b, ps in zip(base, pert)],
        "paraphrased_loss": [sums[b] for b in base],
        "perturb_loss": [[sums[p] for p in ps] for ps in pert],
        "num_token_paraphrased": [counts[b] for b in base],
        "num_token_perturb": [[counts[p] for p in ps] for ps in pert],
    }
    if normalized:  # -log of the answer's share of probability among itself and its perturbations
        per_item[NORMALIZED_KEY] = [_log1p_sum_exp([avg[g] - avg[p] for p in ps]) for g, ps in zip(gt, pert)]
    per_item[ES_KEY] = [scores["es"][g] for g in gt]   # of the ground-truth answer, as OpenUnlearning's
    per_item[EM_KEY] = [scores["em"][g] for g in gt]
    return [dict(zip(per_item, values)) for values in zip(*per_item.values())]


def _log1p_sum_exp(xs: list[float]) -> float:
    """log(1 + sum(exp(x))) without overflow: TOFU's -log(p / (p + sum p_perturbed)) with x = log(p_perturbed / p)."""
    m = max(0.0, *xs)
    return m + math.log(math.exp(-m) + sum(math.exp(x - m) for x in xs))


def load_sets(data: str | Path | None, *, forget: str = "forget10", limit: int | None = TOFU_DS_SIZE,
              authors: int | None = None) -> dict[str, list[dict]]:
    """The four evaluation sets keyed by log file name, from the data folder `data` (its tofu/; None:
    $LOKU_DATA), else the hub (loku.data.sources)."""
    if forget not in ("forget01", "forget05", "forget10"):
        raise LokuError(f"forget split {forget!r} is not one of forget01, forget05, forget10: pass one of those")
    return {t.log: load_split(t.split.format(forget=forget), data, authors=authors, forget=forget, limit=limit)
            for t in TASKS}


def evaluate_tofu(model, tokenizer, data: str | Path | dict[str, list[dict]] | None = None,
                  out_dir: str | Path | None = None, *, forget: str = "forget10", limit: int | None = TOFU_DS_SIZE,
                  authors: int | None = None, max_length: int = TOFU_MAX_LENGTH, max_new_tokens: int | None = None,
                  batch_size: int = 8, log: Callable[[str], None] | None = None,
                  prompt_format: str = TOFU_PROMPT_FORMAT) -> dict[str, dict]:
    """Evaluate on TOFU and return the aggregated log {log file name: per-item log}; with `out_dir`, also
    write the official files there (eval_log.json, ..., eval_log_aggregated.json). Every set's log records
    the prompt format (`auto` made concrete for the tokenizer) under `prompt_format`.

    `data` is a data folder (TOFU's JSON files in its tofu/; None: $LOKU_DATA, else the hub), or ready rows
    keyed by log file name (any of the four; e.g. a shortened set for a quick check). `limit` keeps the
    first items of each set like TOFU's ds_size (300 by default, as TOFU); None keeps all.
    """
    if isinstance(data, dict):
        unknown = [k for k in data if k not in TASK_BY_LOG]
        if unknown:
            raise LokuError(f"unknown TOFU set {unknown[0]!r}: key the rows by {', '.join(LOG_FILES)}")
        sets = {k: rows[:limit] if limit is not None else rows for k, rows in data.items()}
    else:
        sets = load_sets(data, forget=forget, limit=limit, authors=authors)
    for name, rows in sets.items():
        _check_rows(name, rows, TASK_BY_LOG[name].base_key)
    fmt = resolve_format(tokenizer, prompt_format)
    if not is_main():   # under accelerate launch every process scores its share; the main one writes
        out_dir, log = None, None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)  # fail on an unwritable folder before the work
    logs = {}
    for name, rows in sets.items():
        t0 = time.time()
        logs[name] = evaluate_set(model, tokenizer, rows, TASK_BY_LOG[name].base_key,
                                  normalized=has_normalized(name), max_length=max_length,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_format=fmt)
        if log:
            log(f"{name}: {len(rows)} items in {time.time() - t0:.1f} s")
    logs = stamp_format(logs, fmt)
    if out_dir is not None:
        write_logs(out_dir, logs)
    return logs
