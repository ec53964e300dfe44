"""The one training loop: unlearning (`loku.train.unlearn`) and plain fine-tuning (`loku.finetune`) both run
here, one optimizer step per iteration, from a fresh start or a checkpoint's position."""

from __future__ import annotations

import time
from typing import Sequence

from ..data.batches import PairedBatches
from .checkpoints import Checkpoints, Position, kill_switch
from .log import EpochCallback, RunLog, epoch_callbacks
from .setup import TrainSettings
from .step import OptimizerStep


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
            kill_switch(at.step)
            if checkpoints and settings.save_every and at.step % settings.save_every == 0 \
                    and at.next_batch < len(batches):
                checkpoints.save(at)
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
