"""Peak memory per process of `loku unlearn` on 2 CPU processes under each shipped launch configuration.

DDP keeps the whole model, its gradients and the AdamW states in every process; ZeRO-2 splits gradients and
optimizer states; FSDP2 and ZeRO-3 split the weights too. This measures it: peak resident memory of the largest
process (the launcher's children, waited for), one epoch of full fine-tuning (GA) and of LoRA r=8 (IHL), one
process with the same global batch as the baseline. CPU only: accelerate starts FSDP and DeepSpeed only on GPUs,
so those runs go through tests/fsdp_on_cpu.py, as the tests do. Every process first loads the whole model
(float32) before the engine splits it, so that load is a floor under every number.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaleout_memory.py [--model smollm2-135m --modes full,lora]
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # the tests' launch options and free rendezvous port
from launch import ACCELERATE, ON_CPU, free_port, launch_options  # noqa: E402

# Runs a command and prints the peak RSS (KiB on Linux) of its largest descendant.
PEAK = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(json.dumps({'rc': r.returncode, 'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def launcher(engine: str) -> tuple[list[str], dict]:
    if engine == "one process":
        return [sys.executable, "-m", "loku"], {}
    # Each launch on a port the OS just handed out: accelerate's default 29500 meets any other launch running.
    if engine == "ddp":
        options, target, env = launch_options(), ["-m", "loku"], {"ACCELERATE_USE_CPU": "true"}
    else:
        options, target, env = launch_options(engine), [ON_CPU], {}
    return [ACCELERATE, "launch", *options, "--main_process_port", str(free_port()), *target], env


def texts(n: int) -> list[str]:
    words = "the model data private record forget retain token memory weight layer learning rate".split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(120)) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--engines", default="one process,ddp,deepspeed_zero2,fsdp,deepspeed_zero3")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaleout_memory.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loku-scaleout-"))
    for name, rows in (("forget", texts(4)), ("retain", texts(8)[4:])):
        with (work / f"{name}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["text"], *[[t] for t in rows]])
    mode_args = {"full": ["--method", "ga", "--full", "--lr", "1e-5"],
                 "lora": ["--method", "ihl", "--init", "default", "--lora-rank", "8", "--lr", "1e-4"]}
    results = []
    for mode in args.modes.split(","):
        for engine in args.engines.split(","):
            cmd, env = launcher(engine)
            batch = "2" if engine == "one process" else "1"   # the same global batch of 2
            out = work / f"{mode}-{engine.replace(' ', '_')}"
            loku = ["unlearn", "--model", args.model, "--forget", str(work / "forget.csv"), "--retain",
                    str(work / "retain.csv"), "--epochs", "1", "--batch-size", batch, "--max-length", str(args.seq),
                    "--out", str(out), *mode_args[mode]]
            t0 = time.time()
            r = subprocess.run([sys.executable, "-c", PEAK, *cmd, *loku], capture_output=True, text=True,
                               env={**os.environ, **env})
            peak = json.loads(r.stdout.strip().splitlines()[-1])
            ok = peak["rc"] == 0 and (out / "manifest.json").is_file()
            row = {"mode": mode, "engine": engine, "ok": ok, "peak_mib": round(peak["peak_kib"] / 1024),
                   "seconds": round(time.time() - t0, 1)}
            if not ok:
                row["stderr"] = r.stderr[-2000:]
            results.append(row)
            print(f"{mode:5s} {engine:16s} peak {row['peak_mib']:6d} MiB  {row['seconds']:6.1f} s  "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
    print("\n| fine-tuning | engine (2 processes) | peak RSS per process | vs DDP |\n|---|---|---|---|")
    for r in results:
        ddp = next(x["peak_mib"] for x in results if x["mode"] == r["mode"] and x["engine"] == "ddp")
        print(f"| {r['mode']} | {r['engine']} | {r['peak_mib']} MiB | {r['peak_mib'] / ddp:.2f}x |")
    meta = {"model": args.model, "seq": args.seq, "global_batch": 2, "epochs": 1, "python": platform.python_version(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "threads": os.environ.get("OMP_NUM_THREADS")}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
