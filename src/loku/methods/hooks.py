"""Hidden states for the methods that read them (rmu, lunar, t3): forward hooks on named modules, so the loop
keeps its one forward pass per batch and no model is copied to get them.

A tap is a module name ("model.layers.7": its output) or "name:input" (its input). Names are matched as
dotted suffixes, so the same tap finds the module in the plain model, in the model with LoRA adapters
("base_model.model.model.layers.7") and in the frozen copy.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from ..errors import LokuError

_FOUND: "weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]]" = weakref.WeakKeyDictionary()


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The module called `name` (or ending in "." + name; the outermost if several), or a LokuError."""
    found = _FOUND.setdefault(model, {})
    if name not in found:
        matches = [(n, m) for n, m in model.named_modules() if n == name or n.endswith("." + name)]
        if not matches:
            raise LokuError(f"the model has no module {name!r}: check the method's layer setting "
                            f"(decoder layers: {decoder_layers_name(model)}.0 to .{len(decoder_layers(model)) - 1})")
        found[name] = min(matches, key=lambda nm: len(nm[0]))[1]
    return found[name]


def decoder_layers_name(model: nn.Module) -> str:
    """The dotted name of the model's list of decoder layers ("model.layers", "transformer.h", ...)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n_layers is None or len(m) == n_layers):
            return name
    raise LokuError("cannot find the model's decoder layers (no list of num_hidden_layers blocks): this method "
                    "needs a decoder-only transformer")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(decoder_layers_name(model))


def layer_name(model: nn.Module, index: int, setting: str) -> str:
    """The name of decoder layer `index` (negative: from the end), checked, e.g. "model.layers.7"."""
    n = len(decoder_layers(model))
    if not -n <= index < n:
        raise LokuError(f"{setting} {index} is not a layer of this model ({n} decoder layers): pass "
                        f"--{setting.replace('_', '-')} between 0 and {n - 1} (or -1 for the last)")
    return f"{decoder_layers_name(model)}.{index % n}"


def _keep(out: dict, tap: str, value) -> None:
    out.setdefault(tap, value[0] if isinstance(value, (tuple, list)) else value)


@contextlib.contextmanager
def capture(model: nn.Module, taps: list[str] | tuple[str, ...]):
    """Records the named modules' outputs (or inputs, for "name:input") while the block runs a forward pass:

        with capture(model, ["model.layers.7"]) as hidden:
            logits = model(**batch).logits
        hidden["model.layers.7"]   # (B, T, d), part of the graph (gradients flow through it)

    A module called more than once keeps its first call, as OpenUnlearning's RMU cache does."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for tap in taps:
            name, _, where = tap.partition(":")
            module = find_module(model, name)
            if where == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, tap=tap: _keep(out, tap, args)))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, output, tap=tap: _keep(out, tap, output)))
        yield out
    finally:
        for h in handles:
            h.remove()
