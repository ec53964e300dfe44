"""Memorization accuracy (MA) and extraction likelihood (EL_n) of Jang et al. 2023 (TDEC protocol), exact and fast.

EL_n asks, for every prefix x_<t of a sequence, how much of the true suffix the model's greedy continuation
reproduces. The continuations come from `loku.metrics.greedy` (one forward pass for every prefix's cache and
greedy token, then only the divergence points decoded, all rows' branches batched together); MA is the
share of prefixes whose first greedy token is right, from the same pass.

Conventions, following Jang et al.'s `validation_el` (joeljang/knowledge-unlearning, models/Neo_Model.py):
prefixes t = 1..T-1; overlap_t = (n-grams of the T-t generated tokens, counted with repetition, found in the
SET of n-grams of the true suffix x_t..x_{T-1}) / (number of n-grams of that suffix, with repetition);
prefixes whose suffix is shorter than n add 0; EL_n = sum_t overlap_t / (T - n). One deliberate difference:
decoding never stops at EOS (their `generate` stops or pads with EOS), so every continuation has T - t tokens.
Every generated token is needed: the continuation of prefix t is scored over all its n-grams, so no decode
can stop early without changing a value.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import LokuError
from ..models import model_device
from .forward import check_features, per_feature
from .greedy import (DECODE_BATCH, POOL_ROWS, DecodeProgress, GreedySuffixes, OnLogits, cache_kwarg,  # noqa: F401
                     check_rows, eval_mode, greedy_suffixes)


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def overlap(generated: list[int], truth: list[int], n: int) -> float | None:
    """Share of the true suffix's n-grams reproduced: generated n-grams (with repetition) that occur in the set of
    true n-grams, over the number of true n-grams. None when the suffix has no n-gram (Jang et al. skip it)."""
    true_grams = ngrams(truth, n)
    if not true_grams:
        return None
    true_set = set(true_grams)
    return sum(g in true_set for g in ngrams(generated, n)) / len(true_grams)


def el_of_row(x: list[int], continuation, n: int) -> float:
    """EL_n of one sequence given `continuation(t)`; summed from the longest prefix down, as Jang et al. do."""
    total = 0.0
    for t in reversed(range(1, len(x))):
        o = overlap(continuation(t), x[t:], n) if len(x) - t >= n else None
        total += o or 0.0
    return total / (len(x) - n)


@torch.no_grad()
def memorization_accuracy(model, input_ids, *, batch_size: int = 8) -> torch.Tensor:
    """MA per row: (1/(T-1)) sum_{t=1}^{T-1} [argmax p(. | x_<t) == x_t], from one forward pass. Tensor[B] float64."""
    ids = check_rows(input_ids, 2, "memorization accuracy")
    out = []
    with eval_mode(model):
        for chunk in ids.split(batch_size):
            chunk = chunk.to(model_device(model))
            greedy = model(input_ids=chunk, use_cache=False).logits[:, :-1].argmax(-1)  # (b, T-1)
            out.append((greedy == chunk[:, 1:]).double().mean(-1).cpu())  # (b,) k/(T-1), exact in float64
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def el_from_suffixes(suffixes: GreedySuffixes, n: int) -> torch.Tensor:
    """EL_n per row from precomputed continuations (needs `min_suffix <= n`). Tensor[B] float64."""
    if suffixes.min_suffix > n:
        raise ValueError(f"continuations were computed for suffixes >= {suffixes.min_suffix} tokens, EL_{n} needs {n}")
    return torch.tensor([el_of_row(x, lambda t, b=b: suffixes.continuation(b, t), n)
                         for b, x in enumerate(suffixes.input_ids)], dtype=torch.float64)


def extraction_likelihood(model, input_ids, n: int = 10, *, batch_size: int = 8,
                          decode_batch_size: int = DECODE_BATCH) -> torch.Tensor:
    """EL_n per row (Jang et al. 2023). Tensor[B] float64. Rows need at least n+1 tokens."""
    return memorization_metrics(model, input_ids, n, batch_size=batch_size, decode_batch_size=decode_batch_size)["el"]


def memorization_metrics(model, input_ids, n: int = 10, *, batch_size: int = 8, decode_batch_size: int = DECODE_BATCH,
                         workers: int | None = None, on_logits: OnLogits | None = None,
                         decode_progress: DecodeProgress | None = None) -> dict:
    """MA and EL_n per row from one shared computation: {"ma": Tensor[B], "el": Tensor[B], "decoded_tokens": int}.

    The branches of all rows given are decoded together, on `workers` threads (`loku.metrics.greedy.greedy_suffixes`,
    which holds their full-pass KV cache meanwhile); `on_logits(row indices, logits)` sees every teacher-forced
    pass; `decode_progress(planned, decoded)` counts the tokens decoded (`greedy_suffixes`' progress)."""
    ids = check_rows(input_ids, n + 1, f"EL_{n}")
    suffixes = greedy_suffixes(model, ids, min_suffix=n, batch_size=batch_size, decode_batch_size=decode_batch_size,
                               workers=workers, on_logits=on_logits, progress=decode_progress)
    ma = torch.tensor([sum(a == b for a, b in zip(g, x[1:])) / (len(x) - 1)
                       for x, g in zip(suffixes.input_ids, suffixes.greedy)], dtype=torch.float64)
    return {"ma": ma, "el": el_from_suffixes(suffixes, n), "decoded_tokens": suffixes.decoded_tokens}


def length_groups(lengths: list[int], size: int = POOL_ROWS) -> list[list[int]]:
    """Indices grouped by length (rows of a group stack without padding), each group cut to `size` rows."""
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    return [members[j:j + size] for members in by_length.values() for j in range(0, len(members), size)]


def ragged_metrics(model, rows: list[list[int]], n: int = 10, *, batch_size: int = 8,
                   decode_batch_size: int = DECODE_BATCH, pool_rows: int = POOL_ROWS, workers: int | None = None,
                   on_logits: OnLogits | None = None, progress: Callable[[int], None] | None = None,
                   decode_progress: DecodeProgress | None = None) -> dict:
    """MA and EL_n of token rows of any lengths: {"ma": [per row], "el": [per row], "decoded_tokens"}.

    Rows of equal length are measured together, up to `pool_rows` at a time (no padding ever enters the
    metrics); `on_logits(indices into rows, logits (b, T, V))` sees every teacher-forced pass, `progress` is
    told each group's size, `decode_progress(planned, decoded)` the tokens each group decodes."""
    for i, row in enumerate(rows):
        if len(row) < n + 1:
            raise LokuError(f"row {i} has {len(row)} tokens but EL_{n} needs at least {n + 1}: drop or lengthen it, "
                            "or lower n")
    ma, el, decoded = [0.0] * len(rows), [0.0] * len(rows), 0
    for part in length_groups([len(r) for r in rows], pool_rows):
        seen = None if on_logits is None else (lambda idx, logits, part=part: on_logits([part[i] for i in idx], logits))
        out = memorization_metrics(model, torch.tensor([rows[i] for i in part]), n, batch_size=batch_size,
                                   decode_batch_size=decode_batch_size, workers=workers, on_logits=seen,
                                   decode_progress=decode_progress)
        for i, a, e in zip(part, out["ma"].tolist(), out["el"].tolist()):
            ma[i], el[i] = a, e
        decoded += out["decoded_tokens"]
        if progress:
            progress(len(part))
    return {"ma": ma, "el": el, "decoded_tokens": decoded}


def extraction_metrics(model, tokenizer, texts: list[str], *, n: int = 10, max_length: int | None = None,
                       batch_size: int = 8, decode_batch_size: int = DECODE_BATCH, pool_rows: int = POOL_ROWS,
                       progress: bool = False) -> dict:
    """MA and EL_n of each text: tokenized without special tokens, cut to `max_length` tokens (Jang et al. use 200),
    measured by `ragged_metrics`. Returns {"n", "ma": [per text], "el": [per text], "ma_mean", "el_mean",
    "tokens": [lengths], "decoded_tokens"}."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    for i, row in enumerate(ids):
        if len(row) < n + 1:
            raise LokuError(f"text {i} has {len(row)} tokens but EL_{n} needs at least {n + 1}: drop or lengthen it, "
                            f"or lower n" + (f" / raise max_length ({max_length})" if max_length else ""))
    with tqdm(total=len(ids), desc=f"MA/EL_{n}", unit="text", disable=not progress) as bar:
        out = ragged_metrics(model, ids, n, batch_size=batch_size, decode_batch_size=decode_batch_size,
                             pool_rows=pool_rows, progress=bar.update)
    mean = (lambda v: sum(v) / len(v) if v else float("nan"))
    return {"n": n, **out, "ma_mean": mean(out["ma"]), "el_mean": mean(out["el"]), "tokens": [len(r) for r in ids]}


# ---- Extraction strength and exact memorization (OpenUnlearning), from one teacher-forced pass ----------------

def argmax_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hit (B, T-1): argmax p(. | x_<t) == x_t, mask (B, T-1): x_t is scored (label != -100))."""
    target = labels[:, 1:]
    return logits[:, :-1].argmax(-1) == target, target != -100


def exact_memorization_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EM per row (Tirumala et al. 2022, OpenUnlearning's `exact_memorization`): the share of scored tokens
    that are the model's argmax given the true prefix. (B,) float64. On plain text whose every token but
    the first is scored this is exactly MA."""
    hit, mask = argmax_hits(logits, labels)
    return (hit & mask).sum(-1).double() / mask.sum(-1).double()


def extraction_strength_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ES per row (Carlini et al. 2021, used for unlearning by Wang et al. 2025; OpenUnlearning's
    `extraction_strength`): 1 - k*/L, where L is the
    number of scored tokens y_1..y_L (after a prompt p) and k* the smallest k in 0..L such that greedy decoding
    from p y_1..y_k reproduces y_{k+1}..y_L exactly (k = L: nothing left to reproduce). (B,) float64.

    Why one teacher-forced pass gives it: let g_j = argmax p(. | p y_<j) (the teacher-forced argmax). Greedy
    decoding from p y_<=k emits y_{k+1}..y_L exactly iff g_j = y_j for every j > k. By induction on j: if its
    first j-k-1 tokens were y_{k+1}..y_{j-1}, the context of its next token is p y_<j, so that token is g_j;
    it is y_j iff g_j = y_j, and at the first j where g_j != y_j the decode leaves the text and the suffix is
    not reproduced. So k* = (position of the last scored token with g_j != y_j), or 0 if there is none, and
    every k >= k* works. Greedy decoding and the argmax here take the first of tied maxima alike; values
    differ only where a KV-cached decode and the full pass round a near-tie differently.

    One difference from OpenUnlearning's code: its loop `for k in range(L): if preds[k:] == labels[k:]: break`
    ends at k = L - 1 when no suffix matches, so a row whose last token is not predicted scores 1/L there and 0
    here (the empty suffix, k = L, is where the definition above ends). OpenUnlearning also drops each row's
    last scored token (its EOS); loku scores them all (see `loku.metrics.membership`)."""
    hit, mask = argmax_hits(logits, labels)
    miss = mask & ~hit  # (B, T-1)
    position = mask.long().cumsum(-1)  # (B, T-1): 1-based index among the scored tokens
    k_star = torch.where(miss, position, 0).max(-1).values  # (B,) scored tokens up to the last miss
    return 1.0 - k_star.double() / mask.sum(-1).double()


def memorization_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"es": (B,), "em": (B,)} of one teacher-forced batch."""
    return {"es": extraction_strength_from_logits(logits, labels), "em": exact_memorization_from_logits(logits, labels)}


def teacher_forced_memorization(model, features: list[dict], pad_id: int, *, batch_size: int = 8) -> dict:
    """ES and EM of tokenized features ({"input_ids", "labels"}) from one forward pass per batch:
    {"es": [per feature], "em": [...], "es_mean", "em_mean"}."""
    check_features(features)
    out = {"es": [], "em": [], **per_feature(model, features, pad_id, memorization_from_logits, batch_size)}
    mean = (lambda v: sum(v) / len(v) if v else float("nan"))
    return {**out, "es_mean": mean(out["es"]), "em_mean": mean(out["em"])}


def extraction_strength(model, tokenizer, texts: list, *, max_tokens: int | None = None,
                        batch_size: int = 8) -> dict:
    """ES and EM of each text (plain text: every token but the first is scored; {"question", "answer"} dicts:
    the answer given the question), from one teacher-forced pass per batch. See `teacher_forced_memorization`."""
    from .membership import tokenize

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return teacher_forced_memorization(model, tokenize(tokenizer, list(texts), max_tokens), pad,
                                       batch_size=batch_size)
