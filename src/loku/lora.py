"""LoRA adapters through peft, planned once: which modules, what rank, alpha and scaling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import LokuError


def conv1d_type() -> type:
    """GPT-2's linear layer (weight stored transposed); imported when a model is at hand: transformers adds
    ~2 s to the start of every `loku` command (measured)."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in): GPT-2's Conv1D stores (in, out), so it is transposed (a view)."""
    return module.weight.T if isinstance(module, conv1d_type()) else module.weight


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1D of the model except the output head, by full module name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, conv1d_type())) and m is not head and name}


def default_target_modules(model: nn.Module) -> list[str]:
    """Short names (last path component) of every linear layer but the output head, e.g.
    ['q_proj', 'k_proj', ...]; peft matches them as suffixes, so they carry over between model sizes."""
    names = sorted({n.rsplit(".", 1)[-1] for n in linear_modules(model)})
    if not names:
        raise LokuError("the model has no linear layers besides its output head: LoRA cannot attach; use --full")
    return names


def targeted_modules(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """Full name -> module for every linear layer that `targets` select, as peft matches them (a full name or
    a suffix such as 'q_proj'), in model order; a target that selects none is an error naming the valid ones."""
    modules = linear_modules(model)
    selected = {t: {n for n in modules if n == t or n.endswith("." + t)} for t in targets}
    for t, names in selected.items():
        if not names:
            raise LokuError(f"target module {t!r} is not a linear layer of this model: "
                            f"choose from {', '.join(default_target_modules(model))}")
    return {n: m for n, m in modules.items() if any(n in names for names in selected.values())}


@dataclass(frozen=True)
class LoraPlan:
    """LoRA resolved once against a model. Everything downstream (Fisher statistics, the initialisation,
    peft, the saved config) receives this plan instead of matching names or checking the rank again."""

    targets: tuple[str, ...]        # as given to peft: short names ('q_proj') or full module names
    module_names: tuple[str, ...]   # full names of the modules they select, sorted
    rank: int
    alpha: float
    fan_in_fan_out: bool            # the modules are GPT-2 Conv1D (weights stored transposed)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def plan_lora(model: nn.Module, targets: list[str] | None, rank: int, alpha: float) -> LoraPlan:
    """Check the targets (default: every linear layer but the head) and the rank against the model, once."""
    targets = list(targets) if targets else default_target_modules(model)
    modules = targeted_modules(model, targets)
    for name, m in modules.items():
        out_f, in_f = weight_of(m).shape
        if rank > min(out_f, in_f):
            raise LokuError(f"LoRA rank {rank} exceeds layer {name} of shape ({out_f}, {in_f}): "
                            f"use --lora-rank <= {min(out_f, in_f)} or drop that target")
    return LoraPlan(tuple(targets), tuple(sorted(modules)), rank, alpha,
                    any(isinstance(m, conv1d_type()) for m in modules.values()))


def wrap_lora(model: nn.Module, plan: LoraPlan, dropout: float = 0.0):
    """Wrap `model` with fresh LoRA adapters as planned (B = 0, so outputs are unchanged); only adapters train."""
    from peft import LoraConfig, get_peft_model   # peft takes seconds to import: only when LoRA is used

    cfg = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, target_modules=list(plan.targets), lora_dropout=dropout,
                     fan_in_fan_out=plan.fan_in_fan_out, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def add_lora(model: nn.Module, rank: int, alpha: float, target_modules: list[str] | None = None,
             dropout: float = 0.0):
    """`wrap_lora` with the plan made here."""
    return wrap_lora(model, plan_lora(model, target_modules, rank, alpha), dropout)
