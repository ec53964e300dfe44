"""Seconds of one LoRA training step (forward + backward) in float32 and under bf16 autocast, alternately in one
run: whether bf16 pays on this machine's hardware. `--mixed-precision auto` picks bf16 only where it is native
(`loku.distributed.native_bf16`); this measures why.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision_cpu.py [--batch 2 --seq 65 --rounds 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from peft import LoraConfig, get_peft_model

from loku.distributed import native_bf16
from loku.io import write_json
from loku.models import load_model


def step_seconds(model, ids: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """(forward, backward) seconds of one step: the loss is the mean log-partition of the logits."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids).logits
    loss = logits.float().logsumexp(-1).mean()
    t1 = time.perf_counter()
    loss.backward()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=65)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/precision_cpu.json")
    args = ap.parse_args()
    model, _ = load_model(args.model)
    model = get_peft_model(model, LoraConfig(r=args.rank, target_modules="all-linear"))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    step_seconds(model, ids, False)   # warm-up
    rows = []
    for r in range(args.rounds):   # alternate, so machine noise hits both alike
        for name in ("fp32", "bf16"):
            fwd, bwd = step_seconds(model, ids, name == "bf16")
            rows.append({"round": r, "precision": name, "forward_s": fwd, "backward_s": bwd})
            print(f"round {r} {name}: forward {fwd:.2f} s, backward {bwd:.2f} s", flush=True)
    mean = {p: sum(x["forward_s"] + x["backward_s"] for x in rows if x["precision"] == p) / args.rounds
            for p in ("fp32", "bf16")}
    ratio = mean["bf16"] / mean["fp32"]
    print(f"step: fp32 {mean['fp32']:.2f} s, bf16 {mean['bf16']:.2f} s (bf16 / fp32 = {ratio:.1f}x); "
          f"native bf16: {native_bf16()}")
    write_json(args.out, {
        "benchmark": "precision_cpu", "date": time.strftime("%Y-%m-%d"), "args": vars(args),
        "machine": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows, "mean_step_s": mean,
        "bf16_over_fp32": ratio})


if __name__ == "__main__":
    main()
