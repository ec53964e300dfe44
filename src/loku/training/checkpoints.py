"""Checkpoints that let a killed run continue exactly where it was.

A checkpoint is a directory written whole (temporary name, then rename): the trainable weights
(safetensors), optimizer and scheduler states, RNG states, the data position, the epoch history and what the
method keeps between steps (`MethodRun.state_dict`: pdu's dual variable, gru's retain-gradient average).
Everything is loaded back with `torch.load(weights_only=True)`: no pickled code is ever executed.
Under FSDP the weights and optimizer state are gathered whole to the main process (torch.distributed.
checkpoint's full state dicts), so a checkpoint is the same file whatever the number of processes.
DeepSpeed runs write none (its optimizer state has its own format), so they do not resume.

Not accelerate's save_state/load_state: for a LoRA run it writes the whole model (the frozen base too, ~50x
the adapter at rank 8), loads its RNG and registered objects with torch.load(weights_only=False) (pickle), and
writes one RNG file per process, so a checkpoint only resumes on the same number of processes.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import io
from ..distributed import is_main, requested_engine
from ..errors import LokuError
from ..methods import MethodRun

NAME = "checkpoint"


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


@dataclass
class Position:
    """Where a run stands; a checkpoint saves it, and a resumed run continues from it exactly."""

    epoch: int = 0                 # the epoch under way
    next_batch: int = 0            # its first micro-batch not yet trained on
    step: int = 0                  # optimizer steps taken in the run
    sums: dict = field(default_factory=dict)      # the epoch's step values, summed (its line is their mean)
    done: bool = False
    history: list = field(default_factory=list)   # one line per finished epoch


class Checkpoints:
    """A run's checkpoint in `out`/checkpoint. Every process calls `save` and `load`: under FSDP the whole
    tensors are gathered to (and taken back from) the main process, which alone writes; under DeepSpeed
    nothing is written."""

    def __init__(self, out: Path, accelerator, engine: str | None, model, optimizer, scheduler, run: MethodRun):
        self.out, self.dir, self.engine, self.scheduler, self.run = out, out / NAME, engine, scheduler, run
        self.device = accelerator.device
        self.sharded = engine == "FSDP"   # then the prepared model and the torch optimizer it wraps
        self.model = model if self.sharded else accelerator.unwrap_model(model)
        self.optimizer = optimizer.optimizer if self.sharded else optimizer

    def save(self, at: Position) -> None:
        if self.engine == "DeepSpeed" or not (self.sharded or is_main()):
            return
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            options = _full_options(cpu_offload=True, ignore_frozen_params=True)
            weights = get_model_state_dict(self.model, options=options)
            optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        else:
            weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            optim = self.optimizer.state_dict()
        if not is_main():
            return
        method_values, method_tensors = self.run.state_dict()
        with io.atomic_dir(self.dir) as tmp:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optim, "scheduler": self.scheduler.state_dict(),
                        "rng_torch": torch.get_rng_state(), "rng_numpy": _numpy_rng(),
                        "rng_python": [random.getstate()[0], torch.tensor(random.getstate()[1])],
                        "method": method_tensors}, tmp / "training_state.pt")
            (tmp / "state.json").write_text(json.dumps({**asdict(at), "method": method_values}, default=float))

    def load(self) -> Position:
        """Restore weights, optimizer, scheduler, RNG and the method's state in place; drop the metrics lines
        written after."""
        try:
            weights = load_file(str(self.dir / "trainable.safetensors"))
            training = torch.load(self.dir / "training_state.pt", weights_only=True)
            state = json.loads((self.dir / "state.json").read_text())
            method_values, at = state.pop("method", {}), Position(**state)
        except Exception as e:   # SafetensorError, RuntimeError/UnpicklingError from torch, OSError, JSON
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LokuError(f"checkpoint in {self.dir} is damaged ({why}): it cannot be resumed; delete "
                            f"{self.out} and start the run again") from None
        self._set_weights(weights, training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        torch.set_rng_state(training["rng_torch"])
        keys, (pos, has_gauss, gauss) = training["rng_numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
        rng = training["rng_python"]
        random.setstate((int(rng[0]), tuple(int(x) for x in rng[1].tolist()), None))
        self.run.load_state_dict(method_values, training.get("method", {}), self.device)
        if is_main():
            _truncate_metrics(self.out / "metrics.jsonl", at.step, len(at.history))
        return at

    def _set_weights(self, weights: dict, optim: dict) -> None:
        if self.sharded:   # each process takes its own shards of the saved whole tensors
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            try:
                unexpected = list(set_model_state_dict(self.model, weights, options=_full_options(strict=False))
                                  .unexpected_keys)
                if not unexpected:
                    set_optimizer_state_dict(self.model, self.optimizer, optim, options=_full_options())
            except (KeyError, RuntimeError, ValueError) as e:
                unexpected = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__]
        else:
            params = dict(self.model.named_parameters())
            unexpected = [n for n in weights if n not in params]
            if not unexpected and len(weights) != sum(p.requires_grad for p in params.values()):
                unexpected = ["count differs"]
        if unexpected:
            raise LokuError(f"checkpoint in {self.dir} does not match this model's trainable weights "
                            f"(e.g. {unexpected[0]}): resume with the run's own config.yaml")
        if not self.sharded:
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w)
            self.optimizer.load_state_dict(optim)


def _numpy_rng():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [torch.from_numpy(keys.astype(np.int64)), [int(pos), int(has_gauss), float(gauss)]]


def check_resumable(cfg) -> Path:
    out = Path(cfg.out)
    if requested_engine() == "DeepSpeed":
        raise LokuError("resuming is not available under DeepSpeed (loku writes no checkpoints there: its "
                        "optimizer state has its own format): start the run again, or use FSDP "
                        "(configs/accelerate/fsdp.yaml), whose checkpoints resume")
    if (out / io.MANIFEST).is_file():
        raise LokuError(f"run {out} is already complete (it has {io.MANIFEST}): nothing to resume")
    if not (out / NAME / "state.json").is_file():
        raise LokuError(f"{out} has no checkpoint to resume from (it was killed before the first one): "
                        "delete it and start again")
    return out


def _truncate_metrics(path: Path, step: int, epochs_done: int) -> None:
    """Drop log lines written after the checkpoint; the resumed run writes them again."""
    if not path.is_file():
        return
    def kept(line: str) -> bool:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            return False
        return r["step"] <= step if r.get("kind") == "step" else r.get("kind") == "epoch" and r["epoch"] <= epochs_done
    io.write_text(path, "".join(line + "\n" for line in path.read_text().splitlines() if kept(line)))
