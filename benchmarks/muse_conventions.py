"""How much the two MUSE conventions (muse_bench's code vs OpenUnlearning's port) move the numbers, on the
embedded SmolLM2-135M and a small MUSE-layout set built from the public data (the real MUSE data is not on
this machine):

- VerbMem: WikiText-2 test paragraphs, prompt = the first 32 tokens, gt = the next 128 tokens;
- KnowMem: TOFU QA (forget10 / retain), 3 retain QA pairs as the few-shot examples;
- PrivLeak: forget = other WikiText-2 paragraphs (text the model may have seen), holdout = TOFU answers of
  fictitious authors (text it cannot have seen).

Same model, same data, both conventions; the table gives each metric under each and the difference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/muse_conventions.py [--items 24]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from loku import load_model
from loku.muse import MuseScoring, evaluate_muse, load_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results" / "muse_conventions.json"


def build(root: Path, tokenizer, n: int) -> None:
    lines = [l.strip() for l in (SHARED / "tdec" / "retain" / "wikitext2_test.raw").read_text(
        encoding="utf-8").splitlines() if len(l.strip()) > 900 and not l.strip().startswith("=")]
    verb = []
    for line in lines[:n]:
        ids = tokenizer(line, add_special_tokens=False).input_ids
        verb.append({"prompt": tokenizer.decode(ids[:32]), "gt": tokenizer.decode(ids[32:160])})
    forget10 = json.loads((SHARED / "tofu" / "forget10_perturbed.json").read_text(encoding="utf-8"))
    retain = json.loads((SHARED / "tofu" / "retain_perturbed.json").read_text(encoding="utf-8"))
    qa = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    holdout = [" ".join(r["answer"] for r in forget10[i:i + 4]) for i in range(0, 4 * n, 4)]
    files = {"verbmem/forget": verb, "knowmem/forget_qa": qa(forget10[:n]), "knowmem/retain_qa": qa(retain[3:3 + n]),
             "knowmem/forget_qa_icl": qa(retain[:3]), "knowmem/retain_qa_icl": qa(retain[:3]),
             "privleak/forget": [l[:1500] for l in lines[n:2 * n]], "privleak/holdout": holdout[:n]}
    for name, rows in files.items():
        (root / "muse" / "news" / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "muse" / "news" / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "threads": args.threads, "items": args.items, "model": "smollm2-135m", "conventions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), tokenizer, args.items)
        for conv in ("muse_bench", "open-unlearning"):
            scoring = MuseScoring(data_dir=tmp, convention=conv)
            t0 = time.time()
            s = evaluate_muse(model, tokenizer, load_data(scoring), scoring, progress=False)
            out["conventions"][conv] = {**s["metrics"], "auc": s["auc"], "auc_retrain": s["auc_retrain"],
                                        "seconds": round(time.time() - t0, 1)}
            print(conv, out["conventions"][conv], flush=True)
    a, b = out["conventions"]["muse_bench"], out["conventions"]["open-unlearning"]
    print("| metric | muse_bench | open-unlearning | difference |\n|---|---:|---:|---:|")
    for k in ("verbmem_f", "knowmem_f", "knowmem_r", "auc", "auc_retrain", "privleak"):
        print(f"| {k} | {a[k]:.4f} | {b[k]:.4f} | {b[k] - a[k]:+.4f} |")
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
