"""Check loku's fake quantizers against bitsandbytes' CUDA kernels (run on a machine with a GPU).

    .venv/bin/pip install bitsandbytes torch==<the installed torch>   # if missing
    .venv/bin/python benchmarks/bnb_gpu_check.py          # table + benchmarks/results/bnb_gpu_check.json

NF4: loku.attacks.quantize.fake_nf4(W, block) (computed on the CPU) against
bitsandbytes.functional.dequantize_4bit(quantize_4bit(W.cuda(), blocksize=block, quant_type="nf4")).
INT8: fake_int(W, 8) against int8_vectorwise_dequant(int8_vectorwise_quant(W.half().cuda())) (LLM.int8()).
Shapes: random weights and, when it loads, every linear layer of SmolLM2-135M. Exit code 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from loku.attacks.quantize import fake_int, fake_nf4, quantized_weights

RESULTS = Path(__file__).resolve().parent / "results"


def compare(name: str, w: torch.Tensor, blocks=(64, 128)) -> list[dict]:
    import bitsandbytes.functional as F

    rows = []
    for block in blocks:
        packed, state = F.quantize_4bit(w.cuda(), blocksize=block, quant_type="nf4")
        theirs = F.dequantize_4bit(packed, state).cpu()
        ours = fake_nf4(w.float().cpu(), block)
        rows.append({"weight": name, "shape": list(w.shape), "quantizer": f"nf4-b{block}",
                     "equal": bool(torch.equal(ours, theirs)), "mismatches": int((ours != theirs).sum()),
                     "max_abs_diff": float((ours - theirs).abs().max())})
    cb, stats, _ = F.int8_vectorwise_quant(w.half().cuda())
    theirs = F.int8_vectorwise_dequant(cb, stats).cpu()
    ours = fake_int(w.half().float().cpu(), 8)
    rows.append({"weight": name, "shape": list(w.shape), "quantizer": "int8 (fp16 weight)",
                 "equal": bool(torch.equal(ours, theirs)), "mismatches": int((ours != theirs).sum()),
                 "max_abs_diff": float((ours - theirs).abs().max())})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-model", action="store_true", help="random weights only (no SmolLM2)")
    ap.add_argument("--results", default=str(RESULTS / "bnb_gpu_check.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this check compares against bitsandbytes' CUDA kernels", file=sys.stderr)
        return 2
    import bitsandbytes

    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in [(96, 192), (50, 70), (576, 1536), (1536, 576), (4096, 4096)]:
        rows += compare(f"randn{shape}", torch.randn(*shape, generator=g) * 0.02)
    if not args.no_model:
        from loku.models import load_model

        model, _ = load_model("smollm2-135m")
        for name, (module, _) in quantized_weights(model).items():
            rows += compare(name, module.weight.data)
    bad = [r for r in rows if not r["equal"]]
    print(f"{'weight':48s} {'shape':>12s} {'quantizer':>18s} {'equal':>6s} {'mismatches':>10s}")
    for r in rows if len(rows) < 40 else rows[:15] + bad[:25]:
        print(f"{r['weight'][:48]:48s} {str(tuple(r['shape'])):>12s} {r['quantizer']:>18s} {str(r['equal']):>6s} "
              f"{r['mismatches']:>10d}")
    summary = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0), "compared": len(rows), "unequal": len(bad),
               "seconds": round(time.time() - t0, 1), "rows": rows}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(rows) - len(bad)}/{len(rows)} equal; wrote {args.results}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
