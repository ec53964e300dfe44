"""What the training loop does for a method beyond one forward pass per batch and `method_loss`, in the order
the loop does it. Most methods need none of it (every call below is then a no-op or the plain thing):

    run = MethodRun(method, cfg)
    run.setup(model, tokenizer, forget, retain, device, world)   # before LoRA/FILA: may edit the weights (lmcleaner),
                                                                 # add a head (t3), take a direction (lunar)
    only = run.trainable()                                       # the only modules that train (None: as configured)
    ...LoRA / full fine-tuning...
    run.attach(model)                                            # on the model that trains (sibl's masks)
    each batch:
        run.prestep(model, retain_batch)                         # sibl's inner retain steps
        with run.capture(model) as hidden: logits = forward(...)  # the tapped hidden states (rmu, lunar, t3)
        x = LossInputs(..., state=run.state); terms = method_loss(method, x, cfg)
        run.backward(terms, accelerator.backward, params, sync)  # gru, sibl: their own gradient
    each epoch: run.epoch_end(epoch, retain_loss)                # pdu's dual update
    checkpoints: run.state_dict() / run.load_state_dict(...)
    saving: run.save(model, out)                                 # t3's head, in out/t3/
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import io
from ..data.qa import DEFAULT_PROMPT_FORMAT
from ..errors import LokuError
from .base import Method, MethodState
from .hooks import capture, find_module


@dataclass
class SetupContext:
    """What a method's set-up may use: the start model (before any adapter) and the run's data."""

    model: Any
    tokenizer: Any
    forget: list[dict]
    retain: list[dict] | None
    device: Any
    seed: int
    max_length: int
    retain_weight: float
    prompt_format: str          # how QA examples are written (loku.data.qa)


class MethodRun:
    def __init__(self, method: Method, cfg):
        self.method, self.cfg = method, cfg
        self.settings = method.settings_of(cfg)
        self.state = MethodState()
        self.taps: list[str] = []

    def setup(self, model, tokenizer, forget: list[dict], retain: list[dict] | None, device, world: int = 1) -> None:
        m = self.method
        if m.single_process and world > 1:
            raise LokuError(f"{m.name} changes each step's whole gradient itself, so it runs in one process (as "
                            f"OpenUnlearning's): launch it without accelerate's multi-process launch")
        if m.setup is not None:
            ctx = SetupContext(model, tokenizer, forget, retain, device, getattr(self.cfg, "seed", 0),
                               getattr(self.cfg, "max_length", 256), getattr(self.cfg, "retain_weight", 1.0),
                               getattr(self.cfg, "prompt_format", DEFAULT_PROMPT_FORMAT))
            m.setup(self.settings, ctx, self.state)
        self.taps = list(m.taps(self.settings, self.state)) if m.taps is not None else []

    def trainable(self) -> list[str] | None:
        """Module names the method trains alone (lunar: one MLP projection; t3: its head), or None."""
        return list(self.method.trainable(self.settings, self.state)) if self.method.trainable else None

    def attach(self, model) -> None:
        if self.method.attach is not None:
            self.method.attach(self.settings, model, self.state)

    @contextlib.contextmanager
    def capture(self, model):
        """Context manager around each forward pass: records the taps' outputs (an empty dict for most
        methods); for a method that differentiates twice (sibl), attention runs on torch's math kernel, the one
        whose backward can itself be differentiated."""
        with contextlib.ExitStack() as stack:
            if self.method.double_backward:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield stack.enter_context(capture(model, self.taps)) if self.taps else {}

    def prestep(self, model, retain: dict | None) -> None:
        if self.method.prestep is not None:
            self.method.prestep(self.settings, model, retain, self.state)

    def backward(self, terms: dict[str, torch.Tensor], backward: Callable, params: list, sync: bool) -> None:
        """`backward(terms["loss"])`, or the method's own gradient (gru, sibl)."""
        if self.method.backward is None:
            backward(terms["loss"])
        else:
            self.method.backward(self.settings, terms, backward, params, self.state, sync)

    def epoch_end(self, epoch: int, retain_loss: Callable[[], float]) -> None:
        if self.method.epoch_end is not None:
            self.method.epoch_end(self.settings, self.state, epoch, retain_loss)

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able values, tensors) to checkpoint."""
        values = {"values": dict(self.state.values), "retain_weight": self.state.retain_weight}
        return values, {k: v.detach().cpu() for k, v in self.state.tensors.items()}

    def load_state_dict(self, values: dict, tensors: dict[str, torch.Tensor], device=None) -> None:
        self.state.values.update(values.get("values", {}))
        self.state.retain_weight = values.get("retain_weight", self.state.retain_weight)
        self.state.tensors.update({k: v.to(device) if device is not None else v for k, v in tensors.items()})

    def save(self, model, out: Path) -> None:
        """What the method adds to a finished run, in `out/<method>/` (t3: its head)."""
        if self.method.save is not None:
            with io.atomic_dir(Path(out) / self.method.name) as tmp:
                self.method.save(self.settings, model, self.state, Path(tmp))


def set_trainable(model, modules: list[str]):
    """Full fine-tuning of `modules` only: every other weight frozen. Returns the model."""
    model.requires_grad_(False)
    for name in modules:
        find_module(model, name).requires_grad_(True)
    return model
