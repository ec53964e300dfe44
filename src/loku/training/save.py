"""Writing a finished run: its resolved config, the adapter (for the ORIGINAL model), the merged or whole model."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from .. import io
from ..distributed import barrier, gathered_state, is_main, launch_precision
from ..fila import export_original_adapter, save_merged
from ..lora import LoraPlan
from .checkpoints import NAME


def resolved_config(cfg, plan: LoraPlan | None):
    """The config with defaults made explicit, so the saved YAML reruns the same thing anywhere."""
    resolved = copy.deepcopy(cfg)
    if plan is not None:
        resolved.lora_alpha, resolved.init, resolved.lora_targets = plan.alpha, cfg.resolved_init, list(plan.targets)
    resolved.overwrite = False
    resolved.mixed_precision = launch_precision(cfg.mixed_precision)
    return resolved


def full_state(accelerator, prepared, engine: str | None, trainable_only: bool = False):
    """The model's full state dict gathered from FSDP / DeepSpeed shards (collective: every process calls it),
    None when the model is whole in every process."""
    return gathered_state(accelerator, prepared, trainable_only=trainable_only) if engine else None


def save_run(cfg, model, tokenizer, out: Path, initial_factors=None, state=None) -> None:
    """Adapter (for the ORIGINAL model), optional merged model, tokenizer; manifest last. `state`: the
    model's full state dict (gathered from FSDP / DeepSpeed shards), saved in place of its own weights."""
    given = {} if state is None else {"state_dict": state}
    if cfg.lora:
        with io.atomic_dir(out / "adapter") as tmp:
            if initial_factors is not None:
                export_original_adapter(model, initial_factors, tmp, state_dict=state)
            else:
                model.save_pretrained(tmp, **given)
    if cfg.save_merged or not cfg.lora:
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
    shutil.rmtree(out / NAME, ignore_errors=True)  # the run is complete; nothing left to resume


def save_model_dir(model, tokenizer, out_dir: str | Path, state=None) -> None:
    """The whole trained model (and its tokenizer) as one new directory, written by the main process."""
    if is_main():
        with io.atomic_dir(Path(out_dir)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, **({} if state is None else {"state_dict": state}))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    barrier()
