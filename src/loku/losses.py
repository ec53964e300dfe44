"""Unlearning objectives as small pure functions over logits and labels.

The training loop runs the model once per batch and hands the outputs here; no loss calls a model.
Labels are aligned with the inputs as in Hugging Face (position t predicts labels[t] from inputs <t
after the shift done here), and -100 marks tokens without loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .registry import Registry

IGNORE = -100


def shift(logits: torch.Tensor, labels: torch.Tensor):
    """(B, T, V), (B, T) -> logits (B, T-1, V) predicting labels (B, T-1), and the mask of real targets."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels, labels != IGNORE


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE):
    """log p(y_t | y_<t) for every target token in float32 (0 where masked), and the mask. Shapes (B, T-1)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                          reduction="none").view(labels.shape)
    return -nll, mask


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked targets (the usual LM loss)."""
    logp, mask = token_logprobs(logits, labels, ignore_index)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Per-sequence sum (or mean) of target log-probs. Shape (B,)."""
    logp, mask = token_logprobs(logits, labels)
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if mean else total


def inverted_hinge_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean over unmasked target tokens of 1 + p(y) - max_{v != y} p(v), softmax in float32.

    Bounded in [0, 2]: it lowers the memorized token until a runner-up overtakes it and then stops
    pushing, where gradient ascent keeps driving log p(y) to -inf. The gradient only touches p(y)
    and the strongest competitor, so the rest of the distribution is left alone.
    Slow equivalent: p = logits.float().softmax(-1); p_other = p.scatter(-1, y, -1).amax(-1).
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]                  # (B, T-1, V), (B, T-1)
    mask = labels != ignore_index
    target = labels.clamp(min=0).unsqueeze(-1)                              # (B, T-1, 1)
    lse = torch.logsumexp(logits, dim=-1)                                   # (B, T-1)
    logit_y = logits.gather(-1, target).squeeze(-1)                         # (B, T-1)
    top2_val, top2_idx = logits.topk(2, dim=-1)                             # (B, T-1, 2)
    y_is_top = top2_idx[..., 0] == target.squeeze(-1)
    logit_other = torch.where(y_is_top, top2_val[..., 1], top2_val[..., 0])  # best v != y
    p_y, p_other = torch.exp(logit_y - lse), torch.exp(logit_other - lse)
    per_token = 1.0 + p_y - p_other                                         # (B, T-1) in [0, 2]
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


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


@dataclass
class LossSettings:
    retain_weight: float = 1.0
    npo_beta: float = 0.1
    simnpo_beta: float = 4.5   # OpenUnlearning's SimNPO defaults
    simnpo_gamma: float = 0.125


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[LossInputs, LossSettings], dict[str, torch.Tensor]]
    summary: str
    needs_retain: bool = False
    needs_reference: bool = False  # forward passes of the frozen start model
    forget_answers: str | None = None  # "idk": forget questions are answered with refusals
    ascent: bool = False  # the forget term is -cross-entropy: unbounded below, so divergence is watched
    forget_mean_over: str = "tokens"  # what the forget term averages: "tokens" or "sequences" (NPO, SimNPO)


METHODS: Registry[Method] = Registry("method")


def method(name: str, summary: str, **flags):
    def wrap(fn):
        METHODS.register(name, Method(name, fn, summary, **flags))
        return fn
    return wrap


def _retain_ce(x: LossInputs, s: LossSettings) -> torch.Tensor:
    return s.retain_weight * cross_entropy(x.retain_logits, x.retain_labels)


def _total(**terms: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"loss": sum(terms.values()), **terms}


@method("ga", "gradient ascent on the forget set (diverges; no retain term)", ascent=True)
def ga(x: LossInputs, s: LossSettings):
    return _total(forget=-cross_entropy(x.forget_logits, x.forget_labels))


@method("gd", "gradient difference: ascent on forget + cross-entropy on retain", needs_retain=True,
        ascent=True)
def gd(x: LossInputs, s: LossSettings):
    return _total(forget=-cross_entropy(x.forget_logits, x.forget_labels), retain=_retain_ce(x, s))


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over target tokens of KL(p_ref || p_model), in float32."""
    _, _, mask = shift(logits, labels)
    ref_logp = F.log_softmax(ref_logits[:, :-1].float(), -1)
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)                       # (B, T-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


@method("kl", "ascent on forget + KL to the frozen start model on retain", needs_retain=True,
        needs_reference=True, ascent=True)
def kl(x: LossInputs, s: LossSettings):
    return _total(forget=-cross_entropy(x.forget_logits, x.forget_labels),
                  retain=s.retain_weight * kl_divergence(x.ref_retain_logits, x.retain_logits, x.retain_labels))


@method("npo", "negative preference optimization against the start model + retain cross-entropy",
        needs_retain=True, needs_reference=True, forget_mean_over="sequences")
def npo(x: LossInputs, s: LossSettings):
    log_ratio = sequence_logprob(x.forget_logits, x.forget_labels) - sequence_logprob(
        x.ref_forget_logits, x.forget_labels)                               # (B,)
    forget = -(2.0 / s.npo_beta) * F.logsigmoid(-s.npo_beta * log_ratio).mean()
    return _total(forget=forget, retain=_retain_ce(x, s))


@method("simnpo", "reference-free, length-normalised NPO + retain cross-entropy", needs_retain=True,
        forget_mean_over="sequences")
def simnpo(x: LossInputs, s: LossSettings):
    avg_logp = sequence_logprob(x.forget_logits, x.forget_labels, mean=True)  # (B,)
    forget = -(2.0 / s.simnpo_beta) * F.logsigmoid(-s.simnpo_beta * avg_logp - s.simnpo_gamma).mean()
    return _total(forget=forget, retain=_retain_ce(x, s))


@method("idk", "cross-entropy on refusal answers to the forget questions + retain cross-entropy",
        needs_retain=True, forget_answers="idk")
def idk(x: LossInputs, s: LossSettings):
    return _total(forget=cross_entropy(x.forget_logits, x.forget_labels), retain=_retain_ce(x, s))


@method("ihl", "inverted hinge loss on forget + retain cross-entropy (LoKU)", needs_retain=True)
def ihl(x: LossInputs, s: LossSettings):
    return _total(forget=inverted_hinge_loss(x.forget_logits, x.forget_labels), retain=_retain_ce(x, s))


def global_mean_scales(forget_mean_over: str, forget_labels: torch.Tensor, retain_labels: torch.Tensor | None,
                       sum_over_processes: Callable[[torch.Tensor], torch.Tensor], world: int) -> dict[str, float]:
    """Per-term factors that turn each process's mean into its share of the mean over the whole global batch.

    Each process averages its own tokens (or sequences); DDP then averages the processes' gradients, which
    weighs a process with few tokens like one with many. Scaling a term by local count / (global count /
    world) makes the averaged gradient exactly that of one process on the whole batch, for any lengths.
    `forget_mean_over`: what the forget term averages ("tokens" or "sequences"); retain terms average tokens."""
    def count(labels, unit):
        return float(labels.shape[0]) if unit == "sequences" else float((labels[:, 1:] != IGNORE).sum())

    local = torch.tensor([count(forget_labels, forget_mean_over),
                          count(retain_labels, "tokens") if retain_labels is not None else 0.0],
                         dtype=torch.float64, device=forget_labels.device)
    total = sum_over_processes(local.clone())
    scale = [float(l * world / t) if t > 0 else 1.0 for l, t in zip(local.tolist(), total.tolist())]
    return {"forget": scale[0], "retain": scale[1]}


def get_method(name: str) -> Method:
    return METHODS[name]


def method_loss(method: Method, x: LossInputs, cfg) -> dict[str, torch.Tensor]:
    """`method`'s weighted loss terms plus "loss" (their sum) on one micro-batch's outputs, its settings taken
    from `cfg` (an UnlearnConfig). The training loop calls methods only through this."""
    return method.fn(x, LossSettings(cfg.retain_weight, cfg.npo_beta, cfg.simnpo_beta, cfg.simnpo_gamma))
