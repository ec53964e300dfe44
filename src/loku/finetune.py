"""Plain supervised fine-tuning: how the demo and TOFU make a model that has memorized data to unlearn (and
how an audit relearns forgotten data). It runs through the same loop as unlearning (`loku.training`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from . import io
from .data.batches import PairedBatches
from .distributed import barrier, gathered_state, is_main
from .training.loop import RunLog, train_loop
from .training.setup import TrainSettings, prepare_optimizer, start
from .methods import MethodRun
from .training.step import FINE_TUNING, FINE_TUNING_MIXED, OptimizerStep


def finetune(model, features: list[dict], pad_id: int, *, epochs: int = 5, lr: float = 1e-5,
             batch_size: int = 8, grad_accum: int = 1, weight_decay: float = 0.0, warmup_steps: int = 0,
             seed: int = 0, mixed_precision: str | None = None, max_grad_norm: float = 1.0,
             callback: Callable[[int, torch.nn.Module], "dict | None"] | None = None,
             progress: bool = True, description: str = "fine-tune", out_dir: str | Path | None = None,
             tokenizer=None, mixed: list[dict] | None = None) -> list[dict]:
    """Cross-entropy training of every trainable parameter of `model` on `features`, IN PLACE (the demo and
    TOFU train a model they loaded for it; `finetuned_copy` leaves its input as it was). Returns one dict per
    epoch. `callback(epoch, model)` may return {"stop": True} to end early (e.g. once memorized). With
    `out_dir`, the trained model (and `tokenizer`) is written there whole. Under `accelerate launch`, N
    processes equal one with an N times larger batch (DDP, FSDP, DeepSpeed), as for unlearning. With `mixed`
    (e.g. general text), each batch of `features` comes with a batch drawn from a shuffled stream of `mixed`
    that cycles across epochs (unlearning's retain stream), its cross-entropy added: a large mixed set is seen
    a little at a time instead of repeated every epoch."""
    settings = TrainSettings(epochs, lr, batch_size, grad_accum, weight_decay, warmup_steps, max_grad_norm, seed,
                             mixed_precision)
    accelerator, engine = start(settings)
    batches = PairedBatches(features, mixed, batch_size * accelerator.num_processes, pad_id, seed)
    steps = batches.steps_per_epoch(grad_accum)
    prepared, optimizer, scheduler = prepare_optimizer(accelerator, model, settings, steps)
    run = MethodRun(FINE_TUNING_MIXED if mixed else FINE_TUNING, None)
    step = OptimizerStep(accelerator, prepared, optimizer, scheduler, run, max_grad_norm=max_grad_norm)
    with RunLog(description, steps * epochs, show=progress and accelerator.is_main_process) as log:
        at = train_loop(step, batches, settings, log, [callback] if callback else [])
    state = gathered_state(accelerator, prepared) if out_dir is not None and engine else None   # collective
    accelerator.unwrap_model(prepared).eval()
    if out_dir is not None:
        save_model_dir(accelerator.unwrap_model(prepared), tokenizer, out_dir, state)
    return at.history


def finetuned_copy(model, features: list[dict], pad_id: int, **kwargs):
    """(a fine-tuned copy of `model`, its history), leaving `model` as it was: e.g. a relearning attack on an
    unlearned model. Takes `finetune`'s keyword arguments."""
    trained = copy.deepcopy(model)
    return trained, finetune(trained, features, pad_id, **kwargs)


def save_model_dir(model, tokenizer, out_dir: str | Path, state=None) -> None:
    """The whole trained model (and its tokenizer) as one new directory, written by the main process."""
    if is_main():
        with io.atomic_dir(Path(out_dir)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, **({} if state is None else {"state_dict": state}))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    barrier()
