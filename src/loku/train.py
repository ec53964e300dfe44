"""The unlearning loop: one explicit loop on accelerate that a reader can follow top to bottom."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import io
from .config import UnlearnConfig
from .data.batches import PairedBatches
from .data.text import load_examples, tokenize_examples
from .distributed import gathered_state, launch_precision, prepare_reference, requested_engine, start_accelerator
from .errors import LokuError
from .losses import LossInputs, Method, get_method, global_mean_scales, loss_units, method_loss
from .methods import MethodRun, set_trainable
from .methods.constrained import mean_retain_loss

_KILL_AT_STEP = int(os.environ.get("LOKU_TEST_KILL_AT_STEP", "0")) or None
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
    diverged_at_step: int | None = None  # ascent methods: first step past cfg.divergence_bound


def _as_examples(items: list) -> list[dict]:
    return [{"text": x} if isinstance(x, str) else dict(x) for x in items]


def load_data(cfg: UnlearnConfig, method: Method, forget: list | None = None, retain: list | None = None,
              refusals: list[str] | None = None) -> tuple[list[dict], list[dict] | None]:
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
    if method.forget_answers in ("idk", "idk-pair"):   # idk-pair (dpo): the answer stays, the refusal is preferred
        from .data.idk import refusals as read_refusals
        from .data.idk import with_refusals

        answers = refusals or (read_refusals(cfg.refusals) if cfg.refusals else None)
        forget = with_refusals(forget, seed=cfg.seed, answers=answers, keep_answer=method.forget_answers == "idk-pair")
    return forget, retain


def _forward(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def _alternates(batch: dict) -> dict | None:
    """DPO's preferred answers, row for row with the forget batch (None for other methods)."""
    return {k[4:]: v for k, v in batch.items() if k.startswith("alt_")} if "alt_input_ids" in batch else None


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def prepare_model(cfg: UnlearnConfig, model, batches: PairedBatches, progress: bool = True,
                  only: list[str] | None = None, adapters: bool = True):
    """Full fine-tuning, plain LoRA, or LoRA initialised from Fisher statistics (FILA / VILA). `only`: the
    modules the method trains alone (full fine-tuning of just those; LoRA targets unless --lora-targets);
    `adapters` False: no LoRA at all (t3 trains its own head)."""
    if not cfg.lora or not adapters:
        if only is None:
            model.requires_grad_(True)
        else:
            set_trainable(model, only)
        return model, None
    from .lora import add_lora, resolve_targets

    targets = resolve_targets(model, cfg.lora_targets or only)
    init = cfg.resolved_init
    if init in ("fila", "vila"):
        from .fila import fila_init

        pairs = list(batches.epoch(0))
        model, initial = fila_init(model, pairs, rank=cfg.lora_rank, alpha=cfg.alpha, target_modules=targets,
                                   method=init, eps=cfg.fisher_eps, svd=cfg.fila_svd, cache=cfg.fisher_cache,
                                   progress=progress, **({"device": "cpu"} if cfg.fisher_on_cpu and init == "fila"
                                                         else {}))
        return model, initial
    return add_lora(model, cfg.lora_rank, cfg.alpha, targets), None


def unlearn(cfg: UnlearnConfig, model=None, tokenizer=None, callbacks: list[EpochCallback] = (),
            progress: bool = True, forget: list | None = None, retain: list | None = None,
            resume: bool = False, refusals: list[str] | None = None) -> UnlearnResult:
    """Make `model` forget `cfg.forget` while keeping `cfg.retain`; writes the run to `cfg.out` if set.

    `forget`/`retain` lists (strings or question/answer dicts) replace the files. Each callback runs
    after every epoch with (epoch, model) and may return a dict of values to log; `{"stop": True}` ends
    the run (stop rules are plain callables). With `resume`, `cfg.out` holds a killed run of this
    config and training continues from its last checkpoint, ending exactly as an uninterrupted run."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    from .checkpoint import load_checkpoint, save_checkpoint

    t_start = time.time()
    method = get_method(cfg.method)
    forget_ex, retain_ex = load_data(cfg, method, forget, retain, refusals)
    if resume:
        out = _check_resumable(cfg)
    else:
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
    from .models import check_max_length, check_tokenizer_fits

    check_tokenizer_fits(model, tokenizer)
    check_max_length(model, cfg.max_length)
    set_seed(cfg.seed)
    forget = tokenize_examples(forget_ex, tokenizer, cfg.max_length, "forget", cfg.prompt_format)
    retain = (tokenize_examples(retain_ex, tokenizer, cfg.max_length, "retain", cfg.prompt_format)
              if retain_ex else None)
    # engine "FSDP" / "DeepSpeed": they place (and shard) the weights themselves
    accelerator, engine = start_accelerator(cfg.grad_accum, cfg.mixed_precision, cfg.batch_size)
    # One global batch of batch_size x processes per step, each process taking its share: N processes
    # see exactly the examples one process would see with an N times larger batch.
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = PairedBatches(forget, retain, cfg.batch_size * world, tokenizer.pad_token_id, cfg.seed,
                            (cfg.retain_batch_size or cfg.batch_size) * world)

    # FILA's Fisher pass on the accelerator, not on the CPU the weights loaded to. Under FSDP / DeepSpeed that is
    # one whole copy per GPU until the engine shards it, as under DDP (README: or take the statistics first).
    if engine is None or (cfg.lora and cfg.resolved_init in ("fila", "vila")):
        model.to(accelerator.device)
    # What the method prepares on the start model (lmcleaner's correction, lunar's direction, t3's head, ...).
    run = MethodRun(method, cfg)
    run.setup(model, tokenizer, forget_ex, retain_ex, next(model.parameters()).device, world)
    # The frozen start model for KL / NPO. Plain LoRA needs no copy: the base model with its adapters
    # switched off is the start model. FILA rewrites the base weights, and full fine-tuning moves them,
    # so those keep a frozen copy (prepared by the engine in use, e.g. sharded under ZeRO-3 / FSDP).
    reference = None
    if method.uses_reference(cfg) and not (cfg.lora and method.adapters and cfg.resolved_init == "default"):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.config.use_cache = False
    model, initial_factors = prepare_model(cfg, model, batches, progress and accelerator.is_main_process,
                                           run.trainable(), method.adapters)
    run.attach(model)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    updates_per_epoch = math.ceil(len(batches) / cfg.grad_accum)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, updates_per_epoch * cfg.epochs)
    # The scheduler stays outside accelerate: it would step once per process, assuming a sharded loader.
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP2 replaces the parameters with sharded ones: clip those (the list above would be stale, unclipped).
    params = [p for p in model.parameters() if p.requires_grad]
    if reference is not None:
        reference = prepare_reference(accelerator, reference)
    unwrapped = accelerator.unwrap_model(model)

    def reference_outputs(batch):
        """(logits, tapped hidden states) of the frozen start model."""
        if reference is not None:
            with run.capture(reference) as hidden:
                return _forward(reference, batch), hidden
        with unwrapped.disable_adapter(), run.capture(unwrapped) as hidden:
            return _forward(unwrapped, batch), hidden
    main = accelerator.is_main_process

    result = UnlearnResult(model=model, tokenizer=tokenizer, out=out)
    pos = {"epoch": 0, "next_step": 0, "global_step": 0, "sums": {}, "epoch_tokens": 0, "done": False}
    if resume:
        pos = load_checkpoint(out, model, optimizer.optimizer, scheduler, sharded=True) if engine == "FSDP" \
            else load_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler)
        result.history = pos.pop("history")
        _truncate_metrics(out / "metrics.jsonl", pos["global_step"], len(result.history))
        run.load_state_dict(pos.pop("method", {}), pos.pop("method_tensors", {}), accelerator.device)
    elif out is not None and main:
        io.start_out_dir(out, cfg.overwrite)
        io.write_text(out / "config.yaml", _resolved(cfg, model).to_yaml())
    metrics_log = (out / "metrics.jsonl").open("a") if out is not None and main else None

    def checkpoint(**state):
        method_values, method_tensors = run.state_dict()
        state = {**state, "history": result.history, "method": method_values}
        if out is None or engine == "DeepSpeed":   # DeepSpeed's optimizer state has its own format: no resume
            return
        if engine == "FSDP":   # collective: shards gathered to the main process, which writes
            save_checkpoint(out, model, optimizer.optimizer, scheduler, state, sharded=True,
                            method_tensors=method_tensors)
        elif main:
            save_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler, state,
                            method_tensors=method_tensors)

    step = pos["global_step"]
    with _progress(progress and main) as bar:
        task = bar.add_task(f"unlearn ({cfg.method})", total=len(batches) * cfg.epochs,
                            completed=pos["epoch"] * len(batches) + pos["next_step"], info="")
        for epoch in range(pos["epoch"], cfg.epochs if not pos["done"] else 0):
            model.train()
            resumed_here = epoch == pos["epoch"]
            sums: dict[str, float] = dict(pos["sums"]) if resumed_here else {}
            epoch_tokens = pos["epoch_tokens"] if resumed_here else 0
            t_epoch, t_tokens = time.time(), 0
            start = pos["next_step"] if resumed_here else 0
            for i, (forget_b, retain_b) in enumerate(batches.epoch(epoch, start), start=start):
                forget_b = shard(forget_b, rank, world, accelerator.device)
                n_tok = int(forget_b["attention_mask"].sum())
                retain_b = shard(retain_b, rank, world, accelerator.device) \
                    if retain_b is not None and method.needs_retain else None
                with accelerator.accumulate(model):
                    run.prestep(unwrapped, retain_b)
                    with run.capture(unwrapped) as hidden:
                        x = LossInputs(_forward(model, forget_b), forget_b["labels"], state=run.state,
                                       forget_attention=forget_b["attention_mask"], forget_hidden=hidden)
                    alt = _alternates(forget_b)
                    if alt is not None:
                        x.alt_logits, x.alt_labels = _forward(model, alt), alt["labels"]
                    if retain_b is not None:
                        n_tok += int(retain_b["attention_mask"].sum())
                        with run.capture(unwrapped) as hidden:
                            x.retain_logits, x.retain_labels = _forward(model, retain_b), retain_b["labels"]
                        x.retain_attention, x.retain_hidden = retain_b["attention_mask"], hidden
                    if method.uses_reference(cfg):
                        with torch.no_grad():
                            x.ref_forget_logits, x.ref_forget_hidden = reference_outputs(forget_b)
                            if x.retain_logits is not None:
                                x.ref_retain_logits, x.ref_retain_hidden = reference_outputs(retain_b)
                            if alt is not None:
                                x.ref_alt_logits = reference_outputs(alt)[0]
                    terms = method_loss(method, x, cfg)
                    if world > 1:   # each process's share of the global-batch mean, whatever the lengths
                        scales = global_mean_scales(loss_units(method, cfg), x.forget_labels, x.retain_labels,
                                                    lambda t: accelerator.reduce(t, reduction="sum"), world)
                        terms = {k: v * scales.get(k, 1.0) for k, v in terms.items() if k != "loss"}
                        terms = {"loss": sum(terms.values()), **terms}
                    _check_finite(terms, epoch, step, out)
                    run.backward(terms, accelerator.backward, params, accelerator.sync_gradients)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        if norm is not None and not torch.isfinite(torch.as_tensor(norm)):  # None: DeepSpeed clips
                            raise LokuError(f"gradient norm became {float(norm)} at epoch {epoch + 1} step "
                                            f"{step + 1}: lower --lr or check the data{_kept(out)}")
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                epoch_tokens += n_tok
                t_tokens += n_tok
                values = _floats(terms if world == 1 else _mean_over_ranks(accelerator, terms))
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                tps = t_tokens / max(time.time() - t_epoch, 1e-9)
                record = {"kind": "step", "epoch": epoch + 1, "step": step, **values,
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1)}
                if method.ascent and -values["forget"] > cfg.divergence_bound:
                    # Ascent has no floor: past the bound the model is being wrecked, not made to forget.
                    record["warning"] = "diverged"
                    if result.diverged_at_step is None:
                        result.diverged_at_step = step
                        bar.console.print(f"[yellow]warning[/]: {cfg.method} diverged at epoch {epoch + 1} step "
                                          f"{step}: forget cross-entropy {-values['forget']:.1f} nats > "
                                          f"{cfg.divergence_bound:g}; lower --lr or --epochs, or use a bounded "
                                          "method (ihl, npo)")
                if metrics_log:
                    metrics_log.write(json.dumps(record) + "\n")
                    metrics_log.flush()
                bar.update(task, advance=1, info=f"loss {values['loss']:.4f}  {tps:,.0f} tok/s")
                if _KILL_AT_STEP == step:  # fault injection for the kill-and-resume test
                    os.kill(os.getpid(), signal.SIGKILL)
                if cfg.save_every and step % cfg.save_every == 0 and accelerator.sync_gradients \
                        and i + 1 < len(batches):
                    checkpoint(epoch=epoch, next_step=i + 1, global_step=step, sums=sums,
                               epoch_tokens=epoch_tokens, done=False)
            n = len(batches)
            run.epoch_end(epoch + 1, lambda: mean_retain_loss(unwrapped, batches.epoch(epoch), accelerator.device))
            epoch_record = {"kind": "epoch", "epoch": epoch + 1, **{k: v / n for k, v in sums.items()},
                            "seconds": round(time.time() - t_epoch, 2),
                            "tokens_per_s": round(t_tokens / max(time.time() - t_epoch, 1e-9), 1)}
            stop = False
            for cb in callbacks:
                model.eval()
                extra = cb(epoch + 1, accelerator.unwrap_model(model)) or {}
                stop = stop or bool(extra.pop("stop", False))
                epoch_record.update(extra)
            result.history.append(epoch_record)
            if metrics_log:
                metrics_log.write(json.dumps(epoch_record, default=float) + "\n")
                metrics_log.flush()
            checkpoint(epoch=epoch + 1, next_step=0, global_step=step, sums={}, epoch_tokens=0,
                       done=stop or epoch + 1 == cfg.epochs)
            if stop:
                bar.update(task, completed=len(batches) * cfg.epochs, info="stopped: done")
                break
    result.epochs_run = len(result.history)
    result.stopped_early = result.epochs_run < cfg.epochs
    if metrics_log:
        metrics_log.close()
    prepared, model = model, accelerator.unwrap_model(model)
    model.eval()
    result.model = model
    if out is not None:
        # Under FSDP / DeepSpeed each process holds shards: gather them (collectively) for the main one to save.
        state = gathered_state(accelerator, prepared, trainable_only=cfg.lora and not cfg.save_merged) \
            if engine else None
        if main:
            save_run(cfg, model, tokenizer, out, initial_factors, state, run)
    result.seconds = time.time() - t_start
    return result


def resume_run(run_dir: str | Path, **kwargs) -> UnlearnResult:
    """Continue a killed `loku unlearn` run from its directory (its config.yaml and last checkpoint)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise LokuError(f"{run_dir} is not a loku run directory (no config.yaml): check the path")
    cfg = UnlearnConfig.from_yaml(run_dir / "config.yaml")
    cfg.out = str(run_dir)
    return unlearn(cfg, resume=True, **kwargs)


def _check_resumable(cfg: UnlearnConfig) -> Path:
    out = Path(cfg.out)
    if requested_engine() == "DeepSpeed":
        raise LokuError("resuming is not available under DeepSpeed (loku writes no checkpoints there: its "
                        "optimizer state has its own format): start the run again, or use FSDP "
                        "(configs/accelerate/fsdp.yaml), whose checkpoints resume")
    if (out / io.MANIFEST).is_file():
        raise LokuError(f"run {out} is already complete (it has {io.MANIFEST}): nothing to resume")
    if not (out / "checkpoint" / "state.json").is_file():
        raise LokuError(f"{out} has no checkpoint to resume from (it was killed before the first one): "
                        "delete it and start again")
    return out


def _truncate_metrics(path: Path, global_step: int, epochs_done: int) -> None:
    """Drop log lines written after the checkpoint; the resumed run writes them again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if (r.get("kind") == "step" and r["step"] <= global_step) or \
                (r.get("kind") == "epoch" and r["epoch"] <= epochs_done):
            keep.append(line)
    io.write_text(path, "".join(k + "\n" for k in keep))


def _kept(out: Path | None) -> str:
    return f"; the last good checkpoint is kept in {out}/checkpoint" if out is not None else ""


def _check_finite(terms: dict[str, torch.Tensor], epoch: int, step: int, out: Path | None) -> None:
    """Stop on NaN/inf, naming the step and the loss term, rather than training on garbage."""
    bad = [k for k, v in terms.items() if not torch.isfinite(v)]
    if bad:
        name = next((k for k in bad if k != "loss"), "loss")
        raise LokuError(f"loss term {name!r} became {float(terms[name])} at epoch {epoch + 1} step {step + 1} "
                        f"(terms: {_floats(terms)}): lower --lr or check the data{_kept(out)}")


def shard(batch: dict[str, torch.Tensor], rank: int, world: int, device) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch (rows rank, rank + world, ...). A last batch too small to
    give every process a row repeats its first rows, as accelerate's even_batches does."""
    n = batch["input_ids"].shape[0]
    rows = list(range(rank, n, world)) or [rank % n]
    return {k: v[rows].to(device) for k, v in batch.items()}


def _mean_over_ranks(accelerator, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stacked = torch.stack([v.detach().float() for v in terms.values()]).to(accelerator.device)
    return dict(zip(terms, accelerator.reduce(stacked, reduction="mean")))


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
    resolved.mixed_precision = launch_precision(cfg.mixed_precision)
    return resolved


def save_run(cfg: UnlearnConfig, model, tokenizer, out: Path, initial_factors=None, state=None,
             run: MethodRun | None = None) -> None:
    """Adapter (for the ORIGINAL model), optional merged model, tokenizer; manifest last. `state`: the
    model's full state dict (gathered from FSDP / DeepSpeed shards), saved in place of its own weights.
    `run`: the method's part (t3 writes its head and no model: the model is unchanged; a method that edits the
    base weights, lmcleaner, always writes the merged model: an adapter alone would miss its correction)."""
    given = {} if state is None else {"state_dict": state}
    method = run.method if run is not None else get_method(cfg.method)
    if run is not None:
        run.save(model, out)
    if method.adapters and cfg.lora:
        with io.atomic_dir(out / "adapter") as tmp:
            if initial_factors is not None:
                from .fila import export_original_adapter

                export_original_adapter(model, initial_factors, tmp, state_dict=state)
            else:
                model.save_pretrained(tmp, **given)
    if method.adapters and (cfg.save_merged or not cfg.lora or method.edits_base):
        with io.atomic_dir(out / "model") as tmp:
            if cfg.lora and state is not None:   # merged from the gathered tensors; the shards stay as they are
                from .fila import save_merged

                save_merged(model, tmp, state_dict=state)
            else:
                merged = model.merge_and_unload() if cfg.lora else model
                merged.save_pretrained(tmp, safe_serialization=True, **given)
            tokenizer.save_pretrained(tmp)
    with io.atomic_dir(out / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    io.write_manifest(out)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # the run is complete; nothing left to resume
