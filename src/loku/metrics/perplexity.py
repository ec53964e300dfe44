"""Perplexity on held-out text (the Pile and WikiText sets of the TDEC protocol).

Unlearning by gradient ascent can wreck a model's language modelling while leaving multiple-choice
accuracy nearly intact, so perplexity on general text is the first utility number to watch.
Aggregation is token-weighted over the whole set, exp(sum of NLL / number of predicted tokens), so a
long document counts by its tokens, not once (Jang et al. average per-batch mean losses instead).
"""

from __future__ import annotations

import math

from ..losses import sequence_logprob
from .forward import pad_id, per_feature


def sequence_nll(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 512) -> list[dict]:
    """Per text: index, `nll` (summed negative log-likelihood in nats) and `tokens` (how many were predicted).

    Each text keeps its FIRST `max_length` tokens (as Jang et al.); every token but the first is predicted
    from the ones before it (with a BOS-adding tokenizer, the first is predicted too), in teacher-forced
    batches (`loku.metrics.forward`: right padding, masked out of attention and loss).

    Slow equivalent: for each text alone, `model(ids, labels=ids).loss * (len(ids) - 1)`."""
    encoded = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]
    scored = [i for i, ids in enumerate(encoded) if len(ids) >= 2]   # < 2 tokens: nothing to predict
    nll = per_feature(model, [{"input_ids": encoded[i], "labels": [-100] + encoded[i][1:]} for i in scored],
                      pad_id(tokenizer), lambda logits, labels: {"nll": -sequence_logprob(logits, labels)},
                      batch_size).get("nll", [])
    out = [{"index": i, "nll": 0.0, "tokens": 0} for i in range(len(texts))]
    for i, value in zip(scored, nll):
        out[i] = {"index": i, "nll": value, "tokens": len(encoded[i]) - 1}
    return out


def token_weighted_perplexity(results: list[dict]) -> float:
    """exp(total NLL / total predicted tokens) over a set; inf when nothing was predicted."""
    tokens = sum(r["tokens"] for r in results)
    return math.exp(sum(r["nll"] for r in results) / tokens) if tokens else math.inf
