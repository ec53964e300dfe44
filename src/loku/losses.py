"""Unlearning objectives as small pure functions over logits and labels.

The training loop runs the model once per batch and hands the outputs here; no loss calls a model.
Labels are aligned with the inputs as in Hugging Face (position t predicts labels[t] from inputs <t
after the shift done here), and -100 marks tokens without loss.

The methods built from these and the other OpenUnlearning methods, their settings and `method_loss` live in
the package `loku.methods`; they stay importable from here (`from loku.losses import METHODS, method_loss`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -100


def shift(logits: torch.Tensor, labels: torch.Tensor):
    """(B, T, V), (B, T) -> logits (B, T-1, V) predicting labels (B, T-1), and the mask of real targets."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels, labels != IGNORE


def upcast(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32, or kept in float64 (half and bfloat16 logits are upcast before a softmax)."""
    return t if t.dtype == torch.float64 else t.float()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE):
    """log p(y_t | y_<t) for every target token in float32 or wider (0 where masked), and the mask. (B, T-1)
    The vocabulary-wide softmax runs on the target positions only (a batch of mixed lengths is often half
    padding); each row's softmax is its own, so values and gradients are those of the softmax over every row."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    rows = upcast(logits[mask])                                             # (N, V)
    logp = torch.zeros(labels.shape, dtype=rows.dtype, device=rows.device)
    logp = logp.masked_scatter(mask, -F.cross_entropy(rows, labels[mask], reduction="none"))
    return logp, mask


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked targets (the usual LM loss)."""
    logp, mask = token_logprobs(logits, labels, ignore_index)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def held_cross_entropy(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over target tokens of max(0, log p_ref(y) - log p(y)): the cross-entropy a token LOST against the
    frozen start model, zero where it is as likely as before or more. Pulls back only what fell, so a retain
    batch the model already knows is held where it was instead of being fine-tuned further (plain ce keeps
    raising its tokens' probability, which moves the rest of the model)."""
    logp, mask = token_logprobs(logits, labels)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(ref_logits, labels)
    lost = (ref_logp - logp).clamp(min=0)
    return (lost * mask).sum() / mask.sum().clamp(min=1)


def pooled_cross_entropy(a_logits: torch.Tensor, a_labels: torch.Tensor, b_logits: torch.Tensor,
                         b_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two batches' shares of ONE token mean over both: (sum_a / (n_a + n_b), sum_b / (n_a + n_b)).
    Their sum is the cross-entropy of the two batches concatenated (as the IdK reference computes it)."""
    logp_a, mask_a = token_logprobs(a_logits, a_labels)
    logp_b, mask_b = token_logprobs(b_logits, b_labels)
    n = (mask_a.sum() + mask_b.sum()).clamp(min=1)
    return -(logp_a * mask_a).sum() / n, -(logp_b * mask_b).sum() / n


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
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index                                           # (B, T-1)
    # the vocabulary-wide work on the target positions only (each row's own: the same values and gradients)
    logits, target = logits[mask].float(), labels[mask].unsqueeze(-1)      # (N, V), (N, 1)
    lse = torch.logsumexp(logits, dim=-1)                                   # (N,)
    logit_y = logits.gather(-1, target).squeeze(-1)                         # (N,)
    top2_val, top2_idx = logits.topk(2, dim=-1)                             # (N, 2)
    y_is_top = top2_idx[..., 0] == target.squeeze(-1)
    logit_other = torch.where(y_is_top, top2_val[..., 1], top2_val[..., 0])  # best v != y
    p_y, p_other = torch.exp(logit_y - lse), torch.exp(logit_other - lse)
    per_token = 1.0 + p_y - p_other                                         # (N,) in [0, 2]
    per_token = torch.zeros(mask.shape, dtype=per_token.dtype, device=per_token.device).masked_scatter(mask, per_token)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)   # summed as (B, T-1): the same float as before


def npo_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO's forget term: batch mean of -(2/beta) log sigmoid(-beta (log pi(y) - log pi_ref(y))), with
    log pi(y) the sequence's summed target log-prob. Equals (2/beta) log 2 while the model is its reference."""
    log_ratio = sequence_logprob(logits, labels) - sequence_logprob(ref_logits, labels)      # (B,)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = 4.5, delta: float = 0.0) -> torch.Tensor:
    """SimNPO's forget term (before its coefficient): batch mean of -(2/beta) log sigmoid(beta (nll/len - delta)),
    nll the sequence's summed target cross-entropy and len its number of target tokens. Reference-free and
    length-normalised NPO; delta is the reward margin. Defaults: OpenUnlearning's configs/trainer/SimNPO.yaml."""
    avg_nll = -sequence_logprob(logits, labels, mean=True)                  # (B,)
    return -(2.0 / beta) * F.logsigmoid(beta * (avg_nll - delta)).mean()


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(p_ref || p_model) per position, in float32, reduced as
    - "batchmean": the mean over ALL B x T positions, padding included: torch's kl_div(reduction="batchmean")
      on logits flattened to (B*T, V), as the paper's code and OpenUnlearning compute it;
    - "tokens": the mean over the positions that predict a target token (labels != -100)."""
    if reduction == "batchmean":
        ref_logp = F.log_softmax(ref_logits.float(), -1)                    # (B, T, V)
        logp = F.log_softmax(logits.float(), -1)
        return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
    if reduction != "tokens":
        raise ValueError(f"unknown KL reduction {reduction!r}: batchmean or tokens")
    logits, _, mask = shift(logits, labels)
    # the target positions only, before the softmaxes: a retain batch of mixed lengths is often half padding
    ref_logp = F.log_softmax(ref_logits[:, :-1][mask].float(), -1)          # (N, V)
    logp = F.log_softmax(logits[mask].float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum() / mask.sum().clamp(min=1)


# A method may also give a function of its batch's labels as a unit (CE-U leaves out each answer's first tokens).
def unit_counts(units: dict, forget_labels: torch.Tensor, retain_labels: torch.Tensor | None) -> dict[str, float]:
    """The denominator of each term's mean in this batch: "tokens" (target tokens of its own batch, after the
    shift), "sequences" (rows), "positions" (rows x length, padding included: KL's batchmean), "predictions"
    (rows x (length - 1): every predicting position, UNDIAL), "labels" (kept labels before the shift: PDU, RMU,
    LUNAR), "pooled" (target tokens of the forget and retain batches together: IdK's one mean over both), or a
    function of the labels. A term other than forget and retain (a constant penalty) counts as its forget batch."""
    def tokens(labels):
        return float((labels[:, 1:] != IGNORE).sum()) if labels is not None else 0.0

    batch = {"forget": forget_labels, "retain": retain_labels}
    out = {}
    for term, unit in units.items():
        labels = batch.get(term, forget_labels)
        if labels is None:
            out[term] = 0.0
        elif callable(unit):
            out[term] = float(unit(labels))
        elif unit == "sequences":
            out[term] = float(labels.shape[0])
        elif unit == "positions":
            out[term] = float(labels.shape[0] * labels.shape[1])
        elif unit == "predictions":
            out[term] = float(labels.shape[0] * (labels.shape[1] - 1))
        elif unit == "labels":
            out[term] = float((labels != IGNORE).sum())
        elif unit == "pooled":
            out[term] = tokens(forget_labels) + tokens(retain_labels)
        else:
            out[term] = tokens(labels)
    return out


def global_mean_scales(units: str | dict[str, str], forget_labels: torch.Tensor, retain_labels: torch.Tensor | None,
                       sum_over_processes: Callable[[torch.Tensor], torch.Tensor], world: int) -> dict[str, float]:
    """Per-term factors that turn each process's mean into its share of the mean over the whole global batch.

    Each process averages its own tokens (or sequences); DDP then averages the processes' gradients, which
    weighs a process with few tokens like one with many. Scaling a term by local count / (global count /
    world) makes the averaged gradient exactly that of one process on the whole batch, for any lengths.
    `units`: what each term averages (`loku.methods.loss_units`), or the forget term's unit alone (the
    retain term then averages tokens)."""
    if isinstance(units, str):
        units = {"forget": units, "retain": "tokens"}
    counts = unit_counts(units, forget_labels, retain_labels)
    names = list(counts)
    local = torch.tensor([counts[k] for k in names], dtype=torch.float64, device=forget_labels.device)
    total = sum_over_processes(local.clone())
    return {k: float(l * world / t) if t > 0 else 1.0 for k, l, t in zip(names, local.tolist(), total.tolist())}


def __getattr__(name: str):
    # The method registry and `method_loss` live in loku.methods, which imports the functions above; a
    # lazy lookup keeps `from loku.losses import METHODS, method_loss` working without an import cycle.
    from . import methods

    if name in methods.__all__:
        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
