"""TOFU on SmolLM2-135M, CPU-sized: GA, GD, NPO, IdK and IHL (LoRA, default init) and IHL+FILA at the same rank.

Scale (default; every knob is a flag): a 10-author TOFU with the first 10 QA pairs of each author, forget10 =
1 author / 10 QA (the retain set is the other 9 authors, 90 QA). The target model is SmolLM2-135M fine-tuned
on all 100 QA pairs, the retain model on the 90 (full fine-tuning, 5 epochs, one warmup epoch, lr 1e-4, batch 8;
TOFU's own lr 1e-5 x effective batch 32 would make 4 updates an epoch here). Every method then unlearns
with LoRA rank 8 for 5 epochs (lr 5e-4, batch 4) and is scored after every epoch on the first 10 items of each
TOFU evaluation set (the whole 10-item forget set), with answers cut at 48 generated tokens. Forget Quality
is the KS-test p-value between the forget-set truth ratios and the retain model's (10 vs 10 items, so the
smallest attainable values are ~1e-5); Model Utility the harmonic mean of TOFU's 9 retain/real-author/world
numbers. Texts are in TOFU's own prompt format for phi (`--prompt-format tofu-phi`, the default): labels
"Answer: {answer}" + EOS, generation from "Question: {question}\n".

Resumable: finished phases (each fine-tuned model, each evaluation, each method) are kept in --out and
skipped on the next run; delete --out to start again.

    .venv/bin/python benchmarks/tofu_smollm2.py                      # the full run (~45-60 min on 2 cores)
    .venv/bin/python benchmarks/tofu_smollm2.py --out /tmp/toy --results /tmp/toy.json \
        --qa-per-author 2 --ft-epochs 1 --epochs 1 --limit 2 --max-new-tokens 8 --threads 1   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

from loku import io
from loku.config import UnlearnConfig
from loku.data.qa import PROMPT_FORMATS
from loku.tofu.finetune import MODELS, SUMMARY, TofuFinetuneConfig, retain_split, train_model, training_rows
from loku.tofu.run import CONFIG, TofuUnlearnConfig, run_tofu

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # the development data folder (a dev tool); TOFU in its tofu/
RESULTS = ROOT / "benchmarks" / "results" / "tofu_smollm2.json"
BASELINES = ("ga", "gd", "npo", "idk", "ihl")


def finetune_phase(args, out: Path, names=MODELS) -> dict:
    """Target and retain models (`names`) in out/models/, each skipped when its folder is already complete."""
    cfg = TofuFinetuneConfig(out=str(out / "models"), model=args.model, data_dir=str(args.data_dir),
                             split=args.split, authors=args.authors, qa_per_author=args.qa_per_author,
                             epochs=args.ft_epochs, lr=args.ft_lr, batch_size=args.ft_batch_size, grad_accum=1,
                             warmup_epochs=1.0, seed=args.seed, prompt_format=args.prompt_format)
    rows = training_rows(cfg)
    summary_path = out / "models" / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary and summary.get("config") != dataclasses.asdict(cfg):
        raise SystemExit(f"{out / 'models'} was fine-tuned with other settings: pass a new --out")
    summary.update({"config": dataclasses.asdict(cfg), "splits": {"target": "full", "retain": retain_split(cfg.split)},
                    "forget_split": cfg.split, "authors": cfg.authors, "qa_per_author": cfg.qa_per_author,
                    "prompt_format": cfg.prompt_format})
    for i, name in enumerate(names, 1):
        folder = out / "models" / name
        if (folder / "model.safetensors").is_file() and name in summary:
            print(f"[1.{i}] {name} model: done earlier ({folder})", flush=True)
            continue
        print(f"[1.{i}] fine-tuning the {name} model on {len(rows[name])} QA pairs "
              f"({cfg.epochs} epochs, lr {cfg.lr}, batch {cfg.batch_size})", flush=True)
        summary[name] = train_model(cfg, name, rows[name], folder)
        io.write_json(summary_path, summary)
        losses = ", ".join(f"{h['loss']:.3f}" for h in summary[name]["history"])
        print(f"      loss by epoch: {losses}; {summary[name]['seconds']:.0f} s", flush=True)
    return summary


def unlearn_phase(args, out: Path) -> dict:
    methods = list(BASELINES)
    fila = importlib.util.find_spec("loku.fila") is not None
    if fila:
        methods.append("ihl+fila")
    else:
        print("loku.fila is not importable: IHL+FILA is left out", flush=True)
    train = UnlearnConfig(init="default", lora_rank=args.rank, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, grad_accum=1, weight_decay=0.01, max_length=500, seed=args.seed)
    cfg = TofuUnlearnConfig(target=str(out / "models" / "target"), out=str(out / "unlearn"), methods=methods,
                            split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens,
                            eval_batch_size=8, resume=(out / "unlearn" / CONFIG).is_file(), train=train,
                            prompt_format=args.prompt_format)
    return run_tofu(cfg)


def _f(x: float) -> str:
    return f"{x:.2e}" if x < 1e-2 else f"{x:.3f}"


def table(results: dict) -> str:
    lines = ["| model | init | rank | Forget Quality (last) | Model Utility (last) | best FQ (epoch) | "
             "unlearn s | eval s |", "|---|---|---|---|---|---|---|---|"]
    for name in ("retain", "target"):
        s = results[name]
        lines.append(f"| {name} model | | | {_f(s['Forget Quality'])} | {s['Model Utility']:.3f} | | | |")
    for label, m in results["methods"].items():
        last = m["epochs"][-1]
        best = max(m["epochs"], key=lambda e: e["Forget Quality"])
        lines.append(f"| {label} | {m['init']} | {m['lora_rank']} | {_f(last['Forget Quality'])} | "
                     f"{last['Model Utility']:.3f} | {_f(best['Forget Quality'])} ({best['epoch']}) | "
                     f"{m['seconds']:.0f} | {m['eval_seconds']:.0f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The flags (robustness_tofu.py reads their defaults: the same target model)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "tofu_smollm2", help="work folder (resumable)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--data-dir", type=Path, default=DATA, help="data folder (TOFU in its tofu/)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", default="forget10")
    ap.add_argument("--authors", type=int, default=10)
    ap.add_argument("--qa-per-author", type=int, default=10)
    ap.add_argument("--ft-epochs", type=int, default=5)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--ft-batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--limit", type=int, default=10, help="first N items of each evaluation set")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-format", default=TofuFinetuneConfig.prompt_format, choices=PROMPT_FORMATS,
                    help="how QA pairs become tokens (default: TOFU's phi format)")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main() -> None:
    args = parser().parse_args()
    if not (args.data_dir / "tofu").is_dir():
        raise SystemExit(f"TOFU data folder {args.data_dir / 'tofu'} is missing: pass --data-dir (../shared/data)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    print(f"[1/2] fine-tune target and retain models ({args.authors} authors x {args.qa_per_author} QA, "
          f"{args.split})", flush=True)
    ft = finetune_phase(args, args.out)
    t_ft = time.time() - t0
    print("[2/2] unlearn with every method, scoring each epoch", flush=True)
    results = unlearn_phase(args, args.out)
    report = table(results)
    print(report)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(args.results, {
        "benchmark": "tofu_smollm2",
        "model": args.model + (" (GGUF Q4_1, dequantized, float32)" if args.model == "smollm2-135m" else ""),
        "scale": {"split": args.split, "authors": args.authors, "qa_per_author": args.qa_per_author,
                  "train_rows": results["train_rows"], "eval_items": results["eval_items"],
                  "max_new_tokens": args.max_new_tokens, "prompt_format": results["prompt_format"]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "finetune": {name: {k: ft[name][k] for k in ("rows", "seconds", "history")} for name in MODELS},
        "retain": results["retain"], "target": results["target"],
        "methods": {label: {k: v for k, v in m.items()} for label, m in results["methods"].items()},
        "table": report, "finetune_seconds_this_run": round(t_ft, 1),
        "total_seconds_this_run": round(time.time() - t0, 1), "threads": args.threads, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine()})
    print(f"wrote {args.results}; per-epoch table, JSON and FQ/MU plot in {args.out / 'unlearn'}")


if __name__ == "__main__":
    main()
