"""Token-level forget terms that reweight or retarget each token: wga, satimp (weighted ascent), undial
(self-distillation from an adjusted teacher), ceu (cross-entropy to the distribution without the true token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config_base import setting
from ..losses import IGNORE, token_logprobs, upcast
from .base import LossInputs, method, retain_ce


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Weighted gradient ascent: mean over target tokens of -w CE with w = p(y)^beta (no gradient through w), so
    tokens the model already finds unlikely stop being pushed. OpenUnlearning `compute_wga_loss`."""
    logp, mask = token_logprobs(logits, labels)                            # (B, T-1): -CE
    weight = logp.detach().exp() ** beta
    return _masked_mean(weight * logp, mask)


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, beta1: float = 5.0, beta2: float = 1.0) -> torch.Tensor:
    """SatImp: mean over target tokens of -w CE with w = p(y)^beta1 (1 - p(y))^beta2 (no gradient through w):
    saturation (p^beta1) and importance ((1-p)^beta2) weights. OpenUnlearning `compute_satimp_loss`."""
    logp, mask = token_logprobs(logits, labels)
    p = logp.detach().exp()
    return _masked_mean(p ** beta1 * (1 - p) ** beta2 * logp, mask)


def undial_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float = 10.0) -> torch.Tensor:
    """UNDIAL: cross-entropy from the model to the start model's distribution with the target token's logit
    lowered by beta, softmax in float32, averaged over every predicting position (B x (T-1)), as OpenUnlearning
    `compute_undial_loss`. Positions without a target (-100) keep the teacher's distribution unchanged (the
    reference indexes the logit -100 there: README "differences")."""
    logits, teacher, labels = upcast(logits[:, :-1]), upcast(ref_logits[:, :-1]), labels[:, 1:]    # (B, T-1, V)
    mask = labels != IGNORE
    onehot = F.one_hot(labels.clamp(min=0), logits.shape[-1]) * mask.unsqueeze(-1)                # (B, T-1, V)
    soft = F.softmax(teacher - beta * onehot, dim=-1)
    return -(soft * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def ceu_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_first: int = 1) -> torch.Tensor:
    """CE-U: cross-entropy from the model to its own distribution with the true token removed (its logit set to
    -inf, no gradient through that target), mean over target tokens; the first `ignore_first` target tokens of
    each sequence are left out (OpenUnlearning `compute_batch_ceu`, the paper's footnote)."""
    logits, labels = upcast(logits[:, :-1]), ceu_labels(labels, ignore_first)[:, 1:]
    mask = labels != IGNORE
    target = logits.detach().scatter(-1, labels.clamp(min=0).unsqueeze(-1), float("-inf")).softmax(-1)
    per_token = -(target * F.log_softmax(logits, -1)).sum(-1)                # (B, T-1)
    return _masked_mean(per_token, mask)


def ceu_labels(labels: torch.Tensor, ignore_first: int) -> torch.Tensor:
    """`labels` with each row's first `ignore_first` target tokens masked (-100)."""
    valid = labels != IGNORE
    return labels.masked_fill((valid.cumsum(-1) <= ignore_first) & valid, IGNORE)


@dataclass(frozen=True)
class WGASettings:
    beta: float = setting(1.0, "exponent of the token weight p(y)^beta (OpenUnlearning WGA.yaml: 1).",
                          bound="non-negative")


@method("wga", "weighted gradient ascent (token weight p(y)^beta) + retain cross-entropy", settings=WGASettings,
        needs_retain=True)
def wga(x: LossInputs, s: WGASettings):
    return {"forget": wga_loss(x.forget_logits, x.forget_labels, s.beta), "retain": retain_ce(x)}


@dataclass(frozen=True)
class SatImpSettings:
    beta1: float = setting(5.0, "saturation exponent: weight p(y)^beta1 (OpenUnlearning SatImp.yaml: 5).",
                           bound="non-negative")
    beta2: float = setting(1.0, "importance exponent: weight (1 - p(y))^beta2 (OpenUnlearning SatImp.yaml: 1).",
                           bound="non-negative")


@method("satimp", "saturation-importance weighted ascent + retain cross-entropy", settings=SatImpSettings,
        needs_retain=True, forget_weight=0.1)   # OpenUnlearning SatImp.yaml: gamma 0.1, alpha 1
def satimp(x: LossInputs, s: SatImpSettings):
    return {"forget": satimp_loss(x.forget_logits, x.forget_labels, s.beta1, s.beta2), "retain": retain_ce(x)}


@dataclass(frozen=True)
class UNDIALSettings:
    beta: float = setting(10.0, "how far the target token's logit is lowered in the teacher "
                          "(OpenUnlearning UNDIAL.yaml: 10).", bound="non-negative")


# OpenUnlearning UNDIAL.yaml: alpha 0, so no retain term (and no retain set needed).
@method("undial", "self-distillation towards the start model with the target token's logit lowered",
        settings=UNDIALSettings, needs_reference=True, reference_on=("forget",),
        units=lambda s: {"forget": "predictions"})
def undial(x: LossInputs, s: UNDIALSettings):
    return {"forget": undial_loss(x.forget_logits, x.ref_forget_logits, x.forget_labels, s.beta)}


@dataclass(frozen=True)
class CEUSettings:
    ignore_first_n_answer_tokens: int = setting(1, "target tokens left out at the start of each answer "
                                                "(OpenUnlearning CEU.yaml: 1).", bound="non-negative")


def _ceu_units(s: CEUSettings):
    def count(labels):
        return float((ceu_labels(labels, s.ignore_first_n_answer_tokens)[:, 1:] != IGNORE).sum())
    return {"forget": count}


@method("ceu", "cross-entropy unlearning: towards the model's distribution without the true token (no retain)",
        settings=CEUSettings, units=_ceu_units)
def ceu(x: LossInputs, s: CEUSettings):
    return {"forget": ceu_loss(x.forget_logits, x.forget_labels, s.ignore_first_n_answer_tokens)}
