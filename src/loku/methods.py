"""Unlearning methods: each is one function over the loop's outputs plus, where it has any, a dataclass of
its own settings (defaults from OpenUnlearning's configs/trainer/*.yaml, help text beside them).

Adding a method is one function and, if it has settings, one settings class, here:

    @dataclass(frozen=True)
    class MySettings:
        beta: float = setting(1.0, "what beta does.", bound="positive")

    @method("mine", "one line for `loku list methods`", settings=MySettings, needs_retain=True)
    def mine(x: LossInputs, s: MySettings):
        return {"forget": some_loss(x.forget_logits, x.forget_labels, s.beta), "retain": retain_ce(x)}

A method returns its terms unweighted; `method_loss` multiplies the forget term by `forget_weight` (None:
the method's own default) and the retain term by `retain_weight`, and adds "loss". Every setting becomes
the config key and flag `<method>_<setting>` (`mine_beta`, `--mine-beta`) of `UnlearnConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from .config_base import hints, setting
from .losses import (cross_entropy, inverted_hinge_loss, kl_divergence, npo_loss, pooled_cross_entropy,
                     simnpo_loss)
from .registry import Registry

__all__ = ["LossInputs", "Method", "METHODS", "method", "get_method", "method_loss", "loss_units",
           "forget_weight", "setting_fields", "NPOSettings", "SimNPOSettings", "KLSettings", "IdKSettings"]


@dataclass
class LossInputs:
    """What the loop hands a method: model outputs on the forget (and retain) batch, and the frozen
    start model's outputs where the method needs them."""

    forget_logits: torch.Tensor
    forget_labels: torch.Tensor
    retain_logits: torch.Tensor | None = None
    retain_labels: torch.Tensor | None = None
    ref_forget_logits: torch.Tensor | None = None
    ref_retain_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[LossInputs, object], dict[str, torch.Tensor]]   # unweighted terms: "forget" (and "retain")
    summary: str
    settings: type | None = None       # dataclass of the method's own settings
    needs_retain: bool = False
    needs_reference: bool = False      # forward passes of the frozen start model
    forget_answers: str | None = None  # "idk": forget questions are answered with refusals
    ascent: bool = False               # the forget term is -cross-entropy: unbounded below, so divergence is watched
    forget_mean_over: str = "tokens"   # what the forget term averages: "tokens" or "sequences" (NPO, SimNPO)
    default_init: str = "default"      # the LoRA initialisation `--init auto` picks
    forget_weight: float = 1.0         # the forget term's coefficient unless the config sets forget_weight
    units: Callable[[object], dict[str, str]] | None = None   # per-term mean units when they depend on settings

    def settings_of(self, cfg=None):
        """This method's settings from a config's `<method>_<setting>` values (defaults without a config)."""
        if self.settings is None:
            return None
        if cfg is None:
            return self.settings()
        return self.settings(**{f.name: getattr(cfg, f"{self.name}_{f.name}")
                                for f in dataclasses.fields(self.settings)})


METHODS: Registry[Method] = Registry("method")


def method(name: str, summary: str, **flags):
    def wrap(fn):
        METHODS.register(name, Method(name, fn, summary, **flags))
        return fn
    return wrap


def get_method(name: str) -> Method:
    return METHODS[name]


def forget_weight(m: Method, cfg) -> float:
    value = getattr(cfg, "forget_weight", None) if cfg is not None else None
    return m.forget_weight if value is None else value


def method_loss(m: Method, x: LossInputs, cfg) -> dict[str, torch.Tensor]:
    """The method's terms on one batch, each times its weight, and their sum as "loss". The training loop
    calls only this: weights and settings come from `cfg` (an UnlearnConfig) in this one place."""
    terms = m.fn(x, m.settings_of(cfg))
    weights = {"forget": forget_weight(m, cfg), "retain": getattr(cfg, "retain_weight", 1.0) if cfg else 1.0}
    weighted = {k: weights[k] * v for k, v in terms.items()}
    return {"loss": sum(weighted.values()), **weighted}


def loss_units(m: Method, cfg=None) -> dict[str, str]:
    """What each term averages over (`loku.losses.unit_counts`): the loop weighs processes and micro-batches
    by these counts so that a step's gradient is that of one mean over everything it saw."""
    if m.units is not None:
        return m.units(m.settings_of(cfg))
    return {"forget": m.forget_mean_over, "retain": "tokens"}


def setting_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """(config key, type, field) of every registered method's settings: `npo_beta`, `simnpo_margin`, ...
    `UnlearnConfig` adds these as its own fields, so each is a YAML key and a flag."""
    out = []
    for name, m in METHODS.items():
        if m.settings is None:
            continue
        types = hints(m.settings)
        for f in dataclasses.fields(m.settings):
            info = dict(f.metadata)
            info["help"] = f"{name}: {info.get('help', '')}"
            info.setdefault("group", "Method settings")
            out.append((f"{name}_{f.name}", types[f.name], dataclasses.field(default=f.default, metadata=info)))
    return out


def retain_ce(x: LossInputs) -> torch.Tensor:
    return cross_entropy(x.retain_logits, x.retain_labels)


# ------------------------------------------------------------------------------------------- methods

@method("ga", "gradient ascent on the forget set (diverges; no retain term)", ascent=True)
def ga(x: LossInputs, s: None):
    return {"forget": -cross_entropy(x.forget_logits, x.forget_labels)}


@method("gd", "gradient difference: ascent on forget + cross-entropy on retain", needs_retain=True, ascent=True)
def gd(x: LossInputs, s: None):
    return {"forget": -cross_entropy(x.forget_logits, x.forget_labels), "retain": retain_ce(x)}


@dataclass(frozen=True)
class KLSettings:
    reduction: str = setting("batchmean", "how the retain KL is averaged: batchmean (over every position of the "
                             "batch, padding included, as the paper's code and OpenUnlearning) or tokens (over "
                             "target tokens only).", choices=("batchmean", "tokens"))


@method("kl", "ascent on forget + KL to the frozen start model on retain", settings=KLSettings, needs_retain=True,
        needs_reference=True, ascent=True,
        units=lambda s: {"forget": "tokens", "retain": "positions" if s.reduction == "batchmean" else "tokens"})
def kl(x: LossInputs, s: KLSettings):
    return {"forget": -cross_entropy(x.forget_logits, x.forget_labels),
            "retain": kl_divergence(x.ref_retain_logits, x.retain_logits, x.retain_labels, s.reduction)}


@dataclass(frozen=True)
class NPOSettings:
    beta: float = setting(0.1, "inverse temperature of the log-ratio to the start model "
                          "(OpenUnlearning NPO.yaml: 0.1).", bound="positive")


@method("npo", "negative preference optimization against the start model + retain cross-entropy",
        settings=NPOSettings, needs_retain=True, needs_reference=True, forget_mean_over="sequences")
def npo(x: LossInputs, s: NPOSettings):
    return {"forget": npo_loss(x.forget_logits, x.ref_forget_logits, x.forget_labels, s.beta), "retain": retain_ce(x)}


@dataclass(frozen=True)
class SimNPOSettings:
    beta: float = setting(4.5, "inverse temperature (OpenUnlearning SimNPO.yaml: 4.5).", bound="positive")
    margin: float = setting(0.0, "reward margin delta in -(2/beta) logsigmoid(beta (nll/len - delta)) "
                            "(OpenUnlearning SimNPO.yaml: 0).")


@method("simnpo", "reference-free, length-normalised NPO + retain cross-entropy",
        settings=SimNPOSettings, needs_retain=True, forget_mean_over="sequences",
        forget_weight=0.125)   # OpenUnlearning SimNPO.yaml: gamma 0.125 multiplies the forget term
def simnpo(x: LossInputs, s: SimNPOSettings):
    return {"forget": simnpo_loss(x.forget_logits, x.forget_labels, s.beta, s.margin), "retain": retain_ce(x)}


@dataclass(frozen=True)
class IdKSettings:
    pooling: str = setting("pooled", "pooled: one token mean over the refusal and retain batches together, as "
                           "the paper's code (it concatenates them); separate: a mean for each, added.",
                           choices=("pooled", "separate"))


@method("idk", "cross-entropy on refusal answers to the forget questions + retain cross-entropy",
        settings=IdKSettings, needs_retain=True, forget_answers="idk",
        units=lambda s: {"forget": "pooled", "retain": "pooled"} if s.pooling == "pooled"
        else {"forget": "tokens", "retain": "tokens"})
def idk(x: LossInputs, s: IdKSettings):
    if s.pooling == "pooled":
        forget, retain = pooled_cross_entropy(x.forget_logits, x.forget_labels, x.retain_logits, x.retain_labels)
        return {"forget": forget, "retain": retain}
    return {"forget": cross_entropy(x.forget_logits, x.forget_labels), "retain": retain_ce(x)}


@method("ihl", "inverted hinge loss on forget + retain cross-entropy (LoKU)", needs_retain=True, default_init="fila")
def ihl(x: LossInputs, s: None):
    return {"forget": inverted_hinge_loss(x.forget_logits, x.forget_labels), "retain": retain_ce(x)}
