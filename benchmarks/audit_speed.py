"""How long `loku audit` takes: 32 forget + 32 unseen TDEC sequences on SmolLM2-135M, no relearning, EL10 included;
this version against an older commit (run from its own sources in the same run), and against the floor.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/audit_speed.py                 # the target setting
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/audit_speed.py --seqs 8 --old ''   # quick, this version only

Forget: the first --seqs sequences of tdec/forget/lm_extraction_32_0.csv; unseen: of lm_extraction_32_1.csv
(Pile text SmolLM2 was not trained on), each cut to --tokens SmolLM2 tokens. The audited model is SmolLM2-135M
itself: it has not memorized these sequences, which is the state of a forget set after unlearning and the most
expensive one for EL_n (about every other prefix's greedy continuation leaves the text and has to be decoded).
Runs, each a fresh `run_audit` in its own process (the model loaded first, not timed), old and new alternating:
`--el none` (MA, ES, EM, membership AUCs from the one teacher-forced pass), then `--el before` (+ EL10).
The floor of the EL10 run: the teacher-forced pass plus every token EL10 must decode, at the best price per
decoded token measured by benchmarks/extraction.py's `price_table` in this run. Writes
benchmarks/results/audit_speed.json with the machine's load average, since the 2 cores are shared.
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
sys.path.insert(0, str(HERE))
from extraction import in_process, matmul_flops_per_token, old_sources, price_table  # noqa: E402


def worker(args) -> None:
    """One `run_audit` with this version of loku; prints its times and means as one JSON line."""
    from loku.audit import AuditConfig, run_audit
    from loku.models import load_model

    model, tok = load_model("smollm2-135m")
    out = Path(tempfile.mkdtemp(prefix="audit_speed_"))
    shutil.rmtree(out)
    cfg = AuditConfig(model="smollm2-135m", forget=args.forget, unseen=args.unseen, rows=args.seqs,
                      max_tokens=args.tokens, el=args.el, out=str(out))
    t0, c0 = time.perf_counter(), time.process_time()
    report = run_audit(cfg, model=model, tokenizer=tok, log=lambda s: None)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(out, ignore_errors=True)
    sets = report["unlearned"]["sets"]
    base = report["unlearned"]["compare"]["forget"]
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu,
                      "sets_seconds": {k: v["seconds"] for k, v in sets.items()},
                      "forget": {m: v["forget"] for m, v in base["metrics"].items()},
                      "unseen": {m: v["unseen"] for m, v in base["metrics"].items()},
                      "auc": {a: v["auc"] for a, v in base["auc"].items()},
                      "el": {k: v["per_example"].get("el") for k, v in sets.items()},
                      "threads": torch.get_num_threads()}))


@torch.no_grad()
def decode_work(model, tok, path: Path, seqs: int, tokens: int, n: int) -> tuple[int, float]:
    """(tokens EL_n must decode for the set, seconds of its teacher-forced pass), from one pass per 8 rows."""
    from transformers import DynamicCache

    from loku.audit.sets import read_examples
    from loku.metrics.greedy import cache_kwarg, needed_branches

    rows = [tok(e["text"], add_special_tokens=False)["input_ids"][:tokens]
            for e in read_examples(str(path), "text", "forget")[:seqs]]
    decoded, t0 = 0, time.perf_counter()
    for i in range(0, len(rows), 8):
        part = rows[i:i + 8]
        if len({len(r) for r in part}) > 1:
            raise SystemExit("rows of different lengths: raise --tokens or pick other rows")
        g = model(input_ids=torch.tensor(part), use_cache=True, **{cache_kwarg(model): DynamicCache()}).logits
        for x, gr in zip(part, g[:, :-1].argmax(-1).tolist()):
            decoded += sum(len(x) - 1 - d for d in needed_branches(x, gr, n))
    return decoded, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--old", default="dee7e4a", help="commit of the previous path ('' to skip)")
    ap.add_argument("--els", default="none,before", help="the --el modes timed")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--results", default=str(HERE / "results" / "audit_speed.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--el", default="before", help=argparse.SUPPRESS)
    ap.add_argument("--forget", help=argparse.SUPPRESS)
    ap.add_argument("--unseen", help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    if args.worker:
        worker(args)
        return 0
    forget, unseen = Path(args.data) / "lm_extraction_32_0.csv", Path(args.data) / "lm_extraction_32_1.csv"
    if not forget.is_file():
        print(f"needs the TDEC files in {args.data} (../shared/data/tdec/forget)", file=sys.stderr)
        return 2

    versions = {"old": old_sources(args.old)} if args.old else {}
    versions["new"] = HERE.parent / "src"
    runs = []
    for el in args.els.split(","):
        for version, src in versions.items():
            load_before = os.getloadavg()[0]
            res = in_process(__file__, src, ["--worker", "--el", el, "--forget", str(forget), "--unseen", str(unseen),
                                   "--seqs", str(args.seqs), "--tokens", str(args.tokens)], threads)
            res.update(version=version, el=el, load_average_before=round(load_before, 2),
                       load_average_after=round(os.getloadavg()[0], 2))
            runs.append(res)
            print(f"{version} --el {el}: {res['seconds']:.1f} s, {res['cpu_seconds']:.1f} CPU s "
                  f"(load {load_before:.1f} -> "
                  f"{res['load_average_after']:.1f})", flush=True)

    from loku.models import load_model

    model, tok = load_model("smollm2-135m")
    model.eval()
    work = {name: decode_work(model, tok, path, args.seqs, args.tokens, 10)
            for name, path in (("forget", forget), ("unseen", unseen))}
    decoded = sum(d for d, _ in work.values())
    full_pass = sum(s for _, s in work.values())
    prices = price_table(model, [128, 256], args.tokens // 2, threads)
    best = min(p for table in prices.values() for p in table.values())
    floor = full_pass + decoded * best
    flops = matmul_flops_per_token(model)
    same = {}
    if args.old:
        for el in args.els.split(","):
            old, new = (next(r for r in runs if r["version"] == v and r["el"] == el) for v in ("old", "new"))
            same[el] = {"speedup": old["seconds"] / new["seconds"]}
            if el != "none":
                same[el]["el_identical"] = old["el"] == new["el"]
    print(f"loku audit, SmolLM2-135M, {args.seqs} forget + {args.seqs} unseen TDEC sequences x {args.tokens} tokens, "
          f"{threads} threads")
    print("| version | --el | seconds | load avg before/after | forget MA / EL10 / ES | unseen MA / EL10 / ES |")
    print("|---|---|---:|---|---|---|")
    for r in runs:
        f, u = r["forget"], r["unseen"]
        el_of = (lambda m: f"{m['el']:.3f}" if "el" in m else "-")
        print(f"| {r['version']} | {r['el']} | {r['seconds']:.1f} | {r['load_average_before']} / "
              f"{r['load_average_after']} | {f['ma']:.3f} / {el_of(f)} / {f['es']:.3f} | "
              f"{u['ma']:.3f} / {el_of(u)} / {u['es']:.3f} |")
    print(f"EL10 decodes {decoded} tokens ({decoded * flops / 1e12:.1f} TFLOP of matmul); best price "
          f"{best * 1e3:.2f} ms/token; floor of the EL10 audit {floor:.0f} s (teacher-forced pass {full_pass:.1f} s)")
    for el, s in same.items():
        print(f"--el {el}: old/new {s['speedup']:.2f}x" + (f", EL10 values identical: {s['el_identical']}"
                                                           if "el_identical" in s else ""))
    result = {"model": "smollm2-135m", "forget": str(forget), "unseen": str(unseen), "seqs": args.seqs,
              "tokens": args.tokens, "threads": threads, "cpu_count": os.cpu_count(), "old_commit": args.old,
              "runs": runs, "old_vs_new": same, "el_decoded_tokens": decoded, "teacher_forced_pass_s": full_pass,
              "decode_seconds_per_token": {h: {str(b): p for b, p in t.items()} for h, t in prices.items()},
              "best_seconds_per_token": best, "el_floor_s": floor, "matmul_flops_per_token": flops,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
