"""Measure a model on the audit's sets: every per-example number, then forget against unseen.

`measure_set` is the unit the stop rule (`loku unlearn --until forgotten`) and the robustness benchmark call:
per example MA and EL_n (text; `loku.metrics.extraction`'s exact fast path), ES and EM, and every
membership score, from one teacher-forced pass per batch plus EL_n's decoding. `compare` turns the forget
and unseen measurements into margins, intervals and verdicts (`loku.audit.verdict`).

Under `accelerate launch` (DDP) each process measures every world-th example and all get every value, as
`loku tdec run` evaluates (`loku.distributed.map_items`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..distributed import is_main, map_items
from ..metrics.extraction import (DECODE_BATCH, exact_memorization_from_logits, extraction_strength_from_logits,
                                  ragged_metrics)
from ..metrics.forward import teacher_forced
from ..metrics.membership import membership_scores, reference_scores
from .sets import EvalSet
from .verdict import compare_auc, compare_means

EXTRACTION = ("ma", "el", "es", "em")


@dataclass(frozen=True)
class Settings:
    """How a model is measured (from AuditConfig): EL_n's n, Min-K's k, the membership attacks, batch sizes."""

    n: int = 10
    k: float = 0.4
    attacks: tuple[str, ...] = ("loss", "zlib", "min_k", "min_k_plus_plus")
    el: bool = True
    batch_size: int = 8
    decode_batch_size: int = DECODE_BATCH
    pad_id: int = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    tolerance: float = 0.0
    seed: int = 0


def _examples(model, s: EvalSet, indices: list[int], st: Settings, reference_losses, decode_progress=None) -> list[dict]:
    """Per-example values for `indices` of `s` (one process's share). On text with EL_n, the teacher-forced
    pass that gives EL_n's KV cache and MA also gives ES, EM and the membership scores (one pass, not two)."""
    feats = [s.features[i] for i in indices]
    zl = [s.zlib[i] for i in indices]
    wanted = tuple(a for a in st.attacks if a != "reference") + ("loss",)
    out = [dict() for _ in indices]

    def score(idx: list[int], logits: torch.Tensor, labels: torch.Tensor) -> None:
        scores = membership_scores(logits, labels, k=st.k, zlib_sizes=[zl[i] for i in idx], attacks=wanted)
        scores["es"] = extraction_strength_from_logits(logits, labels)
        scores["em"] = exact_memorization_from_logits(logits, labels)
        for name, values in scores.items():
            for i, v in zip(idx, values.tolist()):
                out[i][name] = v

    if s.kind == "text" and st.el:   # rows of a length measured together, unpadded
        labels = [f["labels"] for f in feats]
        res = ragged_metrics(model, [f["input_ids"] for f in feats], st.n, batch_size=st.batch_size,
                             decode_batch_size=st.decode_batch_size, decode_progress=decode_progress,
                             on_logits=lambda idx, logits: score(idx, logits.float(), torch.tensor(
                                 [labels[i] for i in idx], device=logits.device)))
        for o, ma, el in zip(out, res["ma"], res["el"]):
            o["ma"], o["el"] = ma, el
    else:
        for idx, logits, labels in teacher_forced(model, feats, st.pad_id, st.batch_size):
            score(idx, logits, labels)
        if s.kind == "text":
            for o in out:   # MA is EM on plain text (the same tokens), no decoding needed
                o["ma"] = o["em"]
    if "reference" in st.attacks:
        ref = reference_scores([reference_losses[i] for i in indices], [-o["loss"] for o in out])
        for o, r in zip(out, ref):
            o["reference"] = r
    if "loss" not in st.attacks:
        for o in out:
            del o["loss"]
    return out


def measure_set(model, s: EvalSet, st: Settings, reference_losses: list[float] | None = None) -> dict:
    """{"per_example": {metric: [value per example]}, "mean": {metric: mean}, "seconds"}. Metrics: es, em, the
    membership attacks of `st`, and for text ma and el (el only with st.el). EL_n's decoding (minutes on a CPU)
    shows a progress bar of the tokens decoded (the main process's share)."""
    t0 = time.perf_counter()
    with decoding_bar(f"EL{st.n} {s.name}", s.kind == "text" and st.el and is_main()) as progress:
        rows = map_items(lambda idx: _examples(model, s, idx, st, reference_losses, progress), range(len(s)))
    names = list(rows[0]) if rows else []
    per = {name: [r[name] for r in rows] for name in names}
    return {"per_example": per, "mean": {k: sum(v) / len(v) for k, v in per.items()},
            "seconds": round(time.perf_counter() - t0, 2)}


@contextmanager
def decoding_bar(label: str, show: bool):
    """A progress bar of decoded tokens; yields `progress(planned, decoded)` for `loku.metrics.greedy`: the total
    grows as each group of rows plans its branches (None while no group has), the bar as batches end."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not show) as bar:
        task = bar.add_task(f"{label}: decoding", total=None)

        def progress(planned: int, decoded: int) -> None:
            if planned:
                bar.update(task, total=(bar.tasks[0].total or 0) + planned)
            bar.update(task, advance=decoded)

        yield progress


def compare(forget: dict, unseen: dict, st: Settings) -> dict:
    """Forget against unseen: {"metrics": {ma/el/es/em: compare_means(...)}, "auc": {attack: compare_auc(...)}}."""
    f, u = forget["per_example"], unseen["per_example"]
    kw = dict(n_resamples=st.bootstrap, confidence=st.confidence, seed=st.seed, tolerance=st.tolerance)
    return {"metrics": {m: compare_means(f[m], u[m], **kw) for m in EXTRACTION if m in f and m in u},
            "auc": {a: compare_auc(f[a], u[a], **kw) for a in st.attacks if a in f and a in u}}


def measure_model(model, sets: dict[str, EvalSet], st: Settings, reference_losses: dict | None = None,
                  pairs: dict[str, tuple[str, str]] | None = None) -> dict:
    """Every set measured, then each (forget, unseen) pair compared: {"sets": {name: measure_set}, "compare":
    {pair name: compare(...)}}; `pairs` default {"forget": ("forget", "unseen")}."""
    reference_losses = reference_losses or {}
    measured = {name: measure_set(model, s, st, reference_losses.get(name)) for name, s in sets.items()}
    pairs = pairs or {"forget": ("forget", "unseen")}
    return {"sets": measured,
            "compare": {name: compare(measured[a], measured[b], st) for name, (a, b) in pairs.items()}}


def forgotten(comparison: dict, metrics=("ma", "el"), attacks=(), below_counts: bool = True) -> bool:
    """True when every named metric and attack of a `compare` result is no longer above the never-seen level
    (what a stop rule asks; TDEC's rule: metrics ma and el). With `below_counts` False, a metric below the
    never-seen level (over-unlearned, detectable too) does not count as forgotten; an AUC must always be
    indistinguishable from 0.5."""
    from .verdict import BELOW, INDISTINGUISHABLE

    ok = {INDISTINGUISHABLE, BELOW} if below_counts else {INDISTINGUISHABLE}
    return all(comparison["metrics"][m]["verdict"] in ok for m in metrics if m in comparison["metrics"]) and \
        all(comparison["auc"][a]["verdict"] == INDISTINGUISHABLE for a in attacks if a in comparison["auc"])
