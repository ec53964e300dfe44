"""Preference-style methods: the forget answers are the dispreferred side (npo, simnpo, dpo), or refusals are
taught in their place (idk)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config_base import setting
from ..losses import cross_entropy, npo_loss, pooled_cross_entropy, sequence_logprob, simnpo_loss
from .base import LossInputs, method, retain_ce


@dataclass(frozen=True)
class NPOSettings:
    beta: float = setting(0.1, "inverse temperature of the log-ratio to the start model "
                          "(OpenUnlearning NPO.yaml: 0.1).", bound="positive")


@method("npo", "negative preference optimization against the start model + retain cross-entropy",
        settings=NPOSettings, needs_retain=True, needs_reference=True, reference_on=("forget",),
        forget_mean_over="sequences")
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


def dpo_loss(win_logits: torch.Tensor, ref_win_logits: torch.Tensor, win_labels: torch.Tensor,
             lose_logits: torch.Tensor, ref_lose_logits: torch.Tensor, lose_labels: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """DPO over sequence sums: batch mean of -(2/beta) log sigmoid(beta (log-ratio(win) - log-ratio(lose))), each
    log-ratio the sequence's summed target log-prob minus the start model's (OpenUnlearning `compute_dpo_loss`;
    its NPO is this without a preferred side). (2/beta) log 2 while the model is its reference."""
    win = sequence_logprob(win_logits, win_labels) - sequence_logprob(ref_win_logits, win_labels)          # (B,)
    lose = sequence_logprob(lose_logits, lose_labels) - sequence_logprob(ref_lose_logits, lose_labels)     # (B,)
    return -(2.0 / beta) * F.logsigmoid(beta * (win - lose)).mean()


@dataclass(frozen=True)
class DPOSettings:
    beta: float = setting(0.1, "inverse temperature of the log-ratios to the start model "
                          "(OpenUnlearning DPO.yaml: 0.1).", bound="positive")


@method("dpo", "DPO preferring a refusal over the forget answer (IdkDPO) + retain cross-entropy",
        settings=DPOSettings, needs_retain=True, needs_reference=True, reference_on=("forget", "alt"),
        forget_answers="idk-pair",
        forget_mean_over="sequences")
def dpo(x: LossInputs, s: DPOSettings):
    return {"forget": dpo_loss(x.alt_logits, x.ref_alt_logits, x.alt_labels, x.forget_logits, x.ref_forget_logits,
                               x.forget_labels, s.beta),
            "retain": retain_ce(x)}
