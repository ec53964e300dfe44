"""Gradient ascent and its retain-regularised variants: ga, gd, kl."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import setting
from ..losses import cross_entropy, kl_divergence
from .base import LossInputs, method, retain_ce


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
        needs_reference=True, reference_on=("retain",), ascent=True,
        units=lambda s: {"forget": "tokens", "retain": "positions" if s.reduction == "batchmean" else "tokens"})
def kl(x: LossInputs, s: KLSettings):
    return {"forget": -cross_entropy(x.forget_logits, x.forget_labels),
            "retain": kl_divergence(x.ref_retain_logits, x.retain_logits, x.retain_labels, s.reduction)}
