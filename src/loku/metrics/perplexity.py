"""Perplexity on held-out text (the Pile and WikiText sets of the TDEC protocol).

Unlearning by gradient ascent can wreck a model's language modelling while leaving multiple-choice
accuracy nearly intact, so perplexity on general text is the first utility number to watch.
Aggregation is token-weighted over the whole set, exp(sum of NLL / number of predicted tokens), so a
long document counts by its tokens, not once (Jang et al. average per-batch mean losses instead).
"""

from __future__ import annotations

import math

import torch

from .reasoning import model_device, pad_id


@torch.no_grad()   # not inference_mode: ZeRO-3 keeps weights gathered here, and training reuses them
def sequence_nll(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 512) -> list[dict]:
    """Per text: index, `nll` (summed negative log-likelihood in nats) and `tokens` (how many were predicted).

    Each text keeps its FIRST `max_length` tokens (as Jang et al.); every token but the first is predicted
    from the ones before it (with a BOS-adding tokenizer, the first is predicted too). Right padding,
    masked out of the loss by the attention mask, not by the pad id (pad is often EOS, a real token).

    Slow equivalent: for each text alone, `model(ids, labels=ids).loss * (len(ids) - 1)`."""
    device = model_device(model)
    encoded = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]
    out = [{"index": i, "nll": 0.0, "tokens": 0} for i in range(len(texts))]  # < 2 tokens: nothing to predict
    order = sorted((i for i in range(len(encoded)) if len(encoded[i]) >= 2), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)                    # (B, T)
        for r, i in enumerate(rows):
            input_ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
            attention_mask[r, :len(encoded[i])] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits              # (B, T, V)
        for r, i in enumerate(rows):  # one row at a time: a (T, V) float32 copy, not (B, T, V)
            n = len(encoded[i])
            logp = torch.log_softmax(logits[r, :n - 1].float(), dim=-1)                        # (n-1, V)
            nll = -logp.gather(1, input_ids[r, 1:n, None]).sum()
            out[i] = {"index": i, "nll": float(nll), "tokens": n - 1}
    return out


def token_weighted_perplexity(results: list[dict]) -> float:
    """exp(total NLL / total predicted tokens) over a set; inf when nothing was predicted."""
    tokens = sum(r["tokens"] for r in results)
    return math.exp(sum(r["nll"] for r in results) / tokens) if tokens else math.inf
