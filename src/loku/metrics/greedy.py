"""The greedy continuation of every prefix of a batch of sequences, exactly and with as little decoding as possible.

EL_n (`loku.metrics.extraction`) asks, for every prefix x_<t, what greedy decoding emits after it. Done literally
(as Jang et al. do, one `generate` per prefix) that is T greedy decodes of up to T tokens per sequence. Here:

1. One forward pass over the true sequence gives the greedy next token g_t of every prefix (that is MA) and,
   because attention is causal, the KV cache of every prefix at once.
2. Where g_t == x_t, the continuation of x_<t is x_t followed by the continuation of x_<t+1. So only the
   "divergence points" d (g_d != x_d) need decoding, each branched off the shared cache; any other prefix t
   continues as x_t..x_{d-1} + continuation(d), d the first divergence >= t.
3. The branches of all the rows given are decoded together, sorted by start and cut into batches of
   `decode_batch_size`: a decode step over B rows costs far less than B steps of one row, and sorting keeps a
   batch full until its rows finish in order. Each branch's keys and values live in one buffer allocated
   once per batch (a transformers `DynamicLayer` concatenates, copying the whole cache every step).
4. On CPU the batches run on `torch.get_num_threads()` Python threads with one intra-op thread each, not one
   batch at a time on that many intra-op threads: the batches are independent, so the workers never wait for
   each other, where intra-op threads meet at a barrier after every operation (thousands a step), which on a
   shared machine stalls them all whenever one is descheduled. Measured in benchmarks/extraction.py.

What is left is the decode steps themselves: a sequence the model does not know diverges at about every other
token and needs ~T^2/4 decoded tokens, each of them needed by some prefix's n-gram count (see
benchmarks/extraction.py for the floor).
"""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import LokuError
from ..models import model_device

POOL_ROWS = 64  # rows measured together (their branches decoded together): their full-pass KV cache is held
DECODE_BATCH = 128  # branches per decode step; measured in benchmarks/extraction.py


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
def eval_mode(model):
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


def needed_branches(x: list[int], g: list[int], min_suffix: int) -> list[int]:
    """Divergence points whose continuation some prefix with a suffix of >= min_suffix tokens reuses.
    d = T-1 needs no decoding (its one token is g), so it is not listed."""
    T, last = len(x), len(x) - min_suffix
    divergences = [d for d in range(1, T) if g[d - 1] != x[d]]
    needed = [d for d in divergences if d <= last]
    later = [d for d in divergences if d > last]
    if later and g[last - 1] == x[last]:  # prefix `last` (and those before it, up to a divergence) splices it
        needed.append(later[0])
    return [d for d in needed if d < T - 1]


class BranchLayer(DynamicLayer):
    """One layer's keys and values for a batch of branches, in a buffer allocated once.

    The buffer holds every column the batch will ever use; each step writes the new column in place and
    attention sees the view [row0:, :, lo:hi] (rows still decoding, columns one of them can see)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int):
        super().__init__()
        n, heads, filled, dim = keys.shape
        self._k = keys.new_empty(n, heads, width, dim)
        self._v = values.new_empty(n, heads, width, dim)
        self._k[:, :, :filled], self._v[:, :, :filled] = keys, values
        self.row0, self.lo, self.hi = 0, 0, filled
        self.device, self.is_initialized = keys.device, True
        self._view()

    def _view(self) -> None:
        self.keys = self._k[self.row0:, :, self.lo:self.hi]
        self.values = self._v[self.row0:, :, self.lo:self.hi]

    def update(self, key_states, value_states, *args, **kwargs):
        self._k[self.row0:, :, self.hi:self.hi + 1] = key_states  # (m, heads, 1, dim)
        self._v[self.row0:, :, self.hi:self.hi + 1] = value_states
        self.hi += 1
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.hi - self.lo

    def drop(self, rows: int, lo: int) -> None:
        """Forget the first `rows` active rows (finished) and the columns before `lo` (no active row sees them)."""
        self.row0, self.lo = self.row0 + rows, lo
        self._view()


@torch.no_grad()  # grad mode is per thread: set here, where the worker threads enter
def decode_branches(model, kv, rows: torch.Tensor, starts: torch.Tensor, first: torch.Tensor, T: int,
                    cache_kw: str) -> tuple[list[list[int]], int]:
    """Greedy-decode branches (row, d) together, each from the full-pass cache cut to x_<d plus its first token.

    `rows`, `starts` (n,) are sorted by d descending: rows finish in order (branch d needs T-1-d steps), so the
    finished ones are dropped from the front. Prefixes are left-padded to a common length w0 and masked; each
    row's cache entries stay contiguous, so relative distances (sliding windows) are those of the plain loop.
    Returns each branch's continuation (T - d tokens) and the number of tokens decoded."""
    n, w0 = len(rows), int(starts[0])
    steps = T - 1 - starts  # (n,) ascending: tokens each branch still has to produce
    col = (torch.arange(w0, device=rows.device) - (w0 - starts)[:, None]).clamp(min=0)  # (n, w0)
    layers = [BranchLayer(k[rows[:, None], :, col].transpose(1, 2), v[rows[:, None], :, col].transpose(1, 2),
                          w0 + int(steps[-1])) for k, v in kv]  # buffers (n, heads, w0 + most steps, head_dim)
    cache = Cache(layers=layers)
    out = torch.empty(n, T, dtype=torch.long, device=rows.device)  # out[i, :T-d_i]: branch i's continuation
    out[:, 0] = first
    s, k, decoded = 0, 0, 0
    while s < n:
        length = layers[0].get_seq_length() + 1  # columns visible this step, the new token included
        visible = starts[s:] + k + 1  # (m,) entries each active row may attend to
        mask = torch.arange(length, device=rows.device) >= (length - visible)[:, None]  # (m, length)
        logits = model(input_ids=out[s:, k:k + 1], attention_mask=mask.long(), position_ids=(starts[s:] + k)[:, None],
                       use_cache=True, **{cache_kw: cache}).logits[:, -1]  # (m, V)
        out[s:, k + 1] = logits.argmax(-1)
        decoded += n - s
        k += 1
        done = s + int((steps[s:] == k).sum())
        if s < done < n:
            for layer in layers:  # the next row's prefix starts at column w0 - d: nothing before it is seen
                layer.drop(done - s, w0 - int(starts[done]))
        s = done
    return [row[:T - d] for row, d in zip(out.tolist(), starts.tolist())], decoded


def parallel_map(fn, jobs: list, workers: int) -> list:
    """[fn(job) for job in jobs], on `workers` Python threads with one intra-op thread each (torch's thread count
    is restored afterwards). Jobs are handed out in order as workers free up: put the longest first."""
    workers = min(workers, len(jobs))
    if workers <= 1:
        return [fn(job) for job in jobs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, jobs))
    finally:
        torch.set_num_threads(threads)


OnLogits = Callable[[list[int], torch.Tensor], None]
DecodeProgress = Callable[[int, int], None]   # (tokens newly planned, tokens newly decoded)


@torch.no_grad()
def greedy_suffixes(model, input_ids, *, min_suffix: int = 1, batch_size: int = 8,
                    decode_batch_size: int = DECODE_BATCH, workers: int | None = None,
                    on_logits: OnLogits | None = None, progress: DecodeProgress | None = None) -> GreedySuffixes:
    """Greedy continuations (never stopping at EOS) of every prefix x_<t, t = 1..T-min_suffix, of each row.

    One forward pass per `batch_size` rows gives the greedy tokens and the KV cache (kept for all the rows
    given: T x the model's KV bytes per token, per row); `on_logits(row indices, logits (b, T, V))` sees each
    pass's logits, so other per-token metrics need no pass of their own. The divergence points that prefixes
    need, of all rows together, are then decoded in batches of `decode_batch_size`, on `workers` threads
    (default: torch.get_num_threads() on CPU, 1 elsewhere). Values equal those of a plain per-prefix greedy
    loop except where two logits tie to rounding error (padding and batching change the order of float sums).
    `progress(planned, decoded)` is told the tokens to decode once they are planned, then each batch's as it ends
    (from the worker threads)."""
    ids = check_rows(input_ids, 2, "greedy continuation")
    cache_kw, T = cache_kwarg(model), ids.shape[1]
    device = model_device(model)
    if workers is None:
        workers = torch.get_num_threads() if device.type == "cpu" else 1
    greedy, kv = [], []
    with eval_mode(model):
        for row0 in range(0, len(ids), batch_size):
            chunk = ids[row0:row0 + batch_size].to(device)  # (b, T)
            cache = DynamicCache()  # no config: every layer keeps all T positions, sliding or not
            logits = model(input_ids=chunk, use_cache=True, **{cache_kw: cache}).logits  # (b, T, V)
            if on_logits is not None:
                on_logits(list(range(row0, row0 + len(chunk))), logits)
            greedy.append(logits[:, :-1].argmax(-1))  # (b, T-1)
            kv.append([(layer.keys, layer.values) for layer in cache.layers])  # each (b, heads, T, head_dim)
            del logits
        greedy = torch.cat(greedy) if greedy else ids.new_zeros(0, T - 1)  # (B, T-1)
        kv = [tuple(torch.cat(parts) for parts in zip(*layer)) for layer in zip(*kv)]  # each (B, heads, T, dim)
        xs, gs = ids.tolist(), greedy.tolist()
        result = GreedySuffixes(xs, gs, [{T - 1: [g[-1]]} if g[-1] != x[-1] else {} for x, g in zip(xs, gs)], 0,
                                min_suffix)
        todo = sorted(((d, b) for b, (x, g) in enumerate(zip(xs, gs)) for d in needed_branches(x, g, min_suffix)),
                      reverse=True)
        parts = [todo[i:i + decode_batch_size] for i in range(0, len(todo), decode_batch_size)]
        parts.sort(key=lambda part: -sum(T - 1 - d for d, _ in part))  # most decoding first: workers end together
        if progress is not None:
            progress(sum(T - 1 - d for d, _ in todo), 0)

        def decode(part):
            starts = torch.tensor([d for d, _ in part], device=device)  # (n,) descending
            rows = torch.tensor([b for _, b in part], device=device)  # (n,)
            out = decode_branches(model, kv, rows, starts, greedy[rows, starts - 1], T, cache_kw)
            if progress is not None:
                progress(0, out[1])
            return out

        for part, (conts, decoded) in zip(parts, parallel_map(decode, parts, workers)):
            result.decoded_tokens += decoded
            for (d, b), cont in zip(part, conts):
                result.branches[b][d] = cont
    return result
