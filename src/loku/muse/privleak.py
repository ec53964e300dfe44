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

Min-K% and the AUC are loku.metrics.membership's (`lowest_k_mean`, `auc`; there HIGHER = MEMBER, i.e. the
mean of the lowest log-probs itself); the per-text scores kept here are muse_bench's own sign.
"""

from __future__ import annotations

import math
from typing import Callable

from ..errors import LokuError
from ..metrics.forward import pad_id, per_feature
from ..models import context_length
from .conventions import Convention


def auc(forget_scores, holdout_scores) -> float:
    """MUSE's AUC from muse_bench's Min-K% scores (high = unlikely): P(holdout score < forget score) + 1/2
    P(equal). muse_bench labels holdout 1 on -Min-K%, which is membership's score: its AUC with the holdout
    as the "members"."""
    if not len(forget_scores) or not len(holdout_scores):
        raise LokuError("PrivLeak needs at least one forget and one holdout text: check privleak/*.json")
    # loku.metrics.membership imports scikit-learn (4 s of CPU): here, not at every `loku` start (the CLI
    # imports the MUSE config classes to build its flags).
    from ..metrics.membership import auc as membership_auc

    return membership_auc([-x for x in holdout_scores], [-x for x in forget_scores])


def privleak(auc_value: float, auc_retrain: float, eps: float = 0.0) -> float:
    return (auc_value - auc_retrain) / (auc_retrain + eps) * 100


def feature(tokenizer, text: str, convention: Convention, context: int | None) -> tuple[dict, bool]:
    """One text's {"input_ids", "labels"} (labels on the tokens Min-K% scores) and whether it was cut to
    the model's context."""
    ids = tokenizer(text).input_ids          # muse_bench: tokenizer.encode(text), special tokens added
    first = 1
    if convention.mia_max_tokens is not None:   # OU: at most N tokens after the prefix tokenizer("") gives
        prefix = len(tokenizer("").input_ids)
        ids, first = ids[:prefix + convention.mia_max_tokens], max(1, prefix)
    cut = context is not None and len(ids) > context
    ids = ids[:context] if cut else ids
    labels = [-100] * first + ids[first:]
    if not convention.score_last_token and len(labels) > first:
        labels[-1] = -100
    return {"input_ids": ids, "labels": labels}, cut


def min_k_scores(model, tokenizer, texts: list[str], convention: Convention, k: float, batch_size: int = 8,
                 where: str = "privleak", progress: Callable[[int], None] | None = None) -> list[dict]:
    """Per text: its Min-K% score (muse_bench's sign: minus the mean of the lowest log-probs), how many
    tokens were scored, and whether it was cut to the context."""
    from ..metrics.membership import lowest_k_mean, token_log_probs   # as in `auc`: scikit-learn at import

    context = context_length(model)
    encoded = [feature(tokenizer, t, convention, context) for t in texts]

    def measure(logits, labels):
        token, mask, _ = token_log_probs(logits, labels)
        return {"score": -lowest_k_mean(token.double(), mask, k, convention.min_k_at_least_one),
                "tokens": mask.sum(-1)}

    got = per_feature(model, [f for f, _ in encoded], pad_id(tokenizer), measure, batch_size, progress)
    items = []
    for i, (score, n, (_, cut)) in enumerate(zip(got.get("score", []), got.get("tokens", []), encoded)):
        if n == 0 or math.isnan(score):
            fix = "drop the text" + ("" if convention.min_k_at_least_one or n == 0 else
                                     " or pass --convention open-unlearning (at least one token)")
            raise LokuError(f"{where} text {i} has {n} scored tokens, too few for Min-{k * 100:g}% "
                            f"(muse_bench would give NaN): {fix}")
        items.append({"score": score, "tokens": n, "cut_to_context": cut})
    return items


def privleak_eval(model, tokenizer, forget: list[str], holdout: list[str], convention: Convention, k: float = 0.4,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None) -> dict:
    """Min-K% of every forget and holdout text and their AUC (PrivLeak itself needs AUC_retrain)."""
    f = min_k_scores(model, tokenizer, forget, convention, k, batch_size, "privleak/forget", progress)
    h = min_k_scores(model, tokenizer, holdout, convention, k, batch_size, "privleak/holdout", progress)
    return {"auc": auc([x["score"] for x in f], [x["score"] for x in h]), "k": k,
            "items": {"forget": f, "holdout": h}}
