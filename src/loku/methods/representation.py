"""Methods on hidden states rather than logits: rmu (steer a layer's output on forget towards a random vector,
keep it on retain) and lunar (redirect one MLP's output on forget along a refusal direction, keep it on
retain). The loop hands them the tapped layers' outputs (`loku.methods.hooks`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config_base import setting
from ..data.text import load_examples
from ..errors import LokuError
from ..losses import IGNORE, upcast
from .base import LossInputs, MethodState, method, retain_ce
from .hooks import capture, decoder_layers, find_module, layer_name


# ------------------------------------------------------------------------------------------- rmu

def rmu_activation_loss(activations: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OpenUnlearning `RMU.compute_activation_loss`, in float32: per sequence s_b = sum over masked positions of
    the mean over the hidden size of (a - t)^2, divided by the masked counts n. The reference divides s (B,) by n
    kept as (B, 1), which broadcasts to a (B, B) table whose mean is mean(s) x mean(1/n), not mean(s / n);
    loku computes the same table (README "differences")."""
    squared = (upcast(activations) - upcast(target)) ** 2                     # (B, T, d)
    per_sequence = (squared * mask.unsqueeze(-1)).mean(-1).sum(1)             # (B,)
    counts = mask.sum(-1, keepdim=True)                                       # (B, 1)
    return (per_sequence / counts).mean()                                     # (B, B) -> mean


def rmu_control_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """u / |u| x coeff with u uniform in [0, 1)^dim (OpenUnlearning `RMU.get_control_vector`), seeded. (1, 1, dim)"""
    u = torch.rand(1, 1, dim, generator=torch.Generator().manual_seed(seed))
    return u / torch.norm(u) * coeff


@dataclass(frozen=True)
class RMUSettings:
    layer: int = setting(7, "decoder layer whose output is steered (OpenUnlearning RMU.yaml: model.layers.7); "
                         "negative counts from the end.")
    steering_coeff: float = setting(2.0, "norm of the random control vector the forget activations are pushed "
                                    "to (OpenUnlearning RMU.yaml: 2).", bound="positive")
    retain_loss: str = setting("embed_diff", "embed_diff: keep the layer's retain activations at the start "
                               "model's (RMU.yaml); nll: retain cross-entropy.", choices=("embed_diff", "nll"))


def _rmu_setup(s: RMUSettings, ctx, state: MethodState) -> None:
    state.cache["tap"] = layer_name(ctx.model, s.layer, "rmu_layer")
    state.cache["control"] = rmu_control_vector(ctx.model.config.hidden_size, s.steering_coeff, ctx.seed)


@method("rmu", "representation misdirection: a layer's forget activations to a random vector, retain ones kept",
        settings=RMUSettings, needs_retain=True, needs_reference=True,
        reference=lambda s: s.retain_loss == "embed_diff", reference_on=("retain",), setup=_rmu_setup,
        taps=lambda s, state: [state.cache["tap"]],
        units=lambda s: {"forget": "sequences", "retain": "sequences" if s.retain_loss == "embed_diff" else "tokens"})
def rmu(x: LossInputs, s: RMUSettings):
    tap = x.state.cache["tap"]
    h = x.forget_hidden[tap]
    control = x.state.cache["control"].to(h.device, h.dtype).expand_as(h)
    forget = rmu_activation_loss(h, control, x.forget_labels != IGNORE)
    if s.retain_loss == "nll":
        return {"forget": forget, "retain": retain_ce(x)}
    return {"forget": forget, "retain": rmu_activation_loss(x.retain_hidden[tap], x.ref_retain_hidden[tap],
                                                            x.retain_labels != IGNORE)}


# ------------------------------------------------------------------------------------------- lunar

def lunar_loss(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked positions and the hidden size (torch's MSELoss over the positions'
    activations, as OpenUnlearning trains its estimated down-projection), float32."""
    squared = ((upcast(output) - upcast(target)) ** 2).mean(-1)                # (B, T)
    return (squared * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def last_token_states(model, tokenizer, prompts: list[str], layer: str, device, batch_size: int = 32) -> torch.Tensor:
    """The output of `layer` at each prompt's last token, float32. (N, d)"""
    rows = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=512).to(device)
        with capture(model, [layer]) as hidden:
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        last = enc["attention_mask"].sum(-1) - 1 if tokenizer.padding_side == "right" else \
            torch.full_like(enc["attention_mask"][:, 0], enc["attention_mask"].shape[1] - 1)
        rows.append(upcast(hidden[layer][torch.arange(len(last)), last]))
    return torch.cat(rows)


def lunar_direction(model, tokenizer, harmful: list[str], forget: list[str], layer_index: int, device) -> torch.Tensor:
    """Mean last-token activation over the harmful prompts minus that over the forget prompts, taken where
    OpenUnlearning's `Lunar.compute_direction` takes it: at the input of decoder layer L + 1 (the output of
    layer L), or of the last layer when L is the last. (d,)"""
    n = len(decoder_layers(model))
    source = min(layer_index % n + 1, n - 1) - 1   # input of layer k = output of layer k - 1
    name = layer_name(model, source, "lunar_layer")
    return (last_token_states(model, tokenizer, harmful, name, device).mean(0)
            - last_token_states(model, tokenizer, forget, name, device).mean(0))


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt (one a line), or .json/.jsonl/.csv records with an instruction, question or text."""
    path = Path(path)
    rows = load_examples(path, "instruction") if path.suffix.lower() != ".txt" else load_examples(path)
    return [r.get("text") or r["question"] for r in rows]


def prompt_of(example: dict) -> str:
    if "question" not in example and "text" not in example:
        raise LokuError("lunar reads each forget example's prompt as text, but the forget examples came tokenized "
                        "(input_ids/labels): pass them as text or question/answer records")
    return example.get("question") or example["text"]


@dataclass(frozen=True)
class LunarSettings:
    harmful: str | None = setting(None, "file of prompts the model refuses (OpenUnlearning's splits/harmful.json: "
                                  "records with an instruction, or .txt lines); the refusal direction is their mean "
                                  "activation minus the forget prompts'.", default_text="none: required")
    layer: int = setting(7, "decoder layer whose MLP is redirected (OpenUnlearning Lunar.yaml: layer_idx_list "
                         "[7]); negative counts from the end.")
    module: str = setting("mlp.down_proj", "the MLP's output projection inside that layer (Llama: mlp.down_proj; "
                          "GPT-2 / GPT-Neo: mlp.c_proj); the only weights that train.")
    coeff: float = setting(2.0, "how far the forget activations move along the refusal direction "
                           "(OpenUnlearning Lunar.yaml: coeff_list [2.0]).")


def _lunar_check(s: LunarSettings, cfg) -> None:
    if not s.harmful:
        raise LokuError("lunar needs --lunar-harmful FILE: prompts the model refuses (one a line, or JSON records "
                        "with an instruction), from which it takes the refusal direction")
    if not Path(s.harmful).is_file():
        raise LokuError(f"lunar harmful-prompt file {s.harmful} does not exist: check --lunar-harmful")


def _lunar_tap(s: LunarSettings, model) -> str:
    return f"{layer_name(model, s.layer, 'lunar_layer')}.{s.module}"


def _lunar_setup(s: LunarSettings, ctx, state: MethodState) -> None:
    tap = _lunar_tap(s, ctx.model)
    find_module(ctx.model, tap)   # fails now, naming the setting, if the layer has no such module
    state.cache["tap"] = tap
    harmful = read_prompts(s.harmful)
    forget = [prompt_of(e) for e in ctx.forget]
    state.cache["direction"] = lunar_direction(ctx.model, ctx.tokenizer, harmful, forget, s.layer, ctx.device)


@method("lunar", "redirect one MLP's forget outputs along a refusal direction, keep its retain outputs",
        settings=LunarSettings, needs_retain=True, needs_reference=True, check=_lunar_check, setup=_lunar_setup,
        taps=lambda s, state: [state.cache["tap"]], trainable=lambda s, state: [state.cache["tap"]],
        units=lambda s: {"forget": "labels", "retain": "labels"})
def lunar(x: LossInputs, s: LunarSettings):
    tap = x.state.cache["tap"]
    shift = s.coeff * x.state.cache["direction"].to(x.forget_hidden[tap].device)      # (d,)
    return {"forget": lunar_loss(x.forget_hidden[tap], x.ref_forget_hidden[tap] + shift, x.forget_labels != IGNORE),
            "retain": lunar_loss(x.retain_hidden[tap], x.ref_retain_hidden[tap], x.retain_labels != IGNORE)}
