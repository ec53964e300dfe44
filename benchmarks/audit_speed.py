"""How long `loku audit` takes: 32 forget + 32 unseen TDEC sequences on SmolLM2-135M, no relearning.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/audit_speed.py                 # the target setting
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/audit_speed.py --attacks quantize,paraphrase

Forget: the first --seqs sequences of tdec/forget/lm_extraction_32_0.csv; unseen: of lm_extraction_32_1.csv
(Pile text SmolLM2 was not trained on), each cut to --tokens SmolLM2 tokens. The audited model is SmolLM2-135M
itself: it has not memorized these sequences, which is the state of a forget set after unlearning and the most
expensive one for EL_n (every prefix's greedy continuation leaves the text early and has to be decoded).
Runs (each a fresh `run_audit`): the metrics from the one teacher-forced pass alone (--no-el: MA, ES, EM,
membership AUCs), then with EL_n. Prints a table and writes benchmarks/results/audit_speed.json with the
machine's load average, since the 2 cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "tdec" / "forget"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--attacks", default="", help="comma list (quantize, paraphrase) timed as well")
    ap.add_argument("--skip-el", action="store_true", help="time only the run without EL_n")
    ap.add_argument("--decode-batch-size", type=int, default=64)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--results", default=str(HERE / "results" / "audit_speed.json"))
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    forget, unseen = Path(args.data) / "lm_extraction_32_0.csv", Path(args.data) / "lm_extraction_32_1.csv"
    if not forget.is_file():
        print(f"needs the TDEC files in {args.data} (../shared/data/tdec/forget)", file=sys.stderr)
        return 2

    from loku.audit import AuditConfig, run_audit
    from loku.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    load_s = time.perf_counter() - t0
    runs = []
    variants = [("teacher-forced metrics (MA, ES, EM, 4 AUCs)", "none")] + ([] if args.skip_el else
                                                                           [("+ EL10 (fast path)", "before")])
    for label, el in variants:
        out = Path(tempfile.mkdtemp(prefix="audit_speed_"))
        shutil.rmtree(out)
        cfg = AuditConfig(model="smollm2-135m", forget=str(forget), unseen=str(unseen), rows=args.seqs,
                          max_tokens=args.tokens, el=el, attacks=[a for a in args.attacks.split(",") if a],
                          decode_batch_size=args.decode_batch_size, out=str(out))
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        report = run_audit(cfg, model=model, tokenizer=tok, log=lambda s: None)
        seconds = time.perf_counter() - t0
        parts = {"unlearned": report["unlearned"]["sets"]["forget"]["seconds"]
                 + report["unlearned"]["sets"]["unseen"]["seconds"]}
        for q in report["attacks"].get("quantize", []):
            parts[f"quantize {q['quantizer']}"] = q["result"]["seconds_total"]
        for p in report["attacks"].get("paraphrase", {}).get("kinds", []):
            parts[f"paraphrase {p['kind']}"] = p["result"]["seconds_total"]
        base = report["unlearned"]["compare"]["forget"]
        runs.append({"label": label, "el": el != "none", "seconds": round(seconds, 1), "parts_seconds": parts,
                     "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
                     "forget": {m: round(v["forget"], 4) for m, v in base["metrics"].items()},
                     "unseen": {m: round(v["unseen"], 4) for m, v in base["metrics"].items()},
                     "auc": {a: round(v["auc"], 4) for a, v in base["auc"].items()}})
        shutil.rmtree(out, ignore_errors=True)
    result = {"model": "smollm2-135m", "forget": str(forget), "unseen": str(unseen), "seqs": args.seqs,
              "tokens": args.tokens, "threads": threads, "cpu_count": os.cpu_count(), "model_load_s": round(load_s, 1),
              "attacks": args.attacks, "decode_batch_size": args.decode_batch_size, "runs": runs,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"loku audit, SmolLM2-135M, {args.seqs} forget + {args.seqs} unseen TDEC sequences x {args.tokens} tokens, "
          f"{threads} threads (model load {load_s:.1f} s, not counted)")
    print(f"| run | seconds | load avg before/after | forget MA / ES | unseen MA / ES | AUC loss |")
    print("|---|---:|---|---|---|---:|")
    for r in runs:
        print(f"| {r['label']} | {r['seconds']:.1f} | {r['load_average_before']} / {r['load_average_after']} | "
              f"{r['forget']['ma']:.3f} / {r['forget']['es']:.3f} | {r['unseen']['ma']:.3f} / {r['unseen']['es']:.3f} "
              f"| {r['auc']['loss']:.3f} |")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
