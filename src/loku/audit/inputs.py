"""Everything an audit reads, checked before any model weight loads and before anything is written:
files, the adapter against the model, the tokenizers of the original and reference models."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LokuError
from ..models import is_guidance_head

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def check_adapter_folder(adapter: str) -> Path:
    path = Path(adapter)
    if not path.is_dir():
        raise LokuError(f"adapter folder {adapter} does not exist: pass the adapter/ folder of a loku run")
    if is_guidance_head(path):
        raise LokuError(f"{adapter} is a T3 head, which the audit does not measure yet (its attacks change weights, "
                        "T3 leaves them unchanged and tilts the output): audit a method that trains the model")
    if not (path / "adapter_config.json").is_file():
        raise LokuError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json): pass the adapter/ folder "
                        "of a loku run")
    if not (path / "adapter_model.safetensors").is_file():
        raise LokuError(f"{adapter} has no adapter_model.safetensors: save the adapter with safetensors "
                        "(PEFT's default)")
    from ..io import check_run_part

    check_run_part(path)
    return path


def _features(module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer (Conv1D stores its weight as (in, out))."""
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        return None
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def check_adapter_fits(model, adapter: str, model_name: str) -> None:
    """Every LoRA factor in the adapter must match a module of `model` in name and size; otherwise the adapter
    was trained on another model."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    path = Path(adapter) / "adapter_model.safetensors"
    found = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if not m:
                continue
            found += 1
            name, ab = m.group("module"), m.group("ab")
            module = modules.get(name)
            if module is None:
                raise LokuError(f"adapter {adapter} is for another model: it adapts {name}, which {model_name} "
                                "does not have; pass the --model it was trained on")
            size = _features(module)
            shape = f.get_slice(key).get_shape()
            need = (shape[1], None) if ab == "A" else (None, shape[0])   # A: (r, in), B: (out, r)
            if size is None or (need[0] is not None and need[0] != size[0]) or \
                    (need[1] is not None and need[1] != size[1]):
                raise LokuError(f"adapter {adapter} is for another model: its {name}.lora_{ab} has shape "
                                f"{tuple(shape)} but {model_name}'s {name} is {size[0] if size else '?'} -> "
                                f"{size[1] if size else '?'}; pass the --model it was trained on")
    if not found:
        raise LokuError(f"adapter {adapter} holds no LoRA weights: pass the adapter/ folder of a loku run")


def apply_adapter(model, adapter: str, model_name: str):
    check_adapter_fits(model, adapter, model_name)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter, is_trainable=False)


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def check_same_tokenizer(tokenizer, other, what: str, name: str, model_name: str) -> None:
    if not same_tokenizer(tokenizer, other):
        article = "an" if what[0] in "aeiou" else "a"
        raise LokuError(f"--{what} {name} uses a different tokenizer from --model {model_name} (their vocabularies "
                        f"differ), but the audit compares them token by token: pass {article} {what} model of the "
                        "same family (same tokenizer)")

