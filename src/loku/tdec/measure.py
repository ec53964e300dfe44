"""MA and EL_n of every TDEC sequence, keeping the per-item values next to their means."""

from __future__ import annotations

import time

from .data import Sequences


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def measure_sequences(model, seqs: Sequences, n: int = 10, batch_size: int = 8) -> dict:
    """{"el": [per sequence], "ma": [...], "el_mean", "ma_mean", "seconds"}: MA and EL_n from one shared
    computation (`loku.metrics.extraction.ragged_metrics`: sequences of equal length measured together as
    (B, T) rows without padding), results back in file order. Under several DDP processes each measures every
    world-th sequence and all get every value (`loku.distributed.map_items`)."""
    from ..distributed import map_items
    from ..metrics.extraction import ragged_metrics

    t0 = time.perf_counter()

    def measure(indices: list[int]) -> list[tuple[float, float]]:
        res = ragged_metrics(model, [seqs.ids[i] for i in indices], n, batch_size=batch_size)
        return list(zip(res["ma"], res["el"]))

    pairs = map_items(measure, range(len(seqs)))
    ma, el = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"el": el, "ma": ma, "el_mean": _mean(el), "ma_mean": _mean(ma),
            "seconds": round(time.perf_counter() - t0, 2)}


class ExtractionMeter:
    """`meter(model) -> measure_sequences(...)` for a fixed set of sequences: what the stop rule calls."""

    def __init__(self, seqs: Sequences, n: int = 10, batch_size: int = 8):
        self.seqs, self.n, self.batch_size = seqs, n, batch_size

    def __call__(self, model) -> dict:
        return measure_sequences(model, self.seqs, self.n, self.batch_size)
