"""Memorization accuracy (MA) and extraction likelihood (EL_n) of Jang et al. 2023 (TDEC protocol), exact and fast.

EL_n asks, for every prefix x_<t of a sequence, how much of the true suffix the model's greedy continuation
reproduces. Done literally (as Jang et al. do, one `generate` per prefix) that is T greedy decodes of up to
T tokens per sequence. Two facts make it cheap without changing a value:

1. One forward pass over the true sequence gives the greedy next token g_t of every prefix (that is MA) and,
   because attention is causal, the KV cache of every prefix at once.
2. Where g_t == x_t, the continuation of x_<t is x_t followed by the continuation of x_<t+1. So only the
   "divergence points" d (g_d != x_d) need decoding, each branched off the shared cache; any other prefix t
   continues as x_t..x_{d-1} + continuation(d), d the first divergence >= t.

A memorized sequence has few divergence points and costs little more than one forward pass; a forgotten one
still gains from decoding all its branches as one batch.

Conventions, following Jang et al.'s `validation_el` (joeljang/knowledge-unlearning, models/Neo_Model.py):
prefixes t = 1..T-1; overlap_t = (n-grams of the T-t generated tokens, counted with repetition, found in the
SET of n-grams of the true suffix x_t..x_{T-1}) / (number of n-grams of that suffix, with repetition);
prefixes whose suffix is shorter than n add 0; EL_n = sum_t overlap_t / (T - n). One deliberate difference:
decoding never stops at EOS (their `generate` stops or pads with EOS), so every continuation has T - t tokens.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import LokuError
from ..models import model_device
from .forward import check_features, per_feature


@dataclass
class GreedySuffixes:
    """The greedy continuation of every prefix of every row, stored as the shared parts plus the decoded branches.

    `continuation(b, t)` rebuilds the T - t tokens greedy decoding emits after x_<t. Prefixes whose suffix is
    shorter than `min_suffix` may be left undecoded (EL_n never looks at them)."""

    input_ids: list[list[int]]  # B rows of T true tokens
    greedy: list[list[int]]  # B rows of T-1: greedy[b][t-1] = argmax p(. | x_<t)
    branches: list[dict[int, list[int]]]  # per row: divergence point d -> its continuation, T - d tokens
    decoded_tokens: int  # tokens fed through the model one step at a time (the work beyond the full pass)
    min_suffix: int = 1

    def next_divergence(self, b: int, t: int) -> int | None:
        x, g = self.input_ids[b], self.greedy[b]
        return next((d for d in range(t, len(x)) if g[d - 1] != x[d]), None)

    def continuation(self, b: int, t: int) -> list[int]:
        x = self.input_ids[b]
        if not 1 <= t <= len(x) - self.min_suffix:
            raise ValueError(f"prefix length {t} is outside 1..{len(x) - self.min_suffix} for row {b}")
        d = self.next_divergence(b, t)
        return x[t:] if d is None else x[t:d] + self.branches[b][d]


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


def check_rows(input_ids, min_tokens: int, why: str) -> torch.Tensor:
    """(B, T) integer ids, or a LokuError naming the problem and the fix."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise LokuError(f"input_ids must be a (batch, tokens) integer tensor, got {tuple(ids.shape)} {ids.dtype}: "
                        "tokenize the texts and stack rows of equal length (no padding)")
    if ids.shape[0] and ids.shape[1] < min_tokens:
        raise LokuError(f"row 0 (and every row) has {ids.shape[1]} tokens but {why} needs at least {min_tokens}: "
                        "use longer sequences or a smaller n")
    return ids.long()


@contextmanager
def _eval_mode(model):
    """Dropout would make greedy decoding random; restore the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (old name deprecated); use what the model takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


@torch.no_grad()
def memorization_accuracy(model, input_ids, *, batch_size: int = 8) -> torch.Tensor:
    """MA per row: (1/(T-1)) sum_{t=1}^{T-1} [argmax p(. | x_<t) == x_t], from one forward pass. Tensor[B] float64."""
    ids = check_rows(input_ids, 2, "memorization accuracy")
    out = []
    with _eval_mode(model):
        for chunk in ids.split(batch_size):
            chunk = chunk.to(model_device(model))
            greedy = model(input_ids=chunk, use_cache=False).logits[:, :-1].argmax(-1)  # (b, T-1)
            out.append((greedy == chunk[:, 1:]).double().mean(-1).cpu())  # (b,) k/(T-1), exact in float64
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _needed_branches(x: list[int], g: list[int], min_suffix: int) -> list[int]:
    """Divergence points whose continuation some prefix with a suffix of >= min_suffix tokens reuses.
    d = T-1 needs no decoding (its one token is g), so it is not listed."""
    T, last = len(x), len(x) - min_suffix
    divergences = [d for d in range(1, T) if g[d - 1] != x[d]]
    needed = [d for d in divergences if d <= last]
    later = [d for d in divergences if d > last]
    if later and g[last - 1] == x[last]:  # prefix `last` (and those before it, up to a divergence) splices it
        needed.append(later[0])
    return [d for d in needed if d < T - 1]


def _decode_branches(model, kv, rows, starts, first, T: int, cache_kw: str) -> tuple[list[list[int]], int]:
    """Greedy-decode branches (row, d) together, each from the full-pass cache cut to x_<d plus its first token.

    `rows`, `starts` (n,) are sorted by d descending: rows finish in order (branch d needs T-1-d steps), so the
    finished ones are dropped from the front. Prefixes are left-padded to a common length and masked; each
    row's cache entries stay contiguous, so relative distances (sliding windows) are those of the plain loop.
    After each step the leading columns no row can see are cut, which keeps the cache under T entries."""
    from transformers import DynamicCache

    n, width = len(rows), int(starts[0])
    col = (torch.arange(width, device=rows.device) - (width - starts)[:, None]).clamp(min=0)  # (n, width)
    cache = DynamicCache([(k[rows[:, None], :, col].transpose(1, 2), v[rows[:, None], :, col].transpose(1, 2))
                          for k, v in kv])  # each (n, heads, width, head_dim)
    tokens = first.clone()  # (n,)
    out = [[tok] for tok in first.tolist()]
    steps = T - 1 - starts  # (n,) ascending: tokens each branch still has to produce
    s, k, decoded = 0, 0, 0
    while s < n:
        length = cache.get_seq_length()
        visible = starts[s:] + k + 1  # (m,) entries each active row may attend to, the new token included
        mask = torch.arange(length + 1, device=rows.device) >= (length + 1 - visible)[:, None]  # (m, length+1)
        logits = model(input_ids=tokens[s:, None], attention_mask=mask.long(), position_ids=(starts[s:] + k)[:, None],
                       use_cache=True, **{cache_kw: cache}).logits[:, -1]  # (m, V)
        tokens[s:] = logits.argmax(-1)
        decoded += n - s
        for i, tok in enumerate(tokens[s:].tolist()):
            out[s + i].append(tok)
        k += 1
        done = s + int((steps[s:] == k).sum())
        if s < done < n:
            drop = length + 1 - int(starts[done] + k)  # columns no remaining row can see
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[done - s:, :, drop:], layer.values[done - s:, :, drop:]
        s = done
    return out, decoded


@torch.no_grad()
def greedy_suffixes(model, input_ids, *, min_suffix: int = 1, batch_size: int = 8,
                    decode_batch_size: int = 64) -> GreedySuffixes:
    """Greedy continuations (never stopping at EOS) of every prefix x_<t, t = 1..T-min_suffix, of each row.

    One forward pass per `batch_size` rows gives the greedy tokens and the KV cache; the divergence points that
    prefixes need are then decoded in batches of `decode_batch_size` branches. Values equal those of a plain
    per-prefix greedy loop except where two logits tie to rounding error (padding and batching change the
    order of float sums)."""
    ids = check_rows(input_ids, 2, "greedy continuation")
    cache_kw, result = cache_kwarg(model), GreedySuffixes(ids.tolist(), [], [], 0, min_suffix)
    T = ids.shape[1]
    from transformers import DynamicCache

    with _eval_mode(model):
        for row0 in range(0, len(ids), batch_size):
            chunk = ids[row0:row0 + batch_size].to(model_device(model))  # (b, T)
            cache = DynamicCache()  # no config: every layer keeps all T positions, sliding or not
            greedy = model(input_ids=chunk, use_cache=True, **{cache_kw: cache}).logits[:, :-1].argmax(-1)  # (b, T-1)
            kv = [(layer.keys, layer.values) for layer in cache.layers]  # each (b, heads, T, head_dim)
            xs, gs = chunk.tolist(), greedy.tolist()
            result.greedy += gs
            branches = [{T - 1: [g[-1]]} if g[-1] != x[-1] else {} for x, g in zip(xs, gs)]
            todo = sorted(((d, b) for b, (x, g) in enumerate(zip(xs, gs)) for d in _needed_branches(x, g, min_suffix)),
                          reverse=True)
            for i in range(0, len(todo), decode_batch_size):
                part = todo[i:i + decode_batch_size]
                starts = torch.tensor([d for d, _ in part], device=chunk.device)  # (n,)
                rows = torch.tensor([b for _, b in part], device=chunk.device)  # (n,)
                conts, decoded = _decode_branches(model, kv, rows, starts, greedy[rows, starts - 1], T, cache_kw)
                result.decoded_tokens += decoded
                for (d, b), cont in zip(part, conts):
                    branches[b][d] = cont
            result.branches += branches
    return result


def el_from_suffixes(suffixes: GreedySuffixes, n: int) -> torch.Tensor:
    """EL_n per row from precomputed continuations (needs `min_suffix <= n`). Tensor[B] float64."""
    if suffixes.min_suffix > n:
        raise ValueError(f"continuations were computed for suffixes >= {suffixes.min_suffix} tokens, EL_{n} needs {n}")
    return torch.tensor([el_of_row(x, lambda t, b=b: suffixes.continuation(b, t), n)
                         for b, x in enumerate(suffixes.input_ids)], dtype=torch.float64)


def extraction_likelihood(model, input_ids, n: int = 10, *, batch_size: int = 8,
                          decode_batch_size: int = 64) -> torch.Tensor:
    """EL_n per row (Jang et al. 2023). Tensor[B] float64. Rows need at least n+1 tokens."""
    ids = check_rows(input_ids, n + 1, f"EL_{n}")
    return el_from_suffixes(greedy_suffixes(model, ids, min_suffix=n, batch_size=batch_size,
                                            decode_batch_size=decode_batch_size), n)


def memorization_metrics(model, input_ids, n: int = 10, *, batch_size: int = 8,
                         decode_batch_size: int = 64) -> dict:
    """MA and EL_n per row from one shared computation: {"ma": Tensor[B], "el": Tensor[B], "decoded_tokens": int}."""
    ids = check_rows(input_ids, n + 1, f"EL_{n}")
    suffixes = greedy_suffixes(model, ids, min_suffix=n, batch_size=batch_size, decode_batch_size=decode_batch_size)
    ma = torch.tensor([sum(a == b for a, b in zip(g, x[1:])) / (len(x) - 1)
                       for x, g in zip(suffixes.input_ids, suffixes.greedy)], dtype=torch.float64)
    return {"ma": ma, "el": el_from_suffixes(suffixes, n), "decoded_tokens": suffixes.decoded_tokens}


def extraction_metrics(model, tokenizer, texts: list[str], *, n: int = 10, max_length: int | None = None,
                       batch_size: int = 8, decode_batch_size: int = 64, progress: bool = False) -> dict:
    """MA and EL_n of each text: tokenized without special tokens, cut to `max_length` tokens (Jang et al. use 200).

    Texts of equal token length are batched together (no padding ever enters the metrics). Returns
    {"n", "ma": [per text], "el": [per text], "ma_mean", "el_mean", "tokens": [lengths], "decoded_tokens"}."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    for i, row in enumerate(ids):
        if len(row) < n + 1:
            raise LokuError(f"text {i} has {len(row)} tokens but EL_{n} needs at least {n + 1}: drop or lengthen it, "
                            f"or lower n" + (f" / raise max_length ({max_length})" if max_length else ""))
    ma, el, decoded = [0.0] * len(ids), [0.0] * len(ids), 0
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    from tqdm.auto import tqdm

    with tqdm(total=len(ids), desc=f"MA/EL_{n}", unit="text", disable=not progress) as bar:
        for members in by_length.values():
            for j in range(0, len(members), batch_size):
                part = members[j:j + batch_size]
                out = memorization_metrics(model, torch.tensor([ids[i] for i in part]), n, batch_size=batch_size,
                                           decode_batch_size=decode_batch_size)
                for i, a, e in zip(part, out["ma"].tolist(), out["el"].tolist()):
                    ma[i], el[i] = a, e
                decoded += out["decoded_tokens"]
                bar.update(len(part))
    mean = (lambda v: sum(v) / len(v) if v else float("nan"))
    return {"n": n, "ma": ma, "el": el, "ma_mean": mean(ma), "el_mean": mean(el), "tokens": [len(r) for r in ids],
            "decoded_tokens": decoded}


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
