"""Utility evaluation of the TDEC protocol (Jang et al. 2023; LoKU Table 1): does the model still work?

Four numbers summarise it: mean accuracy over 9 reasoning tasks, mean unigram F1 over 4 dialogue tasks,
and perplexity on the Pile and on WikiText. Each task keeps its per-item results next to its aggregate,
so two runs can be compared item by item, and each metric says which direction is better.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

from ..data.eval_tasks import DIALOGUE_TASKS, PPL_TASKS, REASONING_TASKS, TASK_REGISTRY, TASKS, load_task_from
from ..distributed import map_items
from ..errors import LokuError
from .dialogue import dialogue_results
from .perplexity import sequence_nll, token_weighted_perplexity
from .reasoning import completion_results, multiple_choice_results


@dataclass(frozen=True)
class Metric:
    """A per-item field, the named aggregation that turns the items into one number, and its direction."""
    name: str
    item_key: str
    aggregation: str
    aggregate: Callable[[list[dict]], float]
    higher_is_better: bool


def _mean_of(key: str) -> Callable[[list[dict]], float]:
    return lambda items: sum(it[key] for it in items) / len(items) if items else math.nan


ACCURACY = Metric("accuracy", "correct", "mean", _mean_of("correct"), True)
UNIGRAM_F1 = Metric("unigram_f1", "f1", "mean", _mean_of("f1"), True)
PERPLEXITY = Metric("perplexity", "nll", "token_weighted_perplexity", token_weighted_perplexity, False)

# kind of task -> (per-item runner(model, tokenizer, items, batch_size, max_length), metric)
KINDS: dict[str, tuple[Callable, Metric]] = {
    "choice": (multiple_choice_results, ACCURACY),
    "completion": (completion_results, ACCURACY),
    "dialogue": (dialogue_results, UNIGRAM_F1),
    "ppl": (sequence_nll, PERPLEXITY),
}
GROUPS = {"reasoning": REASONING_TASKS, "dialogue": DIALOGUE_TASKS, "ppl": PPL_TASKS}


def resolve_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names in a stable order; None = all 15. Accepts a comma-separated string and the group names
    "reasoning", "dialogue" and "ppl". Unknown names fail with a did-you-mean."""
    if tasks is None:
        return list(TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in filter(None, names):
        for n in GROUPS.get(name, [name]):
            TASK_REGISTRY[n]  # raises LokuError("unknown evaluation task ... did you mean ...")
            if n not in out:
                out.append(n)
    if not out:
        raise LokuError(f"no evaluation task given: choose from {', '.join([*GROUPS, *TASKS])}")
    return out


def context_limit(model, max_length: int) -> int:
    """`max_length`, lowered to what the model's position embeddings allow."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(max_length, limit) if limit else max_length


@contextmanager
def eval_mode(model):
    """Dropout off while evaluating (the callback may run mid-training), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate_task(model, tokenizer, name: str, items: list, batch_size: int = 8, max_length: int = 512) -> dict:
    """One task: its aggregate, the metric's name/aggregation/direction, timing and the per-item list."""
    spec = TASKS[name]
    runner, metric = KINDS[spec.kind]
    start = time.perf_counter()
    # under several DDP processes each scores every world-th item; all get every item's result back
    per_item = map_items(lambda part: runner(model, tokenizer, part, batch_size=batch_size, max_length=max_length),
                         items)
    for i, item in enumerate(per_item):   # a process numbers its share from 0: back to positions in the task
        item["index"] = i
    return {"task": name, "kind": spec.kind, "metric": metric.name, "aggregation": metric.aggregation,
            "higher_is_better": metric.higher_is_better, "value": metric.aggregate(per_item), "n": len(per_item),
            "seconds": round(time.perf_counter() - start, 2), "note": spec.note, "items": per_item}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def utility_summary(results: dict[str, dict]) -> dict:
    """The paper's four numbers over whichever tasks were run (None when a group was not run)."""
    reasoning = [results[n]["value"] for n in REASONING_TASKS if n in results]
    dialogue = [results[n]["value"] for n in DIALOGUE_TASKS if n in results]
    return {"reasoning_accuracy": _mean(reasoning), "reasoning_tasks": len(reasoning),
            "dialogue_f1": _mean(dialogue), "dialogue_tasks": len(dialogue),
            "pile_ppl": results["pile"]["value"] if "pile" in results else None,
            "wikitext_ppl": results["wikitext"]["value"] if "wikitext" in results else None}


def evaluate_utility(model, tokenizer, tasks: str | Sequence[str] | None = None, limit: int | None = None,
                     batch_size: int = 8, data_dir=None, max_length: int = 512,
                     log: Callable[[str], None] | None = None) -> dict:
    """Run the TDEC utility tasks on an in-memory model.

    Returns {"tasks": {name: evaluate_task(...) result}, "summary": utility_summary(...), "settings": {...}}.
    `limit` keeps the first N items of every task; `max_length` (Jang et al.: 512) bounds every sequence.
    The task files come from `data_dir` (else $LOKU_DATA), else the hub (`loku.data.sources`); where each
    came from is kept in settings["data"]. Every task's data is loaded before the model runs, so a missing
    file fails in seconds, not after an hour."""
    if batch_size < 1:
        raise LokuError(f"batch_size must be at least 1, got {batch_size}")
    names = resolve_tasks(tasks)
    loaded = {n: load_task_from(n, data_dir=data_dir, limit=limit) for n in names}
    data = {n: items for n, (items, _) in loaded.items()}
    max_length = context_limit(model, max_length)
    results: dict[str, dict] = {}
    with eval_mode(model):
        for n in names:
            results[n] = evaluate_task(model, tokenizer, n, data[n], batch_size=batch_size, max_length=max_length)
            if log:
                r = results[n]
                log(f"{n}: {r['metric']} {r['value']:.4f} (n={r['n']}, {r['seconds']:.1f} s)")
    return {"tasks": results, "summary": utility_summary(results),
            "settings": {"limit": limit, "batch_size": batch_size, "max_length": max_length,
                         "data": {n: where for n, (_, where) in loaded.items()}}}


def utility_table(result: dict) -> str:
    """A plain-text table of an `evaluate_utility` result: one line per task, then the summary."""
    lines = [f"{'task':<22}{'metric':<12}{'value':>10}{'n':>7}{'sec':>8}"]
    for r in result["tasks"].values():
        lines.append(f"{r['task']:<22}{r['metric']:<12}{r['value']:>10.4f}{r['n']:>7}{r['seconds']:>8.1f}")
    for key, value in result["summary"].items():
        if value is not None and not key.endswith("_tasks"):
            lines.append(f"{key:<34}{value:>10.4f}")
    return "\n".join(lines)
