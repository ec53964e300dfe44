"""How fast `loku demo` could possibly run on this machine: every matrix multiply it does, counted, against the
fastest matrix multiply this machine does.

Runs the demo (defaults, or --seed/--quick) under torch's FlopCounterMode (it counts the multiply-adds of
matrix products, forward and backward: mm, addmm, bmm; not the elementwise work, softmaxes, optimizer or CPU
attention kernels, so the count is a lower bound of the work). Each part of the run is counted apart, as the
report's `seconds` splits it: training of the leak and of the unlearning (with FILA's Fisher pass), and the
checks (memorization, perplexity, generation) inside each phase and around them. Before and after the run, the
best of several measurements of a matrix product at the model's shapes on all threads gives this machine's
rate. FLOPs / that rate is a floor no implementation of the same computation can beat here.
The counter costs time, so the run's own seconds are printed beside the floor for reference only; the numbers of
the run (table, curves) are compared with --reference, a report of the same config without the counter.

    .venv/bin/python benchmarks/demo_floor.py [--seed 0] [--reference benchmarks/results/demo_report_...json]

Writes benchmarks/results/demo_floor.json (and the demo's own report under --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from loku import demo
from loku.heap import keep_freed_memory

CHECKS = {"memorization_row": "memorization", "perplexity": "perplexity", "leaks": "generation"}
PHASES = {"leak": "leak", "forget": "unlearn"}


def matmul_rate(shapes: list[tuple[int, int, int]], repeats: int = 10) -> dict:
    """GFLOP/s of an (m x k) @ (k x n) float32 product for each shape, the best of `repeats` timed runs."""
    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        best = float("inf")
        for i in range(repeats + 2):
            start = time.perf_counter()
            a @ b
            if i >= 2:   # two warm-ups
                best = min(best, time.perf_counter() - start)
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 1)
    return out


def model_shapes(config, tokens: int) -> list[tuple[int, int, int]]:
    """The demo's matrix products: `tokens` rows (about a batch) through the model's projections and its head,
    plus a large square product."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    return [(tokens, h, h), (tokens, h, kv), (tokens, h, i), (tokens, i, h), (tokens, h, v), (2048, 2048, 2048)]


def counted(counter: FlopCounterMode, where: list[str], flops: dict, name: str, fn):
    """`fn`, with the FLOPs of each call added to flops[(phase, name)] (the phase: the innermost of `where`)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before, phase = counter.get_total_flops(), name in PHASES.values()
        if phase:
            where.append(name)
        try:
            return fn(*args, **kwargs)
        finally:
            if phase:
                where.pop()
            flops[(where[-1], name)] += counter.get_total_flops() - before
    return wrapper


def parts(flops: dict) -> dict[str, int]:
    """FLOPs per part of the run, split as the report's `seconds`: each phase's checks apart from its training
    (a phase's own count includes its checks), the measurements around the phases as `measure`."""
    out = defaultdict(int)
    for (phase, name), n in flops.items():
        if name in PHASES.values():
            out[f"{name} training"] += n
        elif phase == "run":
            out["measure"] += n
        else:
            out[f"{phase} checks"] += n
            out[f"{phase} training"] -= n
    return dict(out)


def same_numbers(report: dict, reference: dict) -> bool:
    keys = ("base", "leaked", "unlearned", "leak_epochs", "unlearn_epochs")
    strip = [{k: v for k, v in c.items() if k != "check_seconds"} for c in report["curves"]]
    return all(report[k] == reference[k] for k in keys) and strip == [
        {k: v for k, v in c.items() if k != "check_seconds"} for c in reference["curves"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reference", default="benchmarks/results/demo_report_fp32_avx2_stream_heap.json",
                    help="a report of the same config run without the counter (its numbers and seconds)")
    ap.add_argument("--out", default="runs/demo-floor")
    ap.add_argument("--setup-seconds", type=float, default=123.0,
                    help="`make venv` from nothing on this machine type (README), for the `make demo` floor")
    ap.add_argument("--json", default="benchmarks/results/demo_floor.json")
    args = ap.parse_args()
    keep_freed_memory()   # as the `loku` command
    from loku.models import load_model

    config = load_model("smollm2-135m")[0].config
    shapes = model_shapes(config, 1024)
    rate_before = matmul_rate(shapes)

    counter, where, flops = FlopCounterMode(display=False), ["run"], defaultdict(int)
    for name, label in {**CHECKS, **PHASES}.items():
        setattr(demo, name, counted(counter, where, flops, label, getattr(demo, name)))
    start = time.time()
    with counter:
        report = demo.run_demo(demo.DemoConfig(out=args.out, seed=args.seed, quick=args.quick))
    wall = time.time() - start
    rate_after = matmul_rate(shapes)
    rate = max(*rate_before.values(), *rate_after.values())

    split = parts(flops)
    split["load"] = 0
    total = counter.get_total_flops()
    assert sum(split.values()) == total, (split, total)
    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    rows = []
    for part in report["seconds"]:
        n = split.get(part, 0)
        ref = reference["seconds"].get(part) if reference else None
        rows.append({"part": part, "tflop": round(n / 1e12, 2), "floor_s": round(n / rate / 1e9, 1),
                     "counted_run_s": report["seconds"][part], "reference_s": ref})
    floor = total / rate / 1e9
    out = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "seed": args.seed, "quick": args.quick,
           "matmul_gflops_before": rate_before, "matmul_gflops_after": rate_after, "best_gflops": rate,
           "total_tflop": round(total / 1e12, 2), "floor_s": round(floor, 1),
           "make_demo_floor_s": round(floor + args.setup_seconds, 1), "setup_s": args.setup_seconds,
           "counted_run_wall_s": round(wall, 1), "reference": args.reference,
           "reference_total_s": reference["total_seconds"] if reference else None,
           "same_numbers_as_reference": same_numbers(report, reference) if reference else None, "parts": rows}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nbest matrix product: {rate:.1f} GFLOP/s ({torch.get_num_threads()} threads); the demo multiplies "
          f"{total / 1e12:.2f} TFLOP: floor {floor:.0f} s (the reference run: {out['reference_total_s']} s); with "
          f"set-up ({args.setup_seconds:.0f} s) `make demo` >= {floor + args.setup_seconds:.0f} s; numbers equal "
          f"to the reference: {out['same_numbers_as_reference']}\n")
    print("| part | TFLOP | floor (s) | this run (s, counted) | reference run (s) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['part']} | {r['tflop']} | {r['floor_s']} | {r['counted_run_s']:.1f} | {r['reference_s']} |")


if __name__ == "__main__":
    main()
