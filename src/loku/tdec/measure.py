"""MA, EL_n and ES of every TDEC sequence, keeping the per-item values next to their means."""

from __future__ import annotations

import time

import torch

from .data import Sequences


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def measure_sequences(model, seqs: Sequences, n: int = 10, batch_size: int = 8) -> dict:
    """{"el": [per sequence], "ma": [...], "es": [...], "el_mean", "ma_mean", "es_mean", "seconds"}: MA and EL_n
    from one shared computation (`loku.metrics.extraction.ragged_metrics`: sequences of equal length measured
    together as (B, T) rows without padding), and extraction strength (OpenUnlearning's ES, every token but the
    first scored) from the same teacher-forced logits; results back in file order. Under several DDP processes
    each measures every world-th sequence and all get every value (`loku.distributed.map_items`)."""
    from ..distributed import map_items
    from ..metrics.extraction import extraction_strength_from_logits, ragged_metrics

    t0 = time.perf_counter()

    def measure(indices: list[int]) -> list[tuple[float, float, float]]:
        rows = [seqs.ids[i] for i in indices]
        es = [0.0] * len(rows)

        def strength(idx: list[int], logits) -> None:
            labels = torch.tensor([rows[i] for i in idx], device=logits.device)
            for i, v in zip(idx, extraction_strength_from_logits(logits, labels).tolist()):
                es[i] = v

        res = ragged_metrics(model, rows, n, batch_size=batch_size, on_logits=strength)
        return list(zip(res["ma"], res["el"], es))

    triples = map_items(measure, range(len(seqs)))
    ma, el, es = ([t[k] for t in triples] for k in range(3))
    return {"el": el, "ma": ma, "es": es, "el_mean": _mean(el), "ma_mean": _mean(ma), "es_mean": _mean(es),
            "seconds": round(time.perf_counter() - t0, 2)}


class ExtractionMeter:
    """`meter(model) -> measure_sequences(...)` for a fixed set of sequences: what the stop rule calls."""

    def __init__(self, seqs: Sequences, n: int = 10, batch_size: int = 8):
        self.seqs, self.n, self.batch_size = seqs, n, batch_size

    def __call__(self, model) -> dict:
        return measure_sequences(model, self.seqs, self.n, self.batch_size)
