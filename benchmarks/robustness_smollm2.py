"""Robustness of forgetting on SmolLM2-135M: is a forget set that passes the never-seen test still gone after
4-bit quantization, or after a few fine-tuning steps on part of it? (issue 13, "the measurement that matters")

The setting is `benchmarks/tdec_smollm2.py`'s, with its memorize step: the first --seqs sequences of
--forget-file cut to --tokens SmolLM2 tokens are fine-tuned into the model until their mean MA reaches
--memorize-target; --seqs sequences of another TDEC file, never trained on, are the unseen control.

For each method (from the same memorized model, one learning rate, LoRA rank --rank):
1. unlearn with `--until forgotten --unseen U` (`loku.audit.stop`: stop after the first epoch at which the
   forget set's mean MA and EL10 are below the memorized model's on U), at most --max-epochs epochs;
2. measure the unlearned model (merged) as `loku audit` does (`loku.audit.measure.measure_model`): forget vs
   unseen MA, EL10, ES, EM and the membership AUCs of LOSS, ZLib, Min-K%, Min-K%++;
3. the same (without EL10, as `loku audit` measures attacked models by default) after INT4 (round-to-nearest,
   per output channel) and NF4 (bitsandbytes' code book, block 64)
   fake quantization of the merged weights (`loku.attacks.quantize_model`);
4. the same after 10/25/50 relearning steps (`loku.attacks.relearn`: AdamW lr --relearn-lr, batch
   --relearn-batch) on half of the forget set, measured on the whole forget set and on the held-out half;
5. utility: perplexity on the first --limit items of WikiText-2 and the Pile (`loku.metrics.utility`).
The memorized model is measured the same way (the "original" of every recovery fraction
(attacked - unlearned) / (original - unlearned)).

Every method's result is saved to WORK/methods/NAME.json when it finishes and skipped when that file exists, so
a killed run continues where it stopped; memorization is reused from WORK as tdec_smollm2.py does. Writes
--results (JSON), the markdown table beside it (.md) and the plot (.png).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/robustness_smollm2.py            # the real run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/robustness_smollm2.py --methods ga_lora,ihl_fila --max-epochs 1 \\
        --relearn-steps 0,2 --limit 2 --work /tmp/robust_toy --results /tmp/robust_toy/robustness.json   # plumbing
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from loku import UnlearnConfig, load_model, unlearn
from loku.attacks import RelearnSettings, quantize_model, relearn, split_forget
from loku.attacks.quantize import merged_copy
from loku.audit.measure import Settings, compare, measure_model
from loku.audit.run import recoveries, subset, summary
from loku.audit.sets import build_set
from loku.errors import LokuError
from loku.io import write_json, write_text
from loku.metrics.utility import evaluate_utility
from loku.tdec import load_sequences, retain_examples
from tdec_smollm2 import DATA, memorize, say   # the same setting and memorize step (run as a script)

RESULTS = Path(__file__).resolve().parent / "results" / "robustness_smollm2.json"
METHODS = {  # name -> (label, UnlearnConfig overrides); in the order they run (LoKU's against GA first)
    "ga_lora": ("GA + LoRA", dict(method="ga", init="default")),
    "ihl_fila": ("IHL + FILA", dict(method="ihl", init="fila")),
    "ihl_lora": ("IHL + LoRA", dict(method="ihl", init="default")),
    "npo_lora": ("NPO + LoRA", dict(method="npo", init="default")),
    "simnpo_lora": ("SimNPO + LoRA", dict(method="simnpo", init="default")),
    "gd_lora": ("GD + LoRA", dict(method="gd", init="default")),
    "ihl_vila": ("IHL + VILA", dict(method="ihl", init="vila")),
    "ga_full": ("GA (full)", dict(method="ga", lora=False)),
}
QUANTIZERS = ("int4", "nf4")


def write_texts(path: Path, texts: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([t] for t in texts)
    return path


def point(measured: dict, idx_out: list[int] | None, st: Settings) -> dict:
    """The numbers of one model: forget-side summary (ma, el, es, em, auc_<attack>), the strongest attack, and
    the held-out half's ma/es/auc when relearning split the set."""
    cmp = measured["compare"]["forget"]
    s = summary(cmp)
    aucs = {k.removeprefix("auc_"): v for k, v in s.items() if k.startswith("auc_")}
    best = max(aucs, key=lambda a: abs(aucs[a] - 0.5))
    out = {**s, "best_auc": aucs[best], "best_attack": best,
           "unseen": {m: line["unseen"] for m, line in cmp["metrics"].items()}}
    if idx_out is not None:
        h = compare(subset(measured["sets"]["forget"], idx_out), measured["sets"]["unseen"], st)
        hs = summary(h)
        out["held_out"] = {**{m: hs[m] for m in ("ma", "el", "es", "em") if m in hs},
                           "best_auc": max((hs[f"auc_{a}"] for a in aucs), key=lambda v: abs(v - 0.5))}
    return out


class Setting:
    """What every method shares: the memorized model, the sets, the measurement settings, the original's numbers."""

    def __init__(self, args):
        self.args = args
        tdec = args.data_dir / "tdec" / "forget"
        forget_path, unseen_path = tdec / args.forget_file, tdec / args.unseen_file
        args.work.mkdir(parents=True, exist_ok=True)
        if (args.work / "memorize.json").is_file():
            self.mem = json.loads((args.work / "memorize.json").read_text())
        else:
            model, tokenizer = load_model("smollm2-135m")
            self.mem = memorize(args, forget_path, model, tokenizer)
            del model
        self.model_dir = self.mem["model_dir"]
        self.model, self.tokenizer = load_model(self.model_dir)
        tok = self.tokenizer
        forget = load_sequences(forget_path, tok, max_tokens=args.tokens, limit=args.seqs)
        unseen = load_sequences(unseen_path, tok, max_tokens=args.tokens, limit=args.seqs)
        # what --until forgotten reads (the cut sequences as text, as loku tdec run trains on them)
        self.forget_csv = write_texts(args.work / "forget.csv", forget.texts(tok))
        self.unseen_csv = write_texts(args.work / "unseen.csv", unseen.texts(tok))
        self.sets = {name: build_set(name, str(path), [{"text": t} for t in seqs.texts(tok)], tok,
                                     max_tokens=args.tokens, n=10)
                     for name, path, seqs in (("forget", self.forget_csv, forget), ("unseen", self.unseen_csv, unseen))}
        self.st = Settings(n=10, batch_size=8, pad_id=tok.pad_token_id, bootstrap=args.bootstrap, seed=args.seed)
        self.idx_in, self.idx_out = split_forget(len(self.sets["forget"]), 0.5, args.seed)
        self.relearn_feats = [self.sets["forget"].features[i] for i in self.idx_in]
        self.retain = retain_examples(args.data_dir)
        self.original = self.cached("original", lambda: self.measure_full(self.model))

    def cached(self, name: str, compute) -> dict:
        path = self.args.work / f"{name}.json"
        if path.is_file():
            say(f"skip: {path} exists")
            return json.loads(path.read_text())
        value = compute()
        write_json(path, value)
        return value

    def measure_full(self, model) -> dict:
        """The model's numbers, its full measurement (for recoveries) and its utility."""
        t0 = time.time()
        measured = measure_model(model, self.sets, self.st)
        say(f"   measured in {time.time() - t0:.0f} s")
        util = evaluate_utility(model, self.tokenizer, self.args.tasks, limit=self.args.limit,
                                data_dir=self.args.data_dir)
        return {"point": point(measured, self.idx_out, self.st), "compare": measured["compare"]["forget"],
                "utility": util["summary"], "seconds": round(time.time() - t0, 1)}


def run_method(s: Setting, name: str) -> dict:
    args = s.args
    path = args.work / "methods" / f"{name}.json"
    if path.is_file():
        say(f"skip {name}: {path} exists")
        return json.loads(path.read_text())
    label, overrides = METHODS[name]
    lr = args.lr if overrides.get("lora", True) else args.full_lr
    say(f"{label}: unlearn --until forgotten (lr {lr}, rank {args.rank}, at most {args.max_epochs} epochs)")
    t0 = time.time()
    cfg = UnlearnConfig(forget=str(s.forget_csv), unseen=str(s.unseen_csv), until="forgotten",
                        lora_rank=args.rank, epochs=args.max_epochs, lr=lr, batch_size=args.batch_size,
                        max_length=args.tokens + 1, seed=args.seed, mixed_precision=args.mixed_precision, **overrides)
    try:
        res = unlearn(cfg, s.model, s.tokenizer, progress=True,   # the rule's line per epoch
                      retain=s.retain if overrides["method"] != "ga" else None)
    except LokuError as e:   # e.g. a diverged loss: a result of the comparison, not a crash
        say(f"   {label} failed: {e}")
        result = {"label": label, "error": str(e)}
        write_json(path, result)
        return result
    seconds_unlearn = round(time.time() - t0, 1)
    history = [{k: h[k] for k in ("epoch", "loss", "ma", "el10", "forgotten") if k in h} for h in res.history]
    first = next((h["epoch"] for h in history if h.get("forgotten")), None)
    say(f"   {'forgotten at epoch ' + str(first) if first else 'not forgotten'} after {res.epochs_run} epochs "
        f"({seconds_unlearn:.0f} s)")
    unlearned = merged_copy(res.model).eval()
    del res
    say("   measure the unlearned model")
    base = s.measure_full(unlearned)
    orig_cmp = s.original["compare"]
    st = dataclasses.replace(s.st, el=False)   # attacked models: MA/ES/AUC without EL10's decoding, as loku audit
    attacks = {}
    for q in QUANTIZERS:
        say(f"   {q}")
        m = measure_model(quantize_model(unlearned, q), s.sets, st)
        attacks[q] = {**point(m, s.idx_out, st),
                      "recovery": recoveries(m["compare"]["forget"], base["compare"], orig_cmp)}
    settings = RelearnSettings(lr=args.relearn_lr, batch_size=args.relearn_batch, seed=args.seed)
    for k in args.relearn_steps:
        if k == 0:
            continue
        say(f"   relearn {k} steps on {len(s.idx_in)} forget sequences")
        m = measure_model(relearn(unlearned, s.relearn_feats, s.st.pad_id, k, settings), s.sets, st)
        attacks[f"relearn_{k}"] = {**point(m, s.idx_out, st),
                                   "recovery": recoveries(m["compare"]["forget"], base["compare"], orig_cmp)}
    result = {"label": label, "config": {**overrides, "lr": lr}, "epochs_to_forget": first,
              "epochs_run": len(history), "history": history, "unlearned": base["point"],
              "utility": base["utility"], "attacks": attacks,
              "seconds": {"unlearn": seconds_unlearn, "total": round(time.time() - t0, 1)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    say(f"   done in {result['seconds']['total']:.0f} s -> {path}")
    return result


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def ppl(x) -> str:
    return "-" if x is None else f"{x:.1f}" if x < 1e4 else f"{x:.2g}"


def cell(p: dict | None, held_out: bool = False) -> str:
    """'MA / AUC' of one measurement (the held-out half's for relearning)."""
    if p is None:
        return "-"
    q = p["held_out"] if held_out else p
    return f"{pct(q['ma'])} / {q['best_auc']:.2f}"


def table(s: Setting, results: dict, steps: list[int]) -> str:
    relearn = [k for k in steps if k]
    head = (["Method", "Epochs", "MA %", "EL10 %", "ES %", "AUC (attack)", "INT4 MA / AUC", "NF4 MA / AUC"]
            + [f"relearn {k}: held-out MA / AUC" for k in relearn] + ["WikiText ppl", "Pile ppl"])
    o, u = s.original["point"], s.original["point"]["unseen"]
    rows = [["memorized (original)", "-", pct(o["ma"]), pct(o["el"]), pct(o["es"]),
             f"{o['best_auc']:.2f} ({o['best_attack']})", "", ""] + [""] * len(relearn)
            + [ppl(s.original["utility"]["wikitext_ppl"]), ppl(s.original["utility"]["pile_ppl"])],
            ["never-seen level (unseen set)", "-", pct(u["ma"]), pct(u["el"]), pct(u["es"]), "0.50", "", ""]
            + [""] * len(relearn) + ["", ""]]
    for name, r in results.items():
        if "error" in r:
            rows.append([f"{r['label']} (failed: {r['error'][:60]})"] + [""] * (len(head) - 1))
            continue
        p, a = r["unlearned"], r["attacks"]
        epochs = f"{r['epochs_to_forget']}" if r["epochs_to_forget"] else f">{r['epochs_run']} (cap)"
        rows.append([r["label"], epochs, pct(p["ma"]), pct(p["el"]), pct(p["es"]),
                     f"{p['best_auc']:.2f} ({p['best_attack']})", cell(a.get("int4")), cell(a.get("nf4"))]
                    + [cell(a.get(f"relearn_{k}"), held_out=True) for k in relearn]
                    + [ppl(r["utility"]["wikitext_ppl"]), ppl(r["utility"]["pile_ppl"])])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot(s: Setting, results: dict, steps: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in results.items() if "error" not in r}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    stages = [("unlearned", "unlearned"), ("int4", "INT4"), ("nf4", "NF4")]
    width = 0.8 / len(stages)
    for ax, key, what in ((axes[0][0], "ma", "forget-set MA"), (axes[0][1], "best_auc", "strongest membership AUC")):
        for j, (stage, text) in enumerate(stages):
            values = [(r["unlearned"] if stage == "unlearned" else r["attacks"][stage])[key] for r in ok.values()]
            ax.bar([i + (j - 1) * width for i in range(len(ok))], values, width, label=text)
        level = s.original["point"]["unseen"]["ma"] if key == "ma" else 0.5
        ax.axhline(level, color="k", ls="--", lw=1, label="never-seen level" if key == "ma" else "chance (0.5)")
        if key == "ma":
            ax.axhline(s.original["point"]["ma"], color="r", ls=":", lw=1, label="memorized")
        ax.set_xticks(range(len(ok)), [r["label"] for r in ok.values()], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{what}: unlearned, then quantized")
        ax.legend(fontsize=7)
    for ax, key, what in ((axes[1][0], "ma", "held-out forget MA"),
                          (axes[1][1], "best_auc", "strongest AUC, held-out")):
        for r in ok.values():
            ys = [r["unlearned"]["held_out"][key]] + [r["attacks"][f"relearn_{k}"]["held_out"][key]
                                                     for k in steps if k]
            ax.plot([0] + [k for k in steps if k], ys, marker="o", label=r["label"])
        if key == "ma":
            ax.axhline(s.original["point"]["held_out"]["ma"], color="r", ls=":", lw=1, label="memorized")
            ax.axhline(s.original["point"]["unseen"]["ma"], color="k", ls="--", lw=1, label="never-seen level")
        else:
            ax.axhline(0.5, color="k", ls="--", lw=1)
        ax.set_xlabel("relearning steps on the other half of the forget set")
        ax.set_title(f"{what} after relearning")
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, memorized TDEC sequences: unlearned until forgotten, then attacked")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=8, help="forget-set size (and unseen-set size)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--forget-file", default="lm_extraction_32_0.csv")
    ap.add_argument("--unseen-file", default="lm_extraction_32_1.csv")
    ap.add_argument("--memorize-target", type=float, default=0.9)
    ap.add_argument("--memorize-epochs", type=int, default=30)
    ap.add_argument("--memorize-lr", type=float, default=2e-4)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lr", type=float, default=5e-3, help="one learning rate for every LoRA method (at "
                    "tdec_smollm2.py's 1e-3 no LoRA method reaches the never-seen level within 6 epochs)")
    ap.add_argument("--full-lr", type=float, default=1e-3, help="learning rate of full fine-tuning (GA full); "
                    "tdec_smollm2.py's 1e-3 already forgets in 2 epochs there")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=6, help="the epoch cap of --until forgotten")
    ap.add_argument("--mixed-precision", default="bf16", help="training only; no | bf16")
    ap.add_argument("--relearn-steps", default="0,10,25,50")
    ap.add_argument("--relearn-lr", type=float, default=1e-4)
    ap.add_argument("--relearn-batch", type=int, default=4)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tasks", default="wikitext,pile", help="utility tasks (loku.metrics.utility)")
    ap.add_argument("--limit", type=int, default=10, help="utility items per task")
    ap.add_argument("--data-dir", type=Path, default=DATA, help="data folder (tdec/, eval/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("runs/robustness_smollm2"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the JSON, table and plot from the methods "
                    "finished in --work; run nothing")
    args = ap.parse_args()
    args.relearn_steps = sorted({int(k) for k in args.relearn_steps.split(",")})
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in names if m not in METHODS]:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    if not (args.data_dir / "tdec").is_dir():
        raise SystemExit(f"needs the public data folder {args.data_dir}/tdec: pass --data-dir")
    say(f"work dir {args.work}; {len(names)} methods: {', '.join(names)}; torch threads {torch.get_num_threads()}")
    s = Setting(args)
    results = {}
    for name in names:
        if args.report_only and not (args.work / "methods" / f"{name}.json").is_file():
            continue
        results[name] = run_method(s, name)
        report(s, args, results)   # the table so far, after every method
    say(f"wrote {args.results}")


def report(s: Setting, args, results: dict) -> None:
    scale = (f"SmolLM2-135M (embedded GGUF, float32); forget set: first {args.seqs} sequences of {args.forget_file} "
             f"cut to {args.tokens} tokens, memorized by fine-tuning ({s.mem['epochs']} epochs, MA "
             f"{s.mem['base_ma']:.2f} -> {s.mem['final_ma']:.2f}); unseen control: {args.seqs} sequences of "
             f"{args.unseen_file}; unlearning: lr {args.lr} (LoRA) / {args.full_lr} (full), batch {args.batch_size}, "
             f"LoRA r={args.rank}, "
             f"retain WikiText-2 test (GD/NPO/SimNPO/IHL), until forgotten (MA and EL10 below the memorized "
             f"model's on the unseen set) or {args.max_epochs} epochs; AUC: the membership attack farthest from 0.5 "
             f"(LOSS, ZLib, Min-K% k=0.4, Min-K%++); quantization of the merged weights (INT4 per channel, NF4 "
             f"block 64); relearning: AdamW lr {args.relearn_lr}, batch {args.relearn_batch}, on "
             f"{len(s.idx_in)} of the {args.seqs} forget sequences, MA/AUC of the other {len(s.idx_out)}; "
             f"utility: perplexity on the first {args.limit} items of {args.tasks}; "
             f"{torch.get_num_threads()} CPU threads.")
    md = table(s, results, args.relearn_steps)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, {"benchmark": "robustness_smollm2", "scale": scale, "date": time.strftime("%Y-%m-%d"),
                              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(),
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "memorize": {k: v for k, v in s.mem.items() if k != "history"},
                              "original": s.original, "relearn_split": {"relearned": s.idx_in, "held_out": s.idx_out},
                              "methods": results, "table": md})
    write_text(args.results.with_suffix(".md"), scale + "\n\n" + md + "\n")
    if any("error" not in r for r in results.values()):
        plot(s, results, args.relearn_steps, args.results.with_suffix(".png"))
    print("\n" + md + "\n", flush=True)


if __name__ == "__main__":
    main()
