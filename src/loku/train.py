"""The unlearning loop: one explicit loop on accelerate that a reader can follow top to bottom."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import io
from .config import UnlearnConfig
from .data.batches import PairedBatches
from .data.text import load_examples, tokenize_examples
from .errors import LokuError
from .losses import LossInputs, LossSettings, Method, get_method

EpochCallback = Callable[[int, torch.nn.Module], "dict | None"]


@dataclass
class UnlearnResult:
    model: torch.nn.Module
    tokenizer: object
    history: list[dict] = field(default_factory=list)  # one dict per epoch (losses + callback values)
    epochs_run: int = 0
    stopped_early: bool = False
    out: Path | None = None
    seconds: float = 0.0


def _as_examples(items: list) -> list[dict]:
    return [{"text": x} if isinstance(x, str) else dict(x) for x in items]


def load_data(cfg: UnlearnConfig, method: Method, forget: list | None = None,
              retain: list | None = None) -> tuple[list[dict], list[dict] | None]:
    """Read (not yet tokenize) forget and retain examples, failing before anything heavy happens.
    In-memory lists (strings or {"question", "answer"} dicts) take the place of the files."""
    if forget is not None:
        forget = _as_examples(forget)
    elif cfg.forget:
        forget = load_examples(cfg.forget, cfg.text_column)
    else:
        raise LokuError("no forget set given: pass --forget FILE")
    if not forget:
        raise LokuError("the forget set is empty: give at least one example")
    if retain is not None:
        retain = _as_examples(retain) or None
    elif cfg.retain:
        retain = load_examples(cfg.retain, cfg.text_column)
    if method.needs_retain and not retain:
        raise LokuError(f"method {method.name!r} needs a retain set: pass --retain FILE (or use --method ga)")
    if method.forget_answers == "idk":
        from .data.idk import with_refusals

        forget = with_refusals(forget, seed=cfg.seed)
    return forget, retain


def _forward(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def prepare_model(cfg: UnlearnConfig, model, batches: PairedBatches):
    """Full fine-tuning, plain LoRA, or LoRA initialised from Fisher statistics (FILA / VILA)."""
    if not cfg.lora:
        model.requires_grad_(True)
        return model, None
    from .lora import add_lora, resolve_targets

    targets = resolve_targets(model, cfg.lora_targets)
    init = cfg.resolved_init
    if init in ("fila", "vila"):
        from .fila import fila_init

        pairs = list(batches.epoch(0))
        model, initial = fila_init(model, pairs, rank=cfg.lora_rank, alpha=cfg.alpha, target_modules=targets,
                                   method=init, eps=cfg.fisher_eps)
        return model, initial
    return add_lora(model, cfg.lora_rank, cfg.alpha, targets), None


def unlearn(cfg: UnlearnConfig, model=None, tokenizer=None, callbacks: list[EpochCallback] = (),
            progress: bool = True, forget: list | None = None, retain: list | None = None) -> UnlearnResult:
    """Make `model` forget `cfg.forget` while keeping `cfg.retain`; writes the run to `cfg.out` if set.

    Each callback runs after every epoch with (epoch, model) and may return a dict of values to log;
    `{"stop": True}` ends the run (stop rules are plain callables)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    t_start = time.time()
    method = get_method(cfg.method)
    forget_ex, retain_ex = load_data(cfg, method, forget, retain)
    out = io.check_out_dir(cfg.out, cfg.overwrite) if cfg.out else None
    if model is None:
        from .models import load_model

        model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                      allow_pickle=cfg.allow_pickle)
    elif tokenizer is None:
        raise LokuError("a model object was given without its tokenizer: pass tokenizer= too")
    else:
        from .models import ensure_pad_token

        ensure_pad_token(tokenizer)
    set_seed(cfg.seed)
    forget = tokenize_examples(forget_ex, tokenizer, cfg.max_length, "forget")
    retain = tokenize_examples(retain_ex, tokenizer, cfg.max_length, "retain") if retain_ex else None
    batches = PairedBatches(forget, retain, cfg.batch_size, tokenizer.pad_token_id, cfg.seed,
                            cfg.retain_batch_size)

    reference = None
    if method.needs_reference:  # the frozen start model, for KL / NPO
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.config.use_cache = False
    model, initial_factors = prepare_model(cfg, model, batches)
    model.train()

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                              cpu=not torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    updates_per_epoch = math.ceil(len(batches) / cfg.grad_accum)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, updates_per_epoch * cfg.epochs)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if reference is not None:
        reference = reference.to(accelerator.device)
    settings = LossSettings(cfg.retain_weight, cfg.npo_beta, cfg.simnpo_beta, cfg.simnpo_gamma)

    if out is not None and accelerator.is_main_process:
        io.start_out_dir(out, cfg.overwrite)
        io.write_text(out / "config.yaml", _resolved(cfg, model).to_yaml())
    metrics_log = (out / "metrics.jsonl").open("a") if out is not None and accelerator.is_main_process else None

    result = UnlearnResult(model=model, tokenizer=tokenizer, out=out)
    step, tokens_seen = 0, 0
    with _progress(progress and accelerator.is_main_process) as bar:
        task = bar.add_task(f"unlearn ({cfg.method})", total=len(batches) * cfg.epochs, info="")
        for epoch in range(cfg.epochs):
            model.train()
            sums: dict[str, float] = {}
            t_epoch, epoch_tokens = time.time(), 0
            for forget_b, retain_b in batches.epoch(epoch):
                forget_b = {k: v.to(accelerator.device) for k, v in forget_b.items()}
                n_tok = int(forget_b["attention_mask"].sum())
                with accelerator.accumulate(model):
                    x = LossInputs(_forward(model, forget_b), forget_b["labels"])
                    if retain_b is not None and method.needs_retain:
                        retain_b = {k: v.to(accelerator.device) for k, v in retain_b.items()}
                        n_tok += int(retain_b["attention_mask"].sum())
                        x.retain_logits, x.retain_labels = _forward(model, retain_b), retain_b["labels"]
                    if reference is not None:
                        with torch.no_grad():
                            x.ref_forget_logits = _forward(reference, forget_b)
                            if x.retain_logits is not None:
                                x.ref_retain_logits = _forward(reference, retain_b)
                    terms = method.fn(x, settings)
                    loss = terms["loss"]
                    if not torch.isfinite(loss):
                        raise LokuError(f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1} "
                                        f"(terms: {_floats(terms)}): lower --lr or check the data")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += n_tok
                epoch_tokens += n_tok
                values = _floats(terms)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                tps = epoch_tokens / max(time.time() - t_epoch, 1e-9)
                record = {"kind": "step", "epoch": epoch + 1, "step": step, **values,
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1)}
                if metrics_log:
                    metrics_log.write(json.dumps(record) + "\n")
                    metrics_log.flush()
                bar.update(task, advance=1, info=f"loss {values['loss']:.4f}  {tps:,.0f} tok/s")
            n = len(batches)
            epoch_record = {"kind": "epoch", "epoch": epoch + 1, **{k: v / n for k, v in sums.items()},
                            "seconds": round(time.time() - t_epoch, 2),
                            "tokens_per_s": round(epoch_tokens / max(time.time() - t_epoch, 1e-9), 1)}
            stop = False
            for cb in callbacks:
                model.eval()
                extra = cb(epoch + 1, accelerator.unwrap_model(model)) or {}
                stop = stop or bool(extra.pop("stop", False))
                epoch_record.update(extra)
            result.history.append(epoch_record)
            result.epochs_run = epoch + 1
            if metrics_log:
                metrics_log.write(json.dumps(epoch_record, default=float) + "\n")
                metrics_log.flush()
            if stop:
                result.stopped_early = epoch + 1 < cfg.epochs
                break
    if metrics_log:
        metrics_log.close()
    model = accelerator.unwrap_model(model)
    model.eval()
    result.model = model
    if out is not None and accelerator.is_main_process:
        save_run(cfg, model, tokenizer, out, initial_factors)
        result.model = model
    result.seconds = time.time() - t_start
    return result


def _floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}


def _resolved(cfg: UnlearnConfig, model) -> UnlearnConfig:
    """The config with defaults made explicit, so the saved YAML reruns the same thing anywhere."""
    resolved = copy.deepcopy(cfg)
    if cfg.lora:
        resolved.lora_alpha = cfg.alpha
        resolved.init = cfg.resolved_init
        if resolved.lora_targets is None and hasattr(model, "peft_config"):
            resolved.lora_targets = sorted(next(iter(model.peft_config.values())).target_modules)
    resolved.overwrite = False
    return resolved


def save_run(cfg: UnlearnConfig, model, tokenizer, out: Path, initial_factors=None) -> None:
    """Adapter (for the ORIGINAL model), optional merged model, tokenizer; manifest last."""
    if cfg.lora:
        with io.atomic_dir(out / "adapter") as tmp:
            if initial_factors is not None:
                from .fila import export_original_adapter

                export_original_adapter(model, initial_factors, tmp)
            else:
                model.save_pretrained(tmp)
    if cfg.save_merged or not cfg.lora:
        merged = model.merge_and_unload() if cfg.lora else model
        with io.atomic_dir(out / "model") as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    with io.atomic_dir(out / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    io.write_manifest(out)
