"""PrivLeak: how well Min-K% Prob tells the forget set from held-out text, relative to a retrained model.

muse_bench `metrics/privleak.py` scores each text by Min-K% (minus the mean of its k-fraction lowest token
log-probabilities: high = unlikely) and computes, for the key "forget_holdout_Min-40%", the ROC AUC with the
FORGET texts labelled 0 and the HOLDOUT texts labelled 1 on the score -Min-K%. So

    AUC = P(a holdout text is more likely than a forget text)       (ties count 1/2)

near 0 for a model that memorized the forget set, about 0.5 for one that never saw it. `eval.py`:

    PrivLeak = (AUC - AUC_retrain) / AUC_retrain x 100

negative when the model still leaks membership (the target model: about -100), 0 for the retrained model,
positive when unlearning overshoots (forget text now *less* likely than unseen text). OpenUnlearning reports
its AUC the other way round (forget texts more likely: 1 - this AUC) and flips both back in `privleak`, so
the PrivLeak values agree.

`min_k_score` and `auc` have the semantics of loku.metrics.membership (being written in parallel), which
will replace them.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import LokuError
from ..metrics.reasoning import model_device, pad_id
from ..models import context_length
from .conventions import Convention


def min_k_score(logprobs, k: float, at_least_one: bool = False) -> float:
    """Min-K% Prob: -mean of the int(k x n) lowest token log-probs (max(1, ...) with `at_least_one`).
    NaN when that count is 0 (muse_bench's np.mean of nothing)."""
    lp = np.sort(np.asarray(logprobs, dtype=np.float64))
    n = int(len(lp) * k)
    n = max(1, n) if at_least_one else n
    return float(-np.mean(lp[:n])) if n > 0 and len(lp) else math.nan


def auc(forget_scores, holdout_scores) -> float:
    """MUSE's AUC: P(holdout score < forget score) + 1/2 P(equal), i.e. sklearn's roc_auc_score with
    holdout = 1 on -score (the Mann-Whitney U of the forget scores over n_forget x n_holdout)."""
    f, h = np.asarray(forget_scores, float), np.asarray(holdout_scores, float)
    if not len(f) or not len(h):
        raise LokuError("PrivLeak needs at least one forget and one holdout text: check privleak/*.json")
    # scipy.stats takes ~1 s of CPU to import: here, not at every `loku` start (the CLI imports MUSE's configs).
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(f, h).statistic / (len(f) * len(h)))


def privleak(auc_value: float, auc_retrain: float, eps: float = 0.0) -> float:
    return (auc_value - auc_retrain) / (auc_retrain + eps) * 100


def encode(tokenizer, text: str, convention: Convention, context: int | None) -> tuple[list[int], int, bool]:
    """(token ids, index of the first scored token, cut to the model's context?) for one text."""
    ids = tokenizer(text).input_ids          # muse_bench: tokenizer.encode(text), special tokens added
    first = 1
    if convention.mia_max_tokens is not None:   # OU: at most N tokens after the prefix tokenizer("") gives
        prefix = len(tokenizer("").input_ids)
        ids, first = ids[:prefix + convention.mia_max_tokens], max(1, prefix)
    cut = context is not None and len(ids) > context
    return ids[:context] if cut else ids, first, cut


@torch.no_grad()
def token_logprobs(model, ids: list[list[int]], pad: int, batch_size: int = 8,
                   progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """log p(x_t | x_<t) for t = 1..len-1 of every sequence, batched (right-padded, longest first).
    Slow equivalent (the test's): `log_softmax(model(ids).logits[0, :-1]).gather(ids[1:])` one text at a time."""
    device = model_device(model)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[np.ndarray] = [np.zeros(0)] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)       # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)        # (B, T)
        for r, i in enumerate(rows):
            x[r, :len(ids[i])], mask[r, :len(ids[i])] = torch.tensor(ids[i]), 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits   # (B, T, V)
        for r, i in enumerate(rows):
            n = len(ids[i])
            logp = torch.log_softmax(logits[r, :n - 1].float(), dim=-1)                 # (n-1, V)
            target = x[r, 1:n].to(logp.device)                                           # (n-1,)
            out[i] = logp.gather(1, target[:, None])[:, 0].cpu().numpy()
        if progress:
            progress(len(rows))
    return out


def min_k_scores(model, tokenizer, texts: list[str], convention: Convention, k: float, batch_size: int = 8,
                 where: str = "privleak", progress: Callable[[int], None] | None = None) -> list[dict]:
    """Per text: its Min-K% score, how many tokens were scored, and whether it was cut to the context."""
    context = context_length(model)
    encoded = [encode(tokenizer, t, convention, context) for t in texts]
    logprobs = token_logprobs(model, [e[0] for e in encoded], pad_id(tokenizer), batch_size, progress)
    items = []
    for i, ((ids, first, cut), lp) in enumerate(zip(encoded, logprobs)):
        lp = lp[first - 1:] if convention.score_last_token else lp[first - 1:-1]
        score = min_k_score(lp, k, convention.min_k_at_least_one)
        if math.isnan(score):
            fix = "drop the text" + ("" if convention.min_k_at_least_one else
                                     " or pass --convention open-unlearning (at least one token)")
            raise LokuError(f"{where} text {i} has {len(lp)} scored tokens, too few for Min-{k * 100:g}% "
                            f"(muse_bench would give NaN): {fix}")
        items.append({"score": score, "tokens": len(lp), "cut_to_context": cut})
    return items


def privleak_eval(model, tokenizer, forget: list[str], holdout: list[str], convention: Convention, k: float = 0.4,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None) -> dict:
    """Min-K% of every forget and holdout text and their AUC (PrivLeak itself needs AUC_retrain)."""
    f = min_k_scores(model, tokenizer, forget, convention, k, batch_size, "privleak/forget", progress)
    h = min_k_scores(model, tokenizer, holdout, convention, k, batch_size, "privleak/holdout", progress)
    return {"auc": auc([x["score"] for x in f], [x["score"] for x in h]), "k": k,
            "items": {"forget": f, "holdout": h}}
