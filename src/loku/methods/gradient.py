"""Gradient surgery: gru removes from the forget gradient its component against a moving average of the
retain gradient, when they conflict. The loop hands it the backward pass (`Method.backward`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config_base import setting
from ..errors import LokuError
from ..losses import cross_entropy, npo_loss, upcast
from .base import LossInputs, MethodState, method, retain_ce


def rectify(forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """`forget` without its component along `retain` when their dot product is negative (GRU's projection,
    OpenUnlearning `GRU.pipeline` / `orthogonal_component`), flat float vectors."""
    dot = torch.dot(forget, retain)
    if dot < 0:
        return forget - dot / torch.dot(retain, retain) * retain
    return forget


def retain_average(current: torch.Tensor, previous: torch.Tensor | None, ema: float) -> torch.Tensor:
    """GRU's "stable estimation": ema x this step's retain gradient + (1 - ema) x the previous average
    (0 before the first step)."""
    return ema * current + (1 - ema) * (previous if previous is not None else 0.0)


@dataclass(frozen=True)
class GRUSettings:
    ema: float = setting(0.8, "weight of the current retain gradient in its moving average "
                         "(OpenUnlearning GRU.yaml gamma_gru: 0.8).", bound="non-negative")
    forget_loss: str = setting("ga", "the forget term: ga (gradient ascent, GRU.yaml) or npo (beta 0.1, as the "
                               "reference fixes it).", choices=("ga", "npo"))


def _gru_check(s: GRUSettings, cfg) -> None:
    if s.ema > 1:
        raise LokuError(f"gru-ema must be between 0 and 1, got {s.ema}: pass e.g. --gru-ema 0.8")


def _flat_grads(params) -> torch.Tensor:
    return torch.cat([upcast(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _gru_backward(s: GRUSettings, terms: dict, backward, params, state: MethodState, sync: bool) -> None:
    """Forget gradients accumulate in .grad as usual; retain gradients in the state. At the step's last
    micro-batch the forget gradient is rectified against the retain average (OpenUnlearning `GRU.training_step`:
    only the rectified forget gradient updates the weights; the retain gradient only steers it)."""
    retain = torch.autograd.grad(terms["retain"], params, allow_unused=True)
    flat_retain = torch.cat([upcast(g if g is not None else torch.zeros_like(p)).reshape(-1)
                             for g, p in zip(retain, params)])
    acc = state.cache.get("retain_accumulated")
    state.cache["retain_accumulated"] = flat_retain if acc is None else acc + flat_retain
    backward(terms["forget"])
    if not sync:
        return
    average = retain_average(state.cache.pop("retain_accumulated"), state.tensors.get("retain_average"), s.ema)
    state.tensors["retain_average"] = average
    g = rectify(_flat_grads(params), average)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = g[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


@method("gru", "gradient-rectified unlearning: the forget gradient without its part against the retain gradient",
        settings=GRUSettings, needs_retain=True, ascent=True, check=_gru_check,
        reference=lambda s: s.forget_loss == "npo", reference_on=("forget",), backward=_gru_backward,
        single_process=True,
        units=lambda s: {"forget": "tokens" if s.forget_loss == "ga" else "sequences", "retain": "tokens"})
def gru(x: LossInputs, s: GRUSettings):
    forget = -cross_entropy(x.forget_logits, x.forget_labels) if s.forget_loss == "ga" else \
        npo_loss(x.forget_logits, x.ref_forget_logits, x.forget_labels, 0.1)
    return {"forget": forget, "retain": retain_ce(x)}
