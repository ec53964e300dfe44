"""Plain supervised fine-tuning: how the demo and TOFU make a model that has memorized data to unlearn."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .data.batches import PairedBatches


def finetune(model, features: list[dict], pad_id: int, *, epochs: int = 5, lr: float = 1e-5,
             batch_size: int = 8, grad_accum: int = 1, weight_decay: float = 0.0, warmup_steps: int = 0,
             seed: int = 0, mixed_precision: str | None = None, max_grad_norm: float = 1.0,
             callback: Callable[[int, torch.nn.Module], "dict | None"] | None = None,
             progress: bool = True, description: str = "fine-tune") -> list[dict]:
    """Cross-entropy training of every trainable parameter on `features`; returns one dict per epoch.
    `callback(epoch, model)` may return {"stop": True} to end early (e.g. once memorized)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    from .distributed import launch_precision
    from .losses import cross_entropy
    from .train import _forward, _progress

    set_seed(seed)
    batches = PairedBatches(features, None, batch_size, pad_id, seed)
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=launch_precision(mixed_precision),
                              cpu=not torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = math.ceil(len(batches) / grad_accum) * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total)
    # The scheduler stays outside accelerate: it would step once per process, assuming a sharded loader.
    model, optimizer = accelerator.prepare(model, optimizer)
    history = []
    with _progress(progress and accelerator.is_main_process) as bar:
        task = bar.add_task(description, total=len(batches) * epochs, info="")
        for epoch in range(epochs):
            model.train()
            t0, loss_sum, tokens = time.time(), 0.0, 0
            for batch, _ in batches.epoch(epoch):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    loss = cross_entropy(_forward(model, batch), batch["labels"])
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                value = float(loss.detach())
                loss_sum += value
                tokens += int(batch["attention_mask"].sum())
                bar.update(task, advance=1, info=f"loss {value:.4f}")
            record = {"epoch": epoch + 1, "loss": loss_sum / len(batches), "seconds": round(time.time() - t0, 2),
                      "tokens_per_s": round(tokens / max(time.time() - t0, 1e-9), 1)}
            stop = False
            if callback is not None:
                model.eval()
                extra = callback(epoch + 1, accelerator.unwrap_model(model)) or {}
                stop = bool(extra.pop("stop", False))
                record.update(extra)
            history.append(record)
            if stop:
                bar.update(task, completed=len(batches) * epochs)
                break
    accelerator.unwrap_model(model).eval()
    return history
