"""What a run shows and records while it trains: the progress bar, metrics.jsonl, the divergence watch, and
the per-epoch callbacks (evaluation, stop rules)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

EpochCallback = Callable[[int, torch.nn.Module], "dict | None"]


def epoch_callbacks(callbacks, epoch: int, model) -> tuple[dict, bool]:
    """Each callback's values for the epoch line (model in eval mode), and whether one returned {"stop": True}."""
    values, stop = {}, False
    for cb in callbacks:
        model.eval()
        extra = dict(cb(epoch, model) or {})
        stop = bool(extra.pop("stop", False)) or stop
        values.update(extra)
    return values, stop


class RunLog:
    """One line per optimizer step and one per epoch, to the bar and (main process) to `metrics`. With
    `divergence_bound` (ascent methods, which have no floor), a forget cross-entropy past it is flagged."""

    def __init__(self, description: str, total: int, done: int = 0, *, show: bool = True,
                 metrics: Path | None = None, divergence_bound: float | None = None):
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            disable=not show, transient=False)
        self.task = self.bar.add_task(description, total=total, completed=done, info="")
        self.file = metrics.open("a") if metrics is not None else None
        self.description, self.bound, self.diverged_at_step = description, divergence_bound, None

    def __enter__(self) -> "RunLog":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)
        if self.file:
            self.file.close()

    def _write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record, default=float) + "\n")
            self.file.flush()

    def step(self, epoch: int, step: int, values: dict[str, float], lr: float, tokens_per_s: float) -> None:
        record = {"kind": "step", "epoch": epoch + 1, "step": step, **values, "lr": lr,
                  "tokens_per_s": round(tokens_per_s, 1)}
        if self.bound is not None and -values["forget"] > self.bound:
            record["warning"] = "diverged"
            if self.diverged_at_step is None:
                self.diverged_at_step = step
                self.bar.console.print(
                    f"[yellow]warning[/]: {self.description} diverged at epoch {epoch + 1} step {step}: forget "
                    f"cross-entropy {-values['forget']:.1f} nats > {self.bound:g}; lower --lr or --epochs, or use "
                    "a bounded method (ihl, npo)")
        self._write(record)
        self.bar.update(self.task, advance=1, info=f"loss {values['loss']:.4f}  {tokens_per_s:,.0f} tok/s")

    def epoch(self, record: dict, stop: bool) -> None:
        self._write(record)
        if stop:
            self.bar.update(self.task, completed=self.bar.tasks[0].total, info="stopped: done")
