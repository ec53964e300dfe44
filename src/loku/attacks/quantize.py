"""Quantization attack: does rounding the unlearned weights to a low-bit grid bring the forgotten data back?

Zhang et al. (ICLR 2025, arXiv 2410.16454) find that 4-bit quantization of an unlearned model restores most of
what unlearning with a small learning rate removed: the unlearning update is smaller than the quantization
step, so rounding lands the weights back on the original model's grid points. This module fake-quantizes
(quantize, then dequantize, exactly, on the CPU) so the rounded model can be measured like any other.

Quantizers (names as `--quantize` takes them):
- `int8`, `int4`: round-to-nearest, symmetric, absmax scale per output channel (each row of a Linear weight):
  scale = absmax / qmax, w' = round(w / scale) x scale with round(.) clamped to [-qmax, qmax],
  qmax = 2^(bits-1) - 1 (the RTN baseline of GPTQ/AWQ, symmetric). `int8` per channel instead follows
  bitsandbytes' LLM.int8() weight quantization operation for operation, q = round(w x (127 / absmax)),
  w' = q x absmax x 7.874015718698502e-3 (`int8_vectorwise_quant` then `int8_vectorwise_dequant`; tested
  bit-exact against bitsandbytes); the two forms differ by at most a float32 rounding, and the plain form keeps
  a weight already on a power-of-two grid exactly where it is (bitsandbytes' constant does that for 127 only).
  torch.round rounds halves to even. A row of zeros stays zeros (bitsandbytes would give NaN there).
- `int4-g128`, `int4-g64`, `int8-g128`, ...: the same with one scale per group of that many consecutive input
  channels in each row (the last group of a row may be shorter), as GPTQ/AWQ-style group quantization.
- `nf4`: bitsandbytes' 4-bit NormalFloat (QLoRA): the weight flattened row-major in blocks of 64, absmax per
  block, each value x / absmax rounded to the nearest of the 16 NF4 code values (ties to the lower one, as
  bitsandbytes' CUDA kernel and its CPU/default kernel), w' = code x absmax. `nf4-b128` etc. set the block.
  Tested bit-exact against bitsandbytes' `dequantize_4bit(quantize_4bit(W, quant_type="nf4"))`.

What is quantized: the weight of every linear layer (torch.nn.Linear and GPT-2's Conv1D, whose weight is
stored transposed) except the output head; biases, norms and embeddings stay in full precision, as
transformers' BitsAndBytesConfig leaves them (its default skips the head). `head=True` and `embeddings=True`
quantize those too; a head tied to the input embedding (SmolLM2) is one tensor, quantized once for both.

Two modes for a LoRA/FILA run (a PeftModel): `merged` merges the adapter into the weights and quantizes the
result (what a user who ships merged weights and quantizes them gets); `base` quantizes the base model's
weights and keeps the adapter in full precision (QLoRA-style serving: adapter on a quantized base). A plain
model has only the merged form. The input model is never modified: every function works on a deep copy.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from ..errors import LokuError

# bitsandbytes functional.get_4bit_type("nf4") (QLoRA's NormalFloat4 code book), in its order.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
DEFAULT_QUANTIZERS = ("int8", "int4", "int4-g128", "int4-g64", "nf4")
MODES = ("merged", "base")
_NAME = re.compile(r"^(?:int(?P<bits>[2-8])(?:-g(?P<group>\d+))?|nf4(?:-b(?P<block>\d+))?)$")


@dataclass(frozen=True)
class Quantizer:
    """One fake quantizer. kind "int": `bits`, `group` (None: one scale per output channel); kind "nf4": `group`
    is the block size over the flattened weight."""

    name: str
    kind: str
    bits: int
    group: int | None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight after quantize + dequantize, same shape and dtype; `weight` is (out, in), rows = channels."""
        if self.kind == "nf4":
            return fake_nf4(weight, self.group)
        return fake_int(weight, self.bits, self.group)

    def step(self, weight: torch.Tensor) -> torch.Tensor:
        """The grid step (absmax / qmax) of each value's row or group, for int quantizers: (out, in)."""
        qmax = 2 ** (self.bits - 1) - 1
        groups, unpad = _grouped(weight.float(), self.group)
        return unpad(groups.abs().amax(-1, keepdim=True).expand_as(groups) / qmax)


def parse_quantizer(name: str) -> Quantizer:
    """`int8`, `int4`, `int4-g128`, `nf4`, `nf4-b128`, ... -> Quantizer, or a LokuError naming the valid forms."""
    m = _NAME.match(name.strip())
    if not m:
        from ..registry import unknown_choice

        raise unknown_choice("quantizer", name, list(DEFAULT_QUANTIZERS) + ["int8-g128", "nf4-b128"])
    if name.startswith("nf4"):
        block = int(m.group("block") or 64)
        if block < 2:
            raise LokuError(f"quantizer {name}: the NF4 block must be at least 2 values")
        return Quantizer(name, "nf4", 4, block)
    group = int(m.group("group")) if m.group("group") else None
    if group is not None and group < 1:
        raise LokuError(f"quantizer {name}: the group must be at least 1 input channel")
    return Quantizer(name, "int", int(m.group("bits")), group)


def _grouped(w: torch.Tensor, group: int | None):
    """(groups (out, n_groups, g), unpad) for a 2-D weight split into groups of `group` input channels (zero
    padded at the end of each row; zeros never change an absmax), or one group per row."""
    out_f, in_f = w.shape
    if group is None:
        return w[:, None, :], lambda g: g.reshape(out_f, in_f)
    pad = (-in_f) % group
    padded = torch.nn.functional.pad(w, (0, pad))  # (out, in + pad)
    return padded.reshape(out_f, -1, group), lambda g: g.reshape(out_f, -1)[:, :in_f]


def fake_int(weight: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest INT-`bits` quantize + dequantize of a 2-D (out, in) weight; see the module."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    qmax = 2 ** (bits - 1) - 1
    groups, unpad = _grouped(weight.float(), group)  # (out, n, g)
    absmax = groups.abs().amax(-1, keepdim=True)  # (out, n, 1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    if bits == 8 and group is None:  # bitsandbytes LLM.int8(): round(A * (127 / row_stats)), A * stats * fl(1/127)
        q = torch.round(groups * (qmax / safe)).clamp(-qmax, qmax)
        deq = q * safe * torch.tensor(1.0 / qmax, dtype=torch.float32)
    else:
        scale = safe / qmax
        deq = torch.round(groups / scale).clamp(-qmax, qmax) * scale
    return unpad(torch.where(absmax > 0, deq, torch.zeros_like(deq))).to(weight.dtype)


def fake_nf4(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """bitsandbytes NF4 quantize + dequantize: blocks of `block` over the flattened weight, absmax per block."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=flat.device)
    bounds = (code[:-1] + code[1:]) / 2  # equal (in float32) to the thresholds in bitsandbytes' dQuantizeNF4
    pad = (-n) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)  # (n_blocks, block)
    absmax = blocks.abs().amax(-1, keepdim=True)  # (n_blocks, 1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
    index = torch.bucketize(scaled, bounds)  # ties go to the lower code value, as bitsandbytes' `x > threshold`
    return (code[index] * absmax).reshape(-1)[:n].reshape(weight.shape).to(weight.dtype)


# ---- models --------------------------------------------------------------------------------------------------

def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def quantized_weights(model, *, head: bool = False, embeddings: bool = False, skip_lora: bool = True) -> dict:
    """name -> (module, transposed) of every weight this attack quantizes (see the module docstring): linear
    layers but the output head, plus the head / input embeddings when asked. LoRA's own factors
    (`lora_A`, `lora_B`, ...) are never included. Tied weights appear once."""
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen, out = set(), {}
    for name, module in model.named_modules():
        if skip_lora and any(part.startswith("lora_") for part in name.split(".")):
            continue
        if module is out_head and out_head is not None:
            wanted = head
        elif isinstance(module, torch.nn.Embedding):
            wanted = embeddings
        else:
            wanted = _is_linear(module)
        weight = getattr(module, "weight", None)
        if not wanted or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        out[name] = (module, type(module).__name__ == "Conv1D")
    return out


@torch.no_grad()
def quantize_in_place(model, quantizer: Quantizer, *, head: bool = False, embeddings: bool = False) -> list[str]:
    """Replace the weights `quantized_weights` lists by their fake-quantized values; returns their names."""
    targets = quantized_weights(model, head=head, embeddings=embeddings)
    for module, transposed in targets.values():
        w = module.weight.data
        rows = w.t() if transposed else w  # Conv1D stores (in, out); channels are its columns
        q = quantizer(rows)
        module.weight.data.copy_(q.t() if transposed else q)
    return list(targets)


def is_adapter_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_copy(model):
    """A plain (non-PEFT) deep copy of the model with any LoRA adapter merged into its weights."""
    plain = copy.deepcopy(model)
    return plain.merge_and_unload() if is_adapter_model(plain) else plain


def quantize_model(model, quantizer: Quantizer | str, *, mode: str = "merged", head: bool = False,
                   embeddings: bool = False):
    """A quantized deep copy of `model` (the input is untouched). `mode`: "merged" (adapter merged first, then
    every targeted weight quantized) or "base" (a PeftModel's base weights quantized, the adapter kept in full
    precision). Returns the copy in eval mode."""
    if isinstance(quantizer, str):
        quantizer = parse_quantizer(quantizer)
    if mode not in MODES:
        from ..registry import unknown_choice

        raise unknown_choice("quantization mode", mode, MODES)
    if mode == "base":
        if not is_adapter_model(model):
            raise LokuError("quantization mode 'base' keeps a LoRA adapter in full precision on a quantized base, "
                            "but this model has no adapter: use mode 'merged' (or pass --adapter)")
        out = copy.deepcopy(model)
    else:
        out = merged_copy(model)
    if not quantize_in_place(out, quantizer, head=head, embeddings=embeddings):
        raise LokuError(f"{type(model).__name__} has no linear layer to quantize: the quantization attack needs a "
                        "transformer with torch.nn.Linear (or Conv1D) layers")
    return out.eval()
