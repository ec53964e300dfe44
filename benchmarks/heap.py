"""Seconds per forward+backward of SmolLM2-135M (cross-entropy over the whole vocabulary, every weight trained)
with glibc's default malloc against loku's `keep_freed_memory` (what the `loku` command sets), for batches of
several sizes. Each setting runs in its own fresh process (mallopt is process-wide), the two alternated over
--rounds; the table is each setting's median step.

    .venv/bin/python benchmarks/heap.py [--rows 4 8 12 20 --seq 85 --steps 3 --rounds 2]

Writes benchmarks/results/heap.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

# One process: load the model, then per batch size one warm-up step and --steps timed ones; prints JSON.
WORKER = """
import json, sys, time
import torch
from loku.heap import keep_freed_memory
from loku.losses import cross_entropy
from loku.models import load_model

mode, seq, steps, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(r) for r in sys.argv[4:]]
applied = keep_freed_memory() if mode == "kept" else False
model, _ = load_model("smollm2-135m")
model.train()
g = torch.Generator().manual_seed(0)
out = {"applied": applied, "seconds": {}}
for b in rows:
    ids = torch.randint(0, 40000, (b, seq), generator=g)
    times = []
    for i in range(steps + 1):
        start = time.time()
        cross_entropy(model(input_ids=ids, use_cache=False).logits, ids).backward()
        model.zero_grad(set_to_none=True)
        if i:   # the first is a warm-up
            times.append(time.time() - start)
    out["seconds"][b] = times
print(json.dumps(out))
"""


def run(mode: str, args) -> dict:
    r = subprocess.run([sys.executable, "-c", WORKER, mode, str(args.seq), str(args.steps), *map(str, args.rows)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the {mode} worker failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8, 12, 20])
    ap.add_argument("--seq", type=int, default=85)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/heap.json")
    args = ap.parse_args()
    times = {mode: {b: [] for b in args.rows} for mode in ("default", "kept")}
    for r in range(args.rounds):
        for mode in ("default", "kept"):
            got = run(mode, args)
            assert got["applied"] == (mode == "kept"), got
            for b, ts in got["seconds"].items():
                times[mode][int(b)] += ts
            print(f"round {r + 1} {mode}: " + ", ".join(f"{b} rows {statistics.median(ts):.2f} s"
                                                        for b, ts in got["seconds"].items()), flush=True)
    table = [{"rows": b, "tokens": b * args.seq, **{f"{m}_s": round(statistics.median(times[m][b]), 3)
                                                    for m in times}} for b in args.rows]
    for row in table:
        row["speedup"] = round(row["default_s"] / row["kept_s"], 2)
    result = {"machine": platform.processor() or platform.machine(), "seq": args.seq, "steps": args.steps,
              "rounds": args.rounds, "table": table, "times": times}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| rows x tokens | glibc default (s / step) | kept (s / step) | speed-up |\n|---|---|---|---|")
    for row in table:
        print(f"| {row['rows']} x {args.seq} | {row['default_s']:.2f} | {row['kept_s']:.2f} | {row['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
