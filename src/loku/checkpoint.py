"""Checkpoints that let a killed run continue exactly where it was.

A checkpoint is a directory written whole (temporary name, then rename): the trainable weights
(safetensors), optimizer and scheduler states, RNG states, the data position and the epoch history.
Everything is loaded back with `torch.load(weights_only=True)`: no pickled code is ever executed.
Under FSDP the weights and optimizer state are gathered whole to the main process (torch.distributed.
checkpoint's full state dicts), so a checkpoint is the same file whatever the number of processes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import io
from .errors import LokuError

NAME = "checkpoint"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, sharded: bool = False,
                    method_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """`state`: JSON-able position (epoch, step, ...) and history. `sharded` (FSDP): every process calls
    this with the prepared model and its torch optimizer; the main process writes. `method_tensors`: what the
    method keeps between steps (gru's retain-gradient average), given back as state["method_tensors"]."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from .distributed import is_main

        options = _full_options(cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        if not is_main():
            return
    else:
        weights, optim = trainable_state(model), optimizer.state_dict()
    with io.atomic_dir(Path(run_dir) / NAME) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(),
                    "rng_torch": torch.get_rng_state(), "rng_numpy": _numpy_rng(),
                    "rng_python": _python_rng(), "method": method_tensors or {}}, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, default=float))


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, sharded: bool = False) -> dict:
    """Restores weights, optimizer, scheduler and RNG in place; returns the saved position and history.
    `sharded` (FSDP): every process calls this with the prepared model and its torch optimizer and takes
    its own shards of the saved whole tensors."""
    ckpt = Path(run_dir) / NAME
    if not (ckpt / "state.json").is_file():
        raise LokuError(f"{run_dir} has no checkpoint to resume from (it was killed before the first one): "
                        "delete it and start again")
    try:
        weights = load_file(str(ckpt / "trainable.safetensors"))
        training = torch.load(ckpt / "training_state.pt", weights_only=True)
        state = json.loads((ckpt / "state.json").read_text())
    except Exception as e:   # SafetensorError, RuntimeError/UnpicklingError from torch, OSError, JSON
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LokuError(f"checkpoint in {ckpt} is damaged ({why}): it cannot be resumed; delete {run_dir} "
                        "and start the run again") from None
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        try:
            keys = set_model_state_dict(model, weights, options=_full_options(strict=False))
            unexpected = list(keys.unexpected_keys)
            if not unexpected:
                set_optimizer_state_dict(model, optimizer, training["optimizer"], options=_full_options())
        except (KeyError, RuntimeError, ValueError) as e:
            unexpected = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__]
        if unexpected:
            raise LokuError(f"checkpoint in {ckpt} does not match this model's trainable weights "
                            f"(e.g. {unexpected[0]}): resume with the run's own config.yaml")
    else:
        params = dict(model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing or len(weights) != sum(p.requires_grad for p in params.values()):
            raise LokuError(f"checkpoint in {ckpt} does not match this model's trainable weights "
                            f"(e.g. {missing[:1] or 'count differs'}): resume with the run's own config.yaml")
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    torch.set_rng_state(training["rng_torch"])
    keys, (pos, has_gauss, gauss) = training["rng_numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    rng = training["rng_python"]
    random.setstate((int(rng[0]), tuple(int(x) for x in rng[1].tolist()), None))
    state["method_tensors"] = training.get("method", {})
    return state


def _numpy_rng():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [torch.from_numpy(keys.astype(np.int64)), [int(pos), int(has_gauss), float(gauss)]]


def _python_rng():
    version, state, _ = random.getstate()
    return [version, torch.tensor(state, dtype=torch.int64)]
