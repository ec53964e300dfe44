"""LoRA adapters through peft, with targets that work for any architecture."""

from __future__ import annotations

import torch
from torch import nn

from .errors import LokuError


def _linear_types():
    from transformers.pytorch_utils import Conv1D  # GPT-2 style (weight stored transposed)

    return (nn.Linear, Conv1D)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1D of the model except the output head, by full module name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _linear_types()) and m is not head and name}


def default_target_modules(model: nn.Module) -> list[str]:
    """Short names (last path component) of every linear layer but the output head, e.g.
    ['q_proj', 'k_proj', ...]; peft matches them as suffixes, so they carry over between model sizes."""
    names = sorted({n.rsplit(".", 1)[-1] for n in linear_modules(model)})
    if not names:
        raise LokuError("the model has no linear layers besides its output head: LoRA cannot attach; use --full")
    return names


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Check user targets against the model (by suffix or full name) and list the valid ones if wrong."""
    if not targets:
        return default_target_modules(model)
    modules = linear_modules(model)
    valid = default_target_modules(model)
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in modules):
            raise LokuError(f"target module {t!r} is not a linear layer of this model: "
                            f"choose from {', '.join(valid)}")
    return list(targets)


def targeted_modules(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """The full-name -> module map that `targets` select (as peft will match them)."""
    return {n: m for n, m in linear_modules(model).items() if any(n == t or n.endswith("." + t) for t in targets)}


def check_rank(model: nn.Module, targets: list[str], rank: int) -> None:
    from transformers.pytorch_utils import Conv1D

    for name, m in targeted_modules(model, targets).items():
        out_f, in_f = (m.weight.shape[1], m.weight.shape[0]) if isinstance(m, Conv1D) else m.weight.shape
        if rank > min(out_f, in_f):
            raise LokuError(f"LoRA rank {rank} exceeds layer {name} of shape ({out_f}, {in_f}): "
                            f"use --lora-rank <= {min(out_f, in_f)} or drop that target")


def add_lora(model: nn.Module, rank: int, alpha: float, target_modules: list[str] | None = None,
             dropout: float = 0.0):
    """Wrap `model` with fresh LoRA adapters (B = 0, so outputs are unchanged); only adapters train."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = resolve_targets(model, target_modules)
    check_rank(model, targets, rank)
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in targeted_modules(model, targets).values())
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                     fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
