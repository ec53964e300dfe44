"""The one training loop: unlearning (`loku.train.unlearn`) and plain fine-tuning (`loku.finetune`) both run
here, one optimizer step per iteration, from a fresh start or a checkpoint's position; and what it shows and
records while it runs (progress bar, metrics.jsonl, divergence watch, per-epoch callbacks and stop rules)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..data.batches import PairedBatches
from .checkpoints import Checkpoints, Position
from .setup import TrainSettings
from .step import OptimizerStep

EpochCallback = Callable[[int, torch.nn.Module], "dict | None"]
KILL_AT_STEP = int(os.environ.get("LOKU_TEST_KILL_AT_STEP", "0")) or None   # the kill-and-resume test


def train_loop(step: OptimizerStep, batches: PairedBatches, settings: TrainSettings, log: RunLog,
               callbacks: Sequence[EpochCallback] = (), checkpoints: Checkpoints | None = None,
               at: Position | None = None) -> Position:
    """Train for `settings.epochs` (or until a callback returns {"stop": True}); returns the final position,
    whose history holds one line per epoch: the mean of its steps' loss terms plus the callbacks' values."""
    at = at or Position()
    steps_per_epoch = batches.steps_per_epoch(settings.grad_accum)
    for epoch in range(at.epoch, 0 if at.done else settings.epochs):
        step.model.train()
        started, tokens = time.time(), 0
        for micro in batches.steps(epoch, settings.grad_accum, at.next_batch):
            values, n_tokens = step(micro, epoch, at.step)
            at.step, at.next_batch, tokens = at.step + 1, at.next_batch + len(micro), tokens + n_tokens
            at.sums = {k: at.sums.get(k, 0.0) + v for k, v in values.items()}
            log.step(epoch, at.step, values, step.scheduler.get_last_lr()[0],
                     tokens / max(time.time() - started, 1e-9))
            if at.step == KILL_AT_STEP:
                os.kill(os.getpid(), signal.SIGKILL)
            if checkpoints and settings.save_every and at.step % settings.save_every == 0 \
                    and at.next_batch < len(batches):
                checkpoints.save(at)
        step.epoch_end(epoch, batches)
        seconds = max(time.time() - started, 1e-9)
        record = {"kind": "epoch", "epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in at.sums.items()},
                  "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
        values, stop = epoch_callbacks(callbacks, epoch + 1, step.accelerator.unwrap_model(step.model))
        at.history.append({**record, **values})
        log.epoch(at.history[-1], stop)
        at = Position(epoch + 1, 0, at.step, {}, stop or epoch + 1 == settings.epochs, at.history)
        if checkpoints:
            checkpoints.save(at)
        if stop:
            break
    return at


def epoch_callbacks(callbacks, epoch: int, model) -> tuple[dict, bool]:
    """Each callback's values for the epoch line (model in eval mode), and whether one returned {"stop": True}."""
    values, stop = {}, False
    for cb in callbacks:
        model.eval()
        extra = dict(cb(epoch, model) or {})
        stop = bool(extra.pop("stop", False)) or stop
        values.update(extra)
    return values, stop


class RunLog(Progress):
    """A progress bar that also writes one line per optimizer step and one per epoch to `metrics` (the main
    process's metrics.jsonl). With `divergence_bound` (ascent methods, which have no floor), a forget
    cross-entropy past it is flagged."""

    def __init__(self, description: str, total: int, done: int = 0, *, show: bool = True,
                 metrics: Path | None = None, divergence_bound: float | None = None):
        super().__init__(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                         disable=not show)
        self.task = self.add_task(description, total=total, completed=done, info="")
        self.metrics, self.description, self.bound, self.diverged_at_step = metrics, description, divergence_bound, None

    def _write(self, record: dict) -> None:
        if self.metrics is not None:   # a line at a time: what a killed run wrote is complete up to its last step
            with self.metrics.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def step(self, epoch: int, step: int, values: dict[str, float], lr: float, tokens_per_s: float) -> None:
        record = {"kind": "step", "epoch": epoch + 1, "step": step, **values, "lr": lr,
                  "tokens_per_s": round(tokens_per_s, 1)}
        if self.bound is not None and -values["forget"] > self.bound:
            record["warning"] = "diverged"
            if self.diverged_at_step is None:
                self.diverged_at_step = step
                self.console.print(f"[yellow]warning[/]: {self.description} diverged at epoch {epoch + 1} step "
                                   f"{step}: forget cross-entropy {-values['forget']:.1f} nats > {self.bound:g}; "
                                   "lower --lr or --epochs, or use a bounded method (ihl, npo)")
        self._write(record)
        self.update(self.task, advance=1, info=f"loss {values['loss']:.4f}  {tokens_per_s:,.0f} tok/s")

    def epoch(self, record: dict, stop: bool) -> None:
        self._write(record)
        if stop:
            self.update(self.task, completed=self.tasks[0].total, info="stopped: done")
