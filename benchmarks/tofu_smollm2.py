"""TOFU on SmolLM2-135M, CPU-sized: every loku method with LoRA r=8, IHL+FILA, and GA and NPO with full fine-tuning.

Scale (default; every knob is a flag): a 10-author TOFU with the first 10 QA pairs of each author, forget10 =
1 author / 10 QA (the retain set is the other 9 authors, 90 QA). The target model is SmolLM2-135M fine-tuned
on all 100 QA pairs, the retain model on the 90 (full fine-tuning, 5 epochs, one warmup epoch, lr 1e-4, batch 8;
TOFU's own lr 1e-5 x effective batch 32 would make 4 updates an epoch here). Every method then unlearns
for 5 epochs (lr 5e-4, batch 4) and is scored after every epoch on the first 10 items of each TOFU evaluation
set (the whole 10-item forget set), with answers cut at 48 generated tokens. Forget Quality is the KS-test
p-value between the forget-set truth ratios and the retain model's (10 vs 10 items, so the smallest attainable
values are ~1e-5); Model Utility the harmonic mean of TOFU's 9 retain/real-author/world numbers; ES the forget
answers' extraction strength (loku.metrics.extraction). Texts are in TOFU's own prompt format for phi
(`--prompt-format tofu-phi`, the default): labels "Answer: {answer}" + EOS, generation from "Question: {question}\n".

Methods (`--methods`, default all; labels as `loku tofu unlearn --methods` reads them): each loku method by
name with LoRA r=8 and peft's default init, `ihl+fila` (IHL with FILA), `ga+full` and `npo+full` (full
fine-tuning). Resources: idk and dpo get TOFU's refusal answers (data folder's tofu/idontknow.jsonl); pdu's
retain-loss budget is the target's retain cross-entropy (worked out once, OUT/pdu_retain_loss_eps.json); rmu
steers layer 7 (of 30) as RMU.yaml does. Not run here: lunar without `--lunar-harmful FILE` (no refusal-prompt
set in the data folder) and lmcleaner (needs a recorded fine-tuning trajectory; SmolLM2's would be ~0.5 GB a
step); the JSON lists them with the reason.

Resumable and splittable: the target/retain models (OUT/models/) are fine-tuned once; every method's result
is its own OUT/unlearn/runs/<label>/tofu.json, kept and skipped on the next run, so runs with different
--methods share one --out (one at a time: they share OUT/unlearn/results.json; a run must repeat every other
flag, which loku tofu's --resume checks). Each run ends with the report step: the table, the JSON
(--results) and the Model Utility / Forget Quality plot (beside it, *_mu_fq.png) from every method finished in
--out; `--report-only` runs only that step.

Every method at the default scale, split into runs that each fit a 2-core machine in under 90 minutes
(estimated by `benchmarks/split_plan.py tofu --smoke TOY.json`: the 2026-11-28 run's timings, 1 thread beside
other jobs, for GA/GD/NPO/IdK/IHL/IHL+FILA, the others scaled from a toy run of every method; the first run
fine-tunes the two models, ~26 min; SIBL, ~27 min, is the slowest method):

    OUT="--out runs/tofu_all"
    .venv/bin/python benchmarks/tofu_smollm2.py $OUT --methods gd,simnpo,pdu,t3                  # ~64 min
    .venv/bin/python benchmarks/tofu_smollm2.py $OUT --methods npo,dpo,satimp,ceu,sibl           # ~64 min
    .venv/bin/python benchmarks/tofu_smollm2.py $OUT --methods ga,ihl,rmu,gru,npo+full           # ~57 min
    .venv/bin/python benchmarks/tofu_smollm2.py $OUT --methods kl,idk,wga,undial,ihl+fila,ga+full # ~64 min
    .venv/bin/python benchmarks/tofu_smollm2.py $OUT --report-only     # table, JSON, plot from what finished

    .venv/bin/python benchmarks/tofu_smollm2.py --out /tmp/toy --results /tmp/toy.json \
        --qa-per-author 2 --ft-epochs 1 --epochs 1 --limit 2 --max-new-tokens 8 --threads 1   # smoke test (~15 min,
                                                                  # every method, 1 thread beside other jobs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from loku import io
from loku.config import UnlearnConfig
from loku.data.qa import PROMPT_FORMATS
from loku.data.tofu import tokenize_qa
from loku.errors import LokuError
from loku.models import load_model
from loku.tofu.finetune import MODELS, SUMMARY, TofuFinetuneConfig, retain_split, train_model, training_rows
from loku.tofu.report import RESULTS as RUN_RESULTS
from loku.tofu.run import CONFIG, TofuUnlearnConfig, run_tofu
from loku.tofu.scores import answer_scores
from method_labels import add_method_flags, labels_for, not_applicable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # the development data folder (a dev tool); TOFU in its tofu/
RESULTS = ROOT / "benchmarks" / "results" / "tofu_smollm2.json"


def finetune_phase(args, out: Path, names=MODELS) -> dict:
    """Target and retain models (`names`) in out/models/, each skipped when its folder is already complete."""
    cfg = TofuFinetuneConfig(out=str(out / "models"), model=args.model, data_dir=str(args.data_dir),
                             split=args.split, authors=args.authors, qa_per_author=args.qa_per_author,
                             epochs=args.ft_epochs, lr=args.ft_lr, batch_size=args.ft_batch_size, grad_accum=1,
                             warmup_epochs=1.0, seed=args.seed, prompt_format=args.prompt_format)
    rows = training_rows(cfg)
    summary_path = out / "models" / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    def settings(config: dict) -> dict:   # where the folder lies is not a setting: it may be moved or linked
        return {k: v for k, v in config.items() if k != "out"}

    if summary and settings(summary.get("config", {})) != settings(dataclasses.asdict(cfg)):
        changed = sorted(k for k in settings(dataclasses.asdict(cfg))
                         if summary.get("config", {}).get(k) != getattr(cfg, k))
        raise SystemExit(f"{out / 'models'} was fine-tuned with other settings ({', '.join(changed)}): "
                         "pass a new --out")
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


def pdu_budget(args, out: Path) -> float:
    """PDU's retain-loss budget (its PDU.yaml leaves it to the user: "e.g. the start model's retain loss"):
    the target model's token-mean answer cross-entropy on the retain rows it trains on, worked out once
    and kept in out/pdu_retain_loss_eps.json so that every split run shares one training configuration."""
    path = out / "pdu_retain_loss_eps.json"
    if path.is_file():
        return json.loads(path.read_text())["pdu_retain_loss_eps"]
    cfg = TofuFinetuneConfig(out=str(out / "models"), data_dir=str(args.data_dir), split=args.split,
                             authors=args.authors, qa_per_author=args.qa_per_author, prompt_format=args.prompt_format)
    rows = training_rows(cfg)["retain"]
    model, tokenizer = load_model(str(out / "models" / "target"))
    scores = answer_scores(model, tokenize_qa(tokenizer, rows, 500, prompt_format=args.prompt_format),
                           tokenizer.pad_token_id)
    eps = sum(scores["loss"]) / sum(scores["tokens"])
    io.write_json(path, {"pdu_retain_loss_eps": eps, "rows": len(rows),
                         "what": "target model's token-mean answer cross-entropy on the retain rows"})
    print(f"      PDU retain-loss budget: the target's retain cross-entropy {eps:.4f} ({len(rows)} rows)", flush=True)
    return eps


def train_config(args, out: Path) -> UnlearnConfig:
    """The settings every method shares; the same for every split run (loku tofu's --resume checks it)."""
    return UnlearnConfig(init="default", lora_rank=args.rank, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, grad_accum=1, weight_decay=0.01, max_length=500, seed=args.seed,
                         pdu_retain_loss_eps=pdu_budget(args, out),
                         lunar_harmful=str(args.lunar_harmful) if args.lunar_harmful else None)


def unlearn_phase(args, out: Path, labels: list[str]) -> dict:
    """The methods of this run, into out/unlearn/runs/<label>/ (each method's tofu.json is its result; a
    finished method is skipped, so several runs with different --methods share one --out, one at a time)."""
    cfg = TofuUnlearnConfig(target=str(out / "models" / "target"), out=str(out / "unlearn"), methods=labels,
                            split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens,
                            eval_batch_size=8, resume=(out / "unlearn" / CONFIG).is_file(),
                            train=train_config(args, out), prompt_format=args.prompt_format)
    return run_tofu(cfg)


def finished(out: Path, labels: list[str]) -> dict:
    """What out/unlearn holds: the retain and target scores (from the last run's results.json) and every
    finished method's tofu.json, in the order of `labels` (methods outside it after them)."""
    unlearn = out / "unlearn"
    if not (unlearn / RUN_RESULTS).is_file():
        raise SystemExit(f"{unlearn / RUN_RESULTS} is missing: no unlearning run has finished a method in {out}")
    results = json.loads((unlearn / RUN_RESULTS).read_text())
    found = {p.parent.name: p for p in sorted((unlearn / "runs").glob("*/tofu.json"))}
    order = [l for l in labels if l in found] + [l for l in found if l not in labels]
    results["methods"] = {label: json.loads(found[label].read_text()) for label in order}
    return results


def _f(x: float) -> str:
    return f"{x:.2e}" if x < 1e-2 else f"{x:.3f}"


def table(results: dict) -> str:
    lines = ["| model | init | rank | Forget Quality (last) | Model Utility (last) | ES Forget (last) | "
             "best FQ (epoch) | unlearn s | eval s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("retain", "target"):
        s = results[name]
        lines.append(f"| {name} model | | | {_f(s['Forget Quality'])} | {s['Model Utility']:.3f} | "
                     f"{s['ES Forget']:.3f} | | | |")
    for label, m in results["methods"].items():
        last = m["epochs"][-1]
        best = max(m["epochs"], key=lambda e: e["Forget Quality"])
        lines.append(f"| {label} | {m['init']} | {m['lora_rank'] or 'full'} | {_f(last['Forget Quality'])} | "
                     f"{last['Model Utility']:.3f} | {last['ES Forget']:.3f} | {_f(best['Forget Quality'])} "
                     f"({best['epoch']}) | {m['seconds']:.0f} | {m['eval_seconds']:.0f} |")
    return "\n".join(lines)


def plot_mu_fq(results: dict, path: Path, title: str) -> None:
    """Model Utility (x) against Forget Quality (log y): each method's last epoch as a labelled point, a faint
    line back through its earlier epochs to the target; the retain model (the goal) as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-300   # a p-value can underflow to 0; keep it on the log axis
    fig, ax = plt.subplots(figsize=(9, 6))
    colors, markers = plt.get_cmap("tab20").colors, "osD^v<>ph"
    target = results["target"]
    for i, (label, m) in enumerate(results["methods"].items()):
        xs = [target["Model Utility"]] + [e["Model Utility"] for e in m["epochs"]]
        ys = [max(v, floor) for v in [target["Forget Quality"]] + [e["Forget Quality"] for e in m["epochs"]]]
        color = colors[i % len(colors)]
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
        ax.scatter(xs[-1:], ys[-1:], color=color, marker=markers[i % len(markers)], s=45, zorder=4, label=label)
        ax.annotate(label, (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax.scatter([target["Model Utility"]], [max(target["Forget Quality"], floor)], color="black", zorder=5,
               label="target (before)")
    ax.scatter([results["retain"]["Model Utility"]], [1.0], marker="*", s=180, color="gold", edgecolor="black",
               zorder=5, label="retain model (goal)")
    ax.set_yscale("log")
    ax.set_ylim(top=2.0)
    ax.set_xlabel("Model Utility (last epoch)")
    ax.set_ylabel("Forget Quality (KS-test p-value, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def report(args, labels: list[str], skipped: dict[str, str], t_run: dict | None = None) -> None:
    """The table, JSON and MU/FQ plot from every method finished in --out (the report step)."""
    results = finished(args.out, labels)
    ft = json.loads((args.out / "models" / SUMMARY).read_text())
    text = table(results)
    print(text)
    if skipped:
        print("\n".join(f"not run: {label}: {why}" for label, why in skipped.items()))
    plot = args.plot or args.results.with_name(args.results.stem + "_mu_fq.png")
    plot_mu_fq(results, plot, title=f"TOFU {args.split}, {args.authors} authors x {args.qa_per_author} QA, "
                                    f"SmolLM2-135M: Model Utility vs Forget Quality (last epoch)")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(args.results, {
        "benchmark": "tofu_smollm2",
        "model": args.model + (" (GGUF Q4_1, dequantized, float32)" if args.model == "smollm2-135m" else ""),
        "scale": {"split": args.split, "authors": args.authors, "qa_per_author": args.qa_per_author,
                  "train_rows": results["train_rows"], "eval_items": results["eval_items"],
                  "max_new_tokens": args.max_new_tokens, "prompt_format": results["prompt_format"]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "finetune": {name: {k: ft[name][k] for k in ("rows", "seconds", "history")} for name in MODELS},
        "retain": results["retain"], "target": results["target"], "methods": results["methods"],
        "not_applicable": skipped, "table": text, "plot": str(plot), **(t_run or {}),
        "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine()})
    print(f"wrote {args.results} and {plot}; per-epoch table and plot of this run's methods in {args.out / 'unlearn'}")


def parser() -> argparse.ArgumentParser:
    """The flags (robustness_tofu.py reads their defaults: the same target model)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "tofu_smollm2",
                    help="work folder (resumable; shared by the split runs, one at a time)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=None, help="MU/FQ plot (default: beside --results, *_mu_fq.png)")
    add_method_flags(ap, "table, JSON and plot from the methods finished in --out")
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
    try:
        labels = labels_for(args.methods)
    except LokuError as e:
        raise SystemExit(str(e))
    skipped = not_applicable(labels, lunar_harmful=args.lunar_harmful, benchmark="tofu")
    run = [label for label in labels if label not in skipped]
    if args.report_only:
        report(args, labels_for("all"), not_applicable(labels_for("all"), args.lunar_harmful, "tofu"))
        return
    if not (args.data_dir / "tofu").is_dir():
        raise SystemExit(f"TOFU data folder {args.data_dir / 'tofu'} is missing: pass --data-dir (../shared/data)")
    if args.lunar_harmful and not args.lunar_harmful.is_file():
        raise SystemExit(f"--lunar-harmful {args.lunar_harmful} does not exist: pass a file of refusal prompts")
    for label, why in skipped.items():
        print(f"not run: {label}: {why}", flush=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    print(f"[1/2] fine-tune target and retain models ({args.authors} authors x {args.qa_per_author} QA, "
          f"{args.split})", flush=True)
    finetune_phase(args, args.out)
    t_ft = time.time() - t0
    print(f"[2/2] unlearn with {len(run)} methods ({', '.join(run)}), scoring each epoch", flush=True)
    if run:
        try:
            unlearn_phase(args, args.out, run)
        except LokuError as e:   # e.g. another flag than the earlier runs in this --out
            raise SystemExit(f"error: {e}")
    report(args, labels_for("all"), not_applicable(labels_for("all"), args.lunar_harmful, "tofu"),
           {"methods_this_run": run, "finetune_seconds_this_run": round(t_ft, 1),
            "total_seconds_this_run": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
