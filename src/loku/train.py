"""Unlearning: read the forget (and retain) data, set the run up, train it in the one loop, save it.
The pieces live in `loku.training` (setup, step, loop, log, checkpoints, save)."""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import io
from .config import UnlearnConfig
from .data.retain import settle_retain
from .data.text import load_examples
from .distributed import gathered_state, launch_precision
from .errors import LokuError
from .fila import export_original_adapter, save_merged
from .lora import LoraPlan
from .methods import Method, MethodRun, get_method
from .models import model_device
from .training.checkpoints import NAME as CHECKPOINT, Checkpoints, check_resumable
from .training.loop import EpochCallback, RunLog, train_loop
from .training.setup import (FrozenReference, TrainSettings, frozen_copy, model_to_train, place_model,
                             prepare_optimizer, prepare_policy, run_batches, start)
from .training.step import OptimizerStep


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
    In-memory lists (strings, {"question", "answer"} or tokenized {"input_ids", "labels"} dicts) take the place
    of the files."""
    if forget is not None:
        forget = _as_examples(forget)
    elif cfg.forget:
        forget = load_examples(cfg.forget, cfg.text_column)
    else:
        raise LokuError("no forget set given: pass --forget FILE")
    if not forget:
        raise LokuError("the forget set is empty: give at least one example")
    # the list or file, else built-in general text for a method that needs one; refuses shared examples
    retain = settle_retain(cfg, method.needs_retain, forget, _as_examples(retain) if retain is not None else None)
    if retain and cfg.retain_every_step and len(retain) <= cfg.retain_every_step:
        raise LokuError(f"--retain-every-step {cfg.retain_every_step} keeps that many retain examples in every batch "
                        f"and streams the rest: it needs a retain set larger than that (this one has {len(retain)}); "
                        "pass --retain-batch-size to keep the whole set every step instead")
    if method.forget_answers in ("idk", "idk-pair"):   # idk-pair (dpo): the answer stays, the refusal is preferred
        from .data.idk import refusals as read_refusals
        from .data.idk import with_refusals

        answers = refusals or (read_refusals(cfg.refusals) if cfg.refusals else None)
        forget = with_refusals(forget, seed=cfg.seed, answers=answers, keep_answer=method.forget_answers == "idk-pair")
    return forget, retain


def unlearn(cfg: UnlearnConfig, model=None, tokenizer=None, callbacks: list[EpochCallback] = (),
            progress: bool = True, forget: list | None = None, retain: list | None = None,
            resume: bool = False, refusals: list[str] | None = None, inplace: bool = False) -> UnlearnResult:
    """Make a model forget `cfg.forget` while keeping `cfg.retain`; writes the run to `cfg.out` if set.

    `model` (with its `tokenizer`) replaces `cfg.model`; it is left as it was (a copy is trained) unless
    `inplace`. `forget`/`retain` lists (strings or question/answer dicts) replace the files. Each callback
    runs after every epoch with (epoch, model) and may return a dict of values to log; `{"stop": True}`
    ends the run (stop rules are plain callables). With `resume`, `cfg.out` holds a killed run of this
    config and training continues from its last checkpoint, ending exactly as an uninterrupted run."""
    t_start = time.time()
    method = get_method(cfg.method)
    forget_ex, retain_ex = load_data(cfg, method, forget, retain, refusals)
    until = read_until(cfg, forget)   # --unseen checked before the model loads
    out = check_resumable(cfg) if resume else io.check_out_dir(cfg.out, cfg.overwrite) if cfg.out else None
    model, tokenizer = model_to_train(cfg, model, tokenizer, inplace)
    settings, run = TrainSettings.of(cfg), MethodRun(method, cfg)
    accelerator, engine = start(settings)   # engine "FSDP" / "DeepSpeed": they place (and shard) the weights
    batches = run_batches(cfg, forget_ex, retain_ex, tokenizer, accelerator.num_processes)
    main = accelerator.is_main_process
    model = place_model(cfg, model, accelerator, engine)
    # --until forgotten: the never-seen level is the model's before any training (also when resuming)
    rule = until.start(cfg, model, tokenizer, log=print if progress and main else None) if until else None
    callbacks = [*callbacks, rule] if rule else callbacks
    run.setup(model, tokenizer, forget_ex, retain_ex, model_device(model), accelerator.num_processes)
    model, plan, initial_factors = prepare_policy(cfg, model, batches, progress and main, run.trainable(),
                                                  method.adapters)
    frozen = frozen_copy(method, cfg, model)
    run.attach(model)
    steps_per_epoch = batches.steps_per_epoch(cfg.grad_accum)
    model, optimizer, scheduler = prepare_optimizer(accelerator, model, settings, steps_per_epoch)
    reference = FrozenReference(accelerator, model, run, frozen, batches.constant_retain) \
        if method.uses_reference(cfg) else None
    kept = f"; the last good checkpoint is kept in {out}/checkpoint" if out is not None else ""
    step = OptimizerStep(accelerator, model, optimizer, scheduler, run, reference, cfg.max_grad_norm, kept)
    checkpoints = Checkpoints(out, accelerator, engine, model, optimizer, scheduler, run) if out is not None else None
    at = checkpoints.load() if resume else None
    if out is not None and main and not resume:
        io.start_out_dir(out, cfg.overwrite)
        io.write_text(out / "config.yaml", resolved_config(cfg, plan).to_yaml())
    with RunLog(f"unlearn ({cfg.method})", steps_per_epoch * cfg.epochs, at.step if at else 0, show=progress and main,
                metrics=out / "metrics.jsonl" if out is not None and main else None,
                divergence_bound=cfg.divergence_bound if method.ascent else None) as log:
        at = train_loop(step, batches, settings, log, callbacks, checkpoints, at)
    state = gathered_state(accelerator, model, trainable_only=cfg.lora and not (cfg.save_merged or method.edits_base)) \
        if out is not None and engine else None   # collective: shards gathered to the main process
    model = accelerator.unwrap_model(model).eval()
    if out is not None and main:
        if rule is not None:   # before save_run, whose manifest lists it
            rule.save(out, at.history)
        save_run(cfg, run, model, tokenizer, out, initial_factors, state)
    return UnlearnResult(model, tokenizer, at.history, len(at.history), len(at.history) < cfg.epochs, out,
                         time.time() - t_start, log.diverged_at_step)


def read_until(cfg: UnlearnConfig, forget: list | None):
    """`--until forgotten`'s inputs (loku.audit.stop.UntilForgotten), or None without the rule."""
    if not cfg.until:
        return None
    # loku.audit imports scikit-learn and scipy (~2 s at CLI start): only when the rule is asked for
    from .audit.stop import UntilForgotten

    return UntilForgotten.read(cfg, forget)


def resume_run(run_dir: str | Path, **kwargs) -> UnlearnResult:
    """Continue a killed `loku unlearn` run from its directory (its config.yaml and last checkpoint)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise LokuError(f"{run_dir} is not a loku run directory (no config.yaml): check the path")
    cfg = UnlearnConfig.from_yaml(run_dir / "config.yaml")
    cfg.out = str(run_dir)
    return unlearn(cfg, resume=True, **kwargs)


def resolved_config(cfg, plan: LoraPlan | None):
    """The config with defaults made explicit, so the saved YAML reruns the same thing anywhere."""
    resolved = copy.deepcopy(cfg)
    if plan is not None:
        resolved.lora_alpha, resolved.init, resolved.lora_targets = plan.alpha, cfg.resolved_init, list(plan.targets)
    resolved.overwrite = False
    resolved.mixed_precision = launch_precision(cfg.mixed_precision)
    return resolved


def save_run(cfg, run: MethodRun, model, tokenizer, out: Path, initial_factors=None, state=None) -> None:
    """Adapter (for the ORIGINAL model), optional merged model, tokenizer; manifest last. `state`: the
    model's full state dict (gathered from FSDP / DeepSpeed shards), saved in place of its own weights.
    `run`: the method's part (t3 writes its head and no model: the model is unchanged; a method that edits the
    base weights, lmcleaner, always writes the merged model: an adapter alone would miss its correction)."""
    given = {} if state is None else {"state_dict": state}
    method = run.method
    run.save(model, out)
    if method.adapters and cfg.lora:
        with io.atomic_dir(out / "adapter") as tmp:
            if initial_factors is not None:
                export_original_adapter(model, initial_factors, tmp, state_dict=state)
            else:
                model.save_pretrained(tmp, **given)
    if method.adapters and (cfg.save_merged or not cfg.lora or method.edits_base):
        with io.atomic_dir(out / "model") as tmp:
            if cfg.lora and state is not None:   # merged from the gathered tensors; the shards stay as they are
                save_merged(model, tmp, state_dict=state)
            else:
                merged = model.merge_and_unload() if cfg.lora else model
                merged.save_pretrained(tmp, safe_serialization=True, **given)
            tokenizer.save_pretrained(tmp)
    with io.atomic_dir(out / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    io.write_manifest(out)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)  # the run is complete; nothing left to resume
