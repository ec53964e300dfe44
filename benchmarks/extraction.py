"""MA/EL_10 on SmolLM2-135M: loku's path against the previous one (an older commit, run from its own sources in
the same run), against the per-prefix greedy loop that Jang et al. run with `generate`, and against its floor.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/extraction.py [--rows 8 --tokens 100 --old dee7e4a --repeats 2]
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/extraction.py --rows 4 --tokens 40 --loop-rows 4   # + the loop

Two sets: "memorized" (4 tokens of a TDEC forget text, then the model's own greedy continuation, so MA is ~1 by
construction: little to decode) and "unseen" (TDEC lm_extraction_32_1, Pile text SmolLM2 was not trained on:
the audit's never-seen set and the state of a forgotten forget set, where every other prefix needs decoding).
Each version runs in its own process (model loaded first, not timed), old and new alternating `--repeats` times
so both see the same background load; a version's time is the median of its runs. Each version is called as its
own `extraction_metrics` calls it (old: `memorization_metrics` on 8 rows at a time; new: up to POOL_ROWS rows).
Wall and CPU time are both kept: the machine is shared, and CPU time shows how much of a wall time was waiting.

The floor: the full forward pass plus every token the fast path has to decode, each at the best measured price
per token of a decode step (batches of --sizes rows, on 1 worker with --threads intra-op threads, or on --threads
workers with one thread each, as loku runs them). Every decoded token is needed (EL_n scores every n-gram of
every continuation), so this is the floor of any exact method on this machine at float32.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "tdec"
RESULTS = HERE / "results" / "extraction.json"


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def old_sources(commit: str) -> Path:
    """The `src` folder of `commit`, extracted to a temporary folder (git archive)."""
    root = Path(tempfile.mkdtemp(prefix=f"loku_{commit[:8]}_"))
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", commit, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root / "src"


def in_process(script: str, src: Path, args: list[str], threads: int) -> dict:
    """Run `script`'s worker mode with `src` first on the path; its last stdout line is a JSON result."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"worker failed ({src}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- worker: one version of loku measures the rows ------------------------------------------------------------

@torch.no_grad()
def worker(rows_file: str, n: int) -> None:
    """Time MA/EL_n of the rows as this version's `extraction_metrics` batches them; print values, continuations."""
    import loku
    from loku.metrics import extraction
    from loku.models import load_model

    model, _ = load_model("smollm2-135m")
    rows = json.loads(Path(rows_file).read_text())
    pool = getattr(extraction, "POOL_ROWS", 8)  # before pooling, extraction_metrics measured batch_size=8 rows
    ma, el, conts, decoded = [], [], [], 0
    with Clock() as clock:
        for i in range(0, len(rows), pool):
            s = extraction.greedy_suffixes(model, torch.tensor(rows[i:i + pool]), min_suffix=n)
            ma += [sum(a == b for a, b in zip(g, x[1:])) / (len(x) - 1) for x, g in zip(s.input_ids, s.greedy)]
            el += extraction.el_from_suffixes(s, n).tolist()
            decoded += s.decoded_tokens
            conts += [[s.continuation(b, t) for t in range(1, len(x) - n + 1)] for b, x in enumerate(s.input_ids)]
    print(json.dumps({"loku": loku.__file__, "wall": clock.wall, "cpu": clock.cpu, "ma": ma, "el": el,
                      "decoded_tokens": decoded, "continuations": conts, "threads": torch.get_num_threads()}))


# ---- the per-prefix loop (Jang et al.'s `generate` per prefix) ---------------------------------------------------

def greedy(model, prefix: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens after `prefix`: one prefill, then batch-1 decode steps with a KV cache."""
    from transformers import DynamicCache

    from loku.metrics.greedy import cache_kwarg

    kw, cache = cache_kwarg(model), DynamicCache(config=model.config)
    out, ids = [], torch.tensor([prefix])
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]])
    return out


@torch.no_grad()
def loop(model, rows: list[list[int]], n: int) -> tuple[list[list[list[int]]], Clock]:
    with Clock() as clock:
        conts = [[greedy(model, x[:t], len(x) - t) for t in range(1, len(x) - n + 1)] for x in rows]
    return conts, clock


# ---- the floor --------------------------------------------------------------------------------------------------

@torch.no_grad()
def step_seconds(model, batch: int, width: int, workers: int, repeats: int = 3) -> float:
    """Wall seconds of one decode step of `batch` rows over a `width`-token cache on each of `workers` threads at
    once (one intra-op thread each; workers=1: torch's threads), best of `repeats` after a warm-up."""
    from transformers import DynamicCache

    from loku.metrics.greedy import cache_kwarg, parallel_map

    kw = cache_kwarg(model)
    xs = [torch.randint(100, 20000, (batch, width + 1)) for _ in range(workers)]
    caches = [DynamicCache() for _ in range(workers)]
    for x, cache in zip(xs, caches):
        model(input_ids=x[:, :width], use_cache=True, **{kw: cache})
    barrier, best = threading.Barrier(workers), float("inf")

    @torch.no_grad()
    def step(i):
        barrier.wait()
        cache = DynamicCache([(layer.keys, layer.values) for layer in caches[i].layers])  # a fresh cache over the prefill
        t0 = time.perf_counter()
        model(input_ids=xs[i][:, width:], use_cache=True, **{kw: cache})
        return t0, time.perf_counter()

    for r in range(repeats + 1):
        spans = parallel_map(step, list(range(workers)), workers)
        if r:
            best = min(best, max(e for _, e in spans) - min(s for s, _ in spans))
    return best


@torch.no_grad()
def full_pass_seconds(model, rows: list[list[int]], batch_size: int = 8) -> float:
    """One teacher-forced pass with cache over the rows, `batch_size` at a time (best of 3)."""
    from transformers import DynamicCache

    from loku.metrics.greedy import cache_kwarg

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch_size):
            model(input_ids=torch.tensor(rows[i:i + batch_size]), use_cache=True,
                  **{cache_kwarg(model): DynamicCache()})
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops_per_token(model) -> int:
    """2 x the weights every token multiplies (every Linear, the LM head included)."""
    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def price_table(model, sizes: list[int], width: int, threads: int) -> dict:
    """{"1 worker x T threads" / "T workers x 1 thread": {batch: seconds per decoded token}}."""
    table = {f"1 worker x {threads} threads": {b: step_seconds(model, b, width, 1) / b for b in sizes}}
    if threads > 1:
        table[f"{threads} workers x 1 thread"] = {b: step_seconds(model, b, width, threads) / (b * threads)
                                                  for b in sizes}
    return table


# ---- the sets ---------------------------------------------------------------------------------------------------

def tdec_texts(name: str, count: int) -> list[str]:
    csv.field_size_limit(1 << 30)
    with open(DATA / "forget" / f"{name}.csv", newline="") as f:
        return [r["text"] for r in csv.DictReader(f)][:count]


def memorized_rows(model, tokenizer, count: int, length: int, prompt: int = 4) -> list[list[int]]:
    with torch.no_grad():
        starts = [tokenizer(t, add_special_tokens=False)["input_ids"][:prompt]
                  for t in tdec_texts("lm_extraction_32_0", count)]
        return [p + greedy(model, p, length - prompt) for p in starts]


def unseen_rows(tokenizer, count: int, length: int) -> list[list[int]]:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:length] for t in tdec_texts("lm_extraction_32_1",
                                                                                          count)]
    if any(len(r) < length for r in rows):
        raise SystemExit(f"a TDEC text has fewer than {length} tokens")
    return rows


def median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def compare(name: str, model, rows, args, versions: dict[str, Path]) -> dict:
    path = Path(tempfile.mkdtemp(prefix="extraction_rows_")) / "rows.json"
    path.write_text(json.dumps(rows))
    runs: dict[str, list[dict]] = {v: [] for v in versions}
    for r in range(args.repeats):
        for version, src in versions.items():
            res = in_process(__file__, src, ["--worker", str(path), "--n", str(args.n)], args.threads)
            res["load"] = os.getloadavg()[0]
            runs[version].append(res)
            print(f"[{name}] {version} run {r + 1}: {res['wall']:.1f} s wall, {res['cpu']:.1f} s CPU, "
                  f"load {res['load']:.1f}", flush=True)
    T, n = len(rows[0]), args.n
    new = runs["new"][0]
    out = {"set": name, "rows": len(rows), "tokens": T, "ma_mean": sum(new["ma"]) / len(rows),
           "el_mean": sum(new["el"]) / len(rows), "decoded_tokens": new["decoded_tokens"],
           "loop_decode_tokens": len(rows) * sum(T - 1 - t for t in range(1, T - n + 1)),
           "full_pass_s": full_pass_seconds(model, rows)}
    for version, rs in runs.items():
        out[version] = {"s": median([x["wall"] for x in rs]), "cpu_s": median([x["cpu"] for x in rs]),
                        "runs_s": [x["wall"] for x in rs], "loads": [round(x["load"], 2) for x in rs],
                        "ma": rs[0]["ma"], "el": rs[0]["el"], "decoded_tokens": rs[0]["decoded_tokens"],
                        "source": rs[0]["loku"]}
    if "old" in runs:
        old = runs["old"][0]
        out["speedup"] = out["old"]["s"] / out["new"]["s"]
        out["speedup_cpu"] = out["old"]["cpu_s"] / out["new"]["cpu_s"]
        out["values_identical"] = old["ma"] == new["ma"] and old["el"] == new["el"]
        pairs = [(a, b) for x, y in zip(old["continuations"], new["continuations"]) for a, b in zip(x, y)]
        out["continuations_identical"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    if args.loop_rows:
        conts, clock = loop(model, rows[:args.loop_rows], n)
        pairs = [(a, b) for x, y in zip(conts, new["continuations"]) for a, b in zip(x, y)]
        out["loop"] = {"rows": args.loop_rows, "s": clock.wall, "cpu_s": clock.cpu,
                       "continuations_identical": f"{sum(a == b for a, b in pairs)}/{len(pairs)}",
                       "new_s_same_rows_estimate": out["new"]["s"] * args.loop_rows / len(rows)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--old", default="dee7e4a", help="commit of the previous path ('' to skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loop-rows", type=int, default=0, help="also run the per-prefix loop on this many rows")
    ap.add_argument("--sizes", default="1,16,64,128,256,512", help="decode batch sizes priced for the floor")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--sets", default="memorized,unseen")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.n)
        return 0
    if not (DATA / "forget" / "lm_extraction_32_1.csv").is_file():
        print(f"needs the TDEC files in {DATA / 'forget'}", file=sys.stderr)
        return 2

    from loku.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    versions = {"old": old_sources(args.old)} if args.old else {}
    versions["new"] = HERE.parent / "src"
    load_start = os.getloadavg()
    build = {"memorized": lambda: memorized_rows(model, tokenizer, args.rows, args.tokens),
             "unseen": lambda: unseen_rows(tokenizer, args.rows, args.tokens)}
    results = [compare(name, model, build[name](), args, versions) for name in args.sets.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    prices = price_table(model, sizes, args.tokens // 2, args.threads)  # cache width: a typical branch's
    best = min(p for table in prices.values() for p in table.values())
    flops = matmul_flops_per_token(model)
    for r in results:
        r["floor_s"] = r["full_pass_s"] + r["decoded_tokens"] * best
        r["new_over_floor"] = r["new"]["s"] / r["floor_s"]
    print("seconds per decoded token, by decode batch size (cache of %d tokens):" % (args.tokens // 2))
    for how, table in prices.items():
        print(f"  {how}: " + ", ".join(f"{b}: {p * 1e3:.2f} ms" for b, p in table.items()))
    print(f"best: {best * 1e3:.2f} ms/token = {flops / best / 1e9:.0f} GFLOP/s of matmul ({flops / 1e6:.0f} MFLOP "
          "a token)")
    print(f"| set | rows x T | MA | EL10 | old s | new s | speedup (CPU) | values | decoded | floor s | new/floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        old = r.get("old", {})
        print(f"| {r['set']} | {r['rows']} x {r['tokens']} | {r['ma_mean']:.2f} | {r['el_mean']:.3f} | "
              f"{old.get('s', float('nan')):.1f} | {r['new']['s']:.1f} | {r.get('speedup', float('nan')):.2f}x "
              f"({r.get('speedup_cpu', float('nan')):.2f}x) | "
              f"{'identical' if r.get('values_identical') else r.get('values_identical', '-')} "
              f"({r.get('continuations_identical', '-')}) | {r['decoded_tokens']} / {r['loop_decode_tokens']} | "
              f"{r['floor_s']:.1f} | {r['new_over_floor']:.2f}x |")
        if "loop" in r:
            print(f"  per-prefix loop on {r['loop']['rows']} rows: {r['loop']['s']:.1f} s, continuations "
                  f"identical {r['loop']['continuations_identical']}")
    for r in results:
        for v in ("old", "new"):
            r.get(v, {}).pop("source", None)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({
        "benchmark": "extraction", "model": "smollm2-135m (GGUF Q4_1, dequantized, float32)", "n": args.n,
        "threads": args.threads, "old_commit": args.old, "repeats": args.repeats, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "matmul_flops_per_token": flops,
        "decode_seconds_per_token": {how: {str(b): p for b, p in t.items()} for how, t in prices.items()},
        "best_seconds_per_token": best, "sets": results}, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
