"""Perplexity on held-out text (the Pile and WikiText sets of the TDEC protocol).

Unlearning by gradient ascent can wreck a model's language modelling while leaving multiple-choice
accuracy nearly intact, so perplexity on general text is the first utility number to watch.
Aggregation is token-weighted over the whole set, exp(sum of NLL / number of predicted tokens), so a
long document counts by its tokens, not once (Jang et al. average per-batch mean losses instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.batches import collate
from ..losses import IGNORE
from ..models import model_device
from .reasoning import pad_id


@torch.no_grad()   # not inference_mode: ZeRO-3 keeps weights gathered here, and training reuses them
def sequence_nll(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 512) -> list[dict]:
    """Per text: index, `nll` (summed negative log-likelihood in nats) and `tokens` (how many were predicted).

    Each text keeps its FIRST `max_length` tokens (as Jang et al.); every token but the first is predicted
    from the ones before it (with a BOS-adding tokenizer, the first is predicted too).

    Slow equivalent: for each text alone, `model(ids, labels=ids).loss * (len(ids) - 1)`."""
    encoded = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]
    scored = [i for i, ids in enumerate(encoded) if len(ids) >= 2]   # < 2 tokens: nothing to predict
    sums, counts = sequence_losses(model, [{"input_ids": encoded[i], "labels": [IGNORE] + encoded[i][1:]}
                                           for i in scored], pad_id(tokenizer), batch_size)
    out = [{"index": i, "nll": 0.0, "tokens": 0} for i in range(len(texts))]
    for i, nll, n in zip(scored, sums, counts):
        out[i] = {"index": i, "nll": nll, "tokens": n}
    return out


@torch.no_grad()   # not inference_mode: ZeRO-3 keeps weights gathered here, and training reuses them
def sequence_losses(model, features: list[dict], pad_id: int, batch_size: int = 8) -> tuple[list[float], list[int]]:
    """(summed loss, labelled-token count) of each feature (`input_ids`, `labels` -100 where no loss applies).

    Slow equivalent, the test's reference: for each feature alone, `logits = model(ids[None]).logits[0]`
    and `F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")`. Batches are
    right-padded (masked) and sorted by length so little compute goes to padding.
    """
    device = model_device(model)
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    sums, counts = [0.0] * len(features), [0] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in idx], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"]                                                                     # (B, T)
        target = labels[:, 1:]                                                                       # (B, T-1)
        keep = target != -100                                                                        # (B, T-1)
        # cross-entropy only where a label is, in float32 whatever the model's dtype: (N, V) -> (N,)
        token_loss = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
        per_seq = torch.zeros(len(idx), device=device).index_put_(
            (keep.nonzero()[:, 0],), token_loss, accumulate=True)                                    # (B,)
        n_tokens = (labels != -100).sum(-1)  # TOFU counts unshifted labels: the same, as position 0 is prompt
        for j, i in enumerate(idx):
            sums[i], counts[i] = float(per_seq[j]), int(n_tokens[j])
    return sums, counts


def token_weighted_perplexity(results: list[dict]) -> float:
    """exp(total NLL / total predicted tokens) over a set; inf when nothing was predicted."""
    tokens = sum(r["tokens"] for r in results)
    return math.exp(sum(r["nll"] for r in results) / tokens) if tokens else math.inf
