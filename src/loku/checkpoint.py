"""Checkpoints that let a killed run continue exactly where it was.

A checkpoint is a directory written whole (temporary name, then rename): the trainable weights
(safetensors), optimizer and scheduler states, RNG states, the data position and the epoch history.
Everything is loaded back with `torch.load(weights_only=True)`: no pickled code is ever executed.
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


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict) -> None:
    """`state`: JSON-able position (epoch, step, ...) and history."""
    with io.atomic_dir(Path(run_dir) / NAME) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng_torch": torch.get_rng_state(), "rng_numpy": _numpy_rng(),
                    "rng_python": _python_rng()}, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, default=float))


def load_checkpoint(run_dir: Path, model, optimizer, scheduler) -> dict:
    """Restores weights, optimizer, scheduler and RNG in place; returns the saved position and history."""
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
    return state


def _numpy_rng():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [torch.from_numpy(keys.astype(np.int64)), [int(pos), int(has_gauss), float(gauss)]]


def _python_rng():
    version, state, _ = random.getstate()
    return [version, torch.tensor(state, dtype=torch.int64)]
