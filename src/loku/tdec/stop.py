"""The TDEC stop rule as a plain per-epoch callable for `loku.train.unlearn`."""

from __future__ import annotations

from typing import Callable

from .thresholds import Thresholds


class StopWhenForgotten:
    """After every epoch, measure the forget set (`measure(model) -> {"el": [...], "ma": [...]}`) and stop
    after the first epoch where its mean EL_n and mean MA are both below the thresholds.

    `records` keeps every epoch's means and per-item values; `epochs_to_forget` is that first epoch
    (None while the set is not forgotten)."""

    def __init__(self, measure: Callable[[object], dict], thresholds: Thresholds,
                 log: Callable[[str], None] | None = None):
        self.measure, self.thresholds, self.log = measure, thresholds, log
        self.records: list[dict] = []
        self.epochs_to_forget: int | None = None

    def __call__(self, epoch: int, model) -> dict:
        m = self.measure(model)
        el = sum(m["el"]) / len(m["el"])
        ma = sum(m["ma"]) / len(m["ma"])
        forgotten = self.thresholds.forgotten(el, ma)
        if forgotten and self.epochs_to_forget is None:
            self.epochs_to_forget = epoch
        self.records.append({"epoch": epoch, "el_mean": el, "ma_mean": ma, "forgotten": forgotten,
                             "seconds": m.get("seconds"), "el": list(m["el"]), "ma": list(m["ma"])})
        if "es" in m:   # extraction strength, reported beside (not part of the rule)
            self.records[-1].update(es_mean=sum(m["es"]) / len(m["es"]), es=list(m["es"]))
        if self.log:
            th = self.thresholds
            self.log(f"epoch {epoch}: EL{th.n} {100 * el:.2f} % (threshold {100 * th.el:.2f}), MA {100 * ma:.2f} % "
                     f"(threshold {100 * th.ma:.2f})" + ("  -> forgotten" if forgotten else ""))
        # Means only: they go into the run's history and metrics.jsonl; per-item values stay in `records`.
        return {f"el{self.thresholds.n}": el, "ma": ma, "forgotten": forgotten, "stop": forgotten}
