"""MA/EL_10 the fast way (loku.metrics.extraction) against the straightforward per-prefix loop that Jang et al.
run with `generate`: for every prefix a prefill and a batch-1 greedy decode with KV cache, nothing shared.

Two sets on the embedded SmolLM2-135M: "memorized" (4 tokens of a TDEC forget text, then the model's own greedy
continuation, so MA is ~1 by construction) and "wikitext" (WikiText-2 test lines, mostly not memorized).
Fast runs are interleaved with the slow rows and wall and CPU time are both kept, since the machine may be
shared. Both paths must give the same values; the table shows the speedup and how close the fast path gets to its floor
(the full forward pass plus each decode step it has to run, at the measured price of a step at that step's
batch size; the rest is Python, cache copies and n-gram counting).

    .venv/bin/python benchmarks/extraction.py [--rows 4 --tokens 40 --n 10 --threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from loku import load_model
from loku.metrics.extraction import cache_kwarg, el_from_suffixes, el_of_row, greedy_suffixes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tdec"
RESULTS = Path(__file__).resolve().parent / "results" / "extraction.json"


def greedy(model, prefix: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens after `prefix`: one prefill, then batch-1 decode steps with a KV cache."""
    kw, cache = cache_kwarg(model), DynamicCache(config=model.config)
    out, ids = [], torch.tensor([prefix])
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]])
    return out


class Clock:
    """Wall and CPU seconds of a block. The machine is shared: CPU time shows how much of a slow wall time
    was other people's load."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.no_grad()
def slow_row(model, x: list[int]) -> tuple[dict[int, list[int]], Clock]:
    """The per-prefix loop on one row: T-1 independent greedy decodes."""
    with Clock() as clock:
        conts = {t: greedy(model, x[:t], len(x) - t) for t in range(1, len(x))}
    return conts, clock


@torch.no_grad()
def fast(model, rows: list[list[int]], n: int, decode_batch: int) -> tuple[dict, Clock]:
    """Exactly what `memorization_metrics` does, keeping the continuations for the identity check."""
    with Clock() as clock:
        s = greedy_suffixes(model, torch.tensor(rows), min_suffix=n, batch_size=len(rows),
                            decode_batch_size=decode_batch)
        ma = [sum(a == b for a, b in zip(g, x[1:])) / (len(x) - 1) for x, g in zip(s.input_ids, s.greedy)]
        el = el_from_suffixes(s, n).tolist()
    return {"ma": ma, "el": el, "suffixes": s}, clock


SIZES = (1, 2, 4, 8, 16, 32, 64)


@torch.no_grad()
def step_seconds(model, batch: int, width: int, repeats: int = 5) -> float:
    """Seconds of one decode step of `batch` rows over a `width`-token cache (best of `repeats`, after a warm-up)."""
    kw, best = cache_kwarg(model), float("inf")
    x = torch.randint(100, 1000, (batch, width + 1))
    for i in range(repeats + 1):
        cache = DynamicCache()
        model(input_ids=x[:, :width], use_cache=True, **{kw: cache})
        t0 = time.perf_counter()
        model(input_ids=x[:, width:], use_cache=True, **{kw: cache})
        best = min(best, time.perf_counter() - t0) if i else best
    return best


def decode_schedule(suffixes, T: int, decode_batch: int) -> list[int]:
    """Active rows of every decode step the fast path ran: branches sorted by start, chunked, each branch d
    active for T-1-d steps (the same plan `greedy_suffixes` follows)."""
    starts = sorted((d for row in suffixes.branches for d, c in row.items() if len(c) > 1), reverse=True)
    sizes = []
    for i in range(0, len(starts), decode_batch):
        steps = [T - 1 - d for d in starts[i:i + decode_batch]]
        sizes += [sum(s > k for s in steps) for k in range(max(steps))]
    assert sum(sizes) == suffixes.decoded_tokens
    return sizes


def floor_seconds(sizes: list[int], cost: dict[int, float]) -> float:
    """The decode steps alone, each at the measured price of its batch size (linear between measured sizes)."""
    xs = sorted(cost)
    def at(m):
        hi = next(x for x in xs if x >= m)
        lo = max(x for x in xs if x <= m)
        return cost[lo] if hi == lo else cost[lo] + (cost[hi] - cost[lo]) * (m - lo) / (hi - lo)
    return sum(at(m) for m in sizes)


@torch.no_grad()
def full_pass_seconds(model, rows: list[list[int]]) -> float:
    t0 = time.perf_counter()
    model(input_ids=torch.tensor(rows), use_cache=True, **{cache_kwarg(model): DynamicCache()})
    return time.perf_counter() - t0


def memorized_rows(model, tokenizer, count: int, length: int, prompt: int = 4) -> list[list[int]]:
    csv.field_size_limit(1 << 30)
    with open(DATA / "forget" / "lm_extraction_32_0.csv", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)][:count]
    with torch.no_grad():
        starts = [tokenizer(t, add_special_tokens=False)["input_ids"][:prompt] for t in texts]
        return [p + greedy(model, p, length - prompt) for p in starts]


def wikitext_rows(tokenizer, count: int, length: int) -> list[list[int]]:
    rows = []
    for line in (DATA / "retain" / "wikitext2_test.raw").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("="):
            ids = tokenizer(" " + line, add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                rows.append(ids[:length])
        if len(rows) == count:
            return rows
    raise SystemExit(f"only {len(rows)} WikiText lines have {length} tokens")


def median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def compare(name: str, model, rows, args) -> dict:
    """Fast runs interleaved with the slow rows (fast, row 0, fast, row 1, ..., fast), so both see the same
    background load; fast time = median of its runs, slow time = sum over rows."""
    n, T = args.n, len(rows[0])
    f, clock = fast(model, rows, n, args.decode_batch)
    fast_clocks, slow_clocks, conts = [clock], [], []
    for i, x in enumerate(rows):
        print(f"[{name}] fast {clock.wall:.1f}s; slow row {i} ...", flush=True)
        c, sc = slow_row(model, x)
        conts.append(c)
        slow_clocks.append(sc)
        clock = fast(model, rows, n, args.decode_batch)[1]
        fast_clocks.append(clock)
    slow_ma = [sum(c[t][0] == x[t] for t in c) / (T - 1) for x, c in zip(rows, conts)]
    slow_el = [el_of_row(x, c.__getitem__, n) for x, c in zip(rows, conts)]
    prefixes = [(b, t) for b in range(len(rows)) for t in range(1, T - n + 1)]
    same = sum(f["suffixes"].continuation(b, t) == conts[b][t] for b, t in prefixes)
    full = min(full_pass_seconds(model, rows) for _ in range(3))
    slow_wall, slow_cpu = sum(c.wall for c in slow_clocks), sum(c.cpu for c in slow_clocks)
    fast_wall, fast_cpu = median([c.wall for c in fast_clocks]), median([c.cpu for c in fast_clocks])
    return {"set": name, "rows": len(rows), "tokens": T, "ma_mean": sum(f["ma"]) / len(rows),
            "el_mean": sum(f["el"]) / len(rows), "slow_s": slow_wall, "fast_s": fast_wall,
            "speedup": slow_wall / fast_wall, "slow_cpu_s": slow_cpu, "fast_cpu_s": fast_cpu,
            "speedup_cpu": slow_cpu / fast_cpu, "fast_runs_s": [c.wall for c in fast_clocks],
            "ma_identical": f["ma"] == slow_ma, "el_max_abs_diff": max(abs(a - b) for a, b in zip(f["el"], slow_el)),
            "continuations_identical": f"{same}/{len(prefixes)}",
            "slow_decode_tokens": sum(T - 1 - t for t in range(1, T)) * len(rows),
            "fast_decoded_tokens": f["suffixes"].decoded_tokens, "full_pass_s": full,
            "_schedule": decode_schedule(f["suffixes"], T, args.decode_batch), "ma": f["ma"], "el": f["el"],
            "slow_ma": slow_ma, "slow_el": slow_el}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    width = args.tokens // 2  # a typical cache length while decoding branches
    sizes = [b for b in SIZES if b <= args.decode_batch]
    results = [compare("memorized", model, memorized_rows(model, tokenizer, args.rows, args.tokens), args),
               compare("wikitext", model, wikitext_rows(tokenizer, args.rows, args.tokens), args)]
    # Step prices measured last and best-of-repeats: the least-loaded moments give the tightest floor.
    cost = {b: step_seconds(model, b, width) for b in sizes}
    print("decode step (ms) by batch size: " + ", ".join(f"{b}: {c * 1e3:.1f}" for b, c in cost.items()))
    for r in results:
        r["floor_s"] = r["full_pass_s"] + floor_seconds(r.pop("_schedule"), cost)
        r["fast_over_floor"] = r["fast_s"] / r["floor_s"]
    head = (f"{'set':<10} {'rows x T':>8} {'MA':>5} {'EL10':>6} {'slow s':>7} {'fast s':>7} {'speedup':>8} "
            f"{'(cpu)':>6} {'max|dEL|':>9} {'MA same':>7} {'conts same':>10} {'decoded':>11} {'floor s':>7} "
            f"{'fast/floor':>10}")
    print(head)
    for r in results:
        print(f"{r['set']:<10} {r['rows']:>3} x {r['tokens']:<3} {r['ma_mean']:>5.2f} {r['el_mean']:>6.3f} "
              f"{r['slow_s']:>7.1f} {r['fast_s']:>7.2f} {r['speedup']:>7.1f}x {r['speedup_cpu']:>5.1f}x "
              f"{r['el_max_abs_diff']:>9.1e} "
              f"{str(r['ma_identical']):>7} {r['continuations_identical']:>10} "
              f"{r['fast_decoded_tokens']:>5}/{r['slow_decode_tokens']:<5} {r['floor_s']:>7.2f} "
              f"{r['fast_over_floor']:>9.1f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "extraction", "model": "smollm2-135m (GGUF Q4_1, dequantized, float32)", "n": args.n,
        "threads": args.threads, "decode_batch_size": args.decode_batch, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "decode_step_seconds_by_batch": {str(b): c for b, c in cost.items()},
        "sets": results}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
