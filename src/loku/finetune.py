"""Plain supervised fine-tuning: how the demo and TOFU make a model that has memorized data to unlearn."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from .data.batches import PairedBatches


def finetune(model, features: list[dict], pad_id: int, *, epochs: int = 5, lr: float = 1e-5,
             batch_size: int = 8, grad_accum: int = 1, weight_decay: float = 0.0, warmup_steps: int = 0,
             seed: int = 0, mixed_precision: str | None = None, max_grad_norm: float = 1.0,
             callback: Callable[[int, torch.nn.Module], "dict | None"] | None = None,
             progress: bool = True, description: str = "fine-tune", out_dir: str | Path | None = None,
             tokenizer=None) -> list[dict]:
    """Cross-entropy training of every trainable parameter on `features`; returns one dict per epoch.
    `callback(epoch, model)` may return {"stop": True} to end early (e.g. once memorized). With `out_dir`,
    the trained model (and `tokenizer`) is written there whole, by the main process.

    Under `accelerate launch` each step takes a global batch of batch_size x processes and every process
    trains on its share, its loss scaled to its share of the global token mean: N processes equal one
    process with an N times larger batch, under DDP, FSDP and DeepSpeed alike."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    from . import io
    from .distributed import barrier, gathered_state, start_accelerator
    from .losses import cross_entropy, global_mean_scales
    from .train import _forward, _progress, shard

    set_seed(seed)
    accelerator, engine = start_accelerator(grad_accum, mixed_precision, batch_size)
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = PairedBatches(features, None, batch_size * world, pad_id, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = math.ceil(len(batches) / grad_accum) * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total)
    # The scheduler stays outside accelerate: it would step once per process, assuming a sharded loader.
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]   # FSDP2 replaced them with shards
    history = []
    with _progress(progress and accelerator.is_main_process) as bar:
        task = bar.add_task(description, total=len(batches) * epochs, info="")
        for epoch in range(epochs):
            model.train()
            t0, loss_sum, tokens = time.time(), 0.0, 0
            for batch, _ in batches.epoch(epoch):
                batch = shard(batch, rank, world, accelerator.device)
                with accelerator.accumulate(model):
                    loss = cross_entropy(_forward(model, batch), batch["labels"])
                    if world > 1:   # this process's share of the global token mean (gradients are averaged)
                        loss = loss * global_mean_scales("tokens", batch["labels"], None, lambda t: accelerator.reduce(
                            t, reduction="sum"), world)["forget"]
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                value = float(accelerator.reduce(loss.detach(), reduction="mean")) if world > 1 \
                    else float(loss.detach())
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
    prepared, model = model, accelerator.unwrap_model(model)
    model.eval()
    if out_dir is not None:
        state = gathered_state(accelerator, prepared) if engine else None   # collective under FSDP/DeepSpeed
        if accelerator.is_main_process:
            with io.atomic_dir(Path(out_dir)) as tmp:
                model.save_pretrained(tmp, safe_serialization=True, **({} if state is None else {"state_dict": state}))
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        barrier()
    return history
