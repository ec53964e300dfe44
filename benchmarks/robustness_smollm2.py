"""Robustness of forgetting on SmolLM2-135M: is a forget set that passes the never-seen test still gone after
4-bit quantization, or after a few fine-tuning steps on part of it? (issue 13, "the measurement that matters")

The setting is `benchmarks/tdec_smollm2.py`'s, with its memorize step: the first --seqs sequences of
--forget-file cut to --tokens SmolLM2 tokens are fine-tuned into the model until their mean MA reaches
--memorize-target; --seqs sequences of another TDEC file, never trained on, are the unseen control.
(`--setting tofu`: the 10-author TOFU of tofu_smollm2.py instead, see robustness_tofu.py.)

For each method (from the same memorized model, one learning rate, LoRA rank --rank):
1. unlearn until forgotten: `loku unlearn --until forgotten`'s rule (`loku.audit.stop`: stop after the first
   epoch at which the forget set's mean MA and EL10 are below the memorized model's on U), applied by the
   `Forgotten` epoch callback below on the benchmark's sets, at most --max-epochs epochs;
2. measure the unlearned model (merged) as `loku audit` does (`loku.audit.measure.measure_model`): forget vs
   unseen MA, ES, EM and the membership AUCs of LOSS, ZLib, Min-K%, Min-K%++, and the forget set's EL10;
3. the same (without EL10, as `loku audit` measures attacked models by default) after INT4 (round-to-nearest,
   per output channel) and NF4 (bitsandbytes' code book, block 64)
   fake quantization of the merged weights (`loku.attacks.quantize_model`);
4. the same after 10, 25 and 50 relearning steps (--relearn-steps, the issue's list)
   (`loku.attacks.relearn`: AdamW lr --relearn-lr, batch --relearn-batch) on half of the forget set,
   measured on the whole forget set and on the held-out half;
5. utility: perplexity on the first --limit items of WikiText-2 and the Pile (`loku.metrics.utility`).
The memorized model is measured the same way (the "original" of every recovery fraction
(attacked - unlearned) / (original - unlearned)).

The setting (chosen 2026-12-03): LoRA lr 1e-3, batch 2 (4 optimizer steps per epoch on the 8 sequences), cap
--max-epochs 10. At lr 5e-3 / batch 4 (the first run) GA+LoRA and IHL+FILA reached the never-seen level only by
destroying the model (WikiText perplexity 23 -> 1e13 and 2e4), so "it stays forgotten" said little; at lr 1e-3
/ batch 4 no LoRA method got there within 6 epochs (12 steps). At 1e-3 / batch 2 IHL+FILA forgets at epoch 3
at WikiText perplexity 30.3 (memorized model: 22.9; README "Robustness"). GA full keeps tdec_smollm2.py's lr 1e-3.

What was cut for time (measured with cProfile on one IHL+FILA epoch, 2026-12-03: EL10's greedy decoding was
382 of 497 s; it costs ~8,600 decoded tokens per 16 x 64-token measurement when the model no longer predicts
the text): the never-seen level is the memorized model's, measured once (original.json), not again by every
method's `--until` start; each epoch's EL10 is decoded only when the epoch's MA (teacher-forced, cheap) is
already below the level (the rule's decision is the same: both must be below); the unlearned model's EL10 is
the stop rule's last one (or decoded once, on the forget set only), and EL10 on the unseen set is no longer
measured for the unlearned model (the never-seen EL10 is the memorized model's, 0.0 %); relearning uses
batch 2 (was 4). The 50-step point was left out for time (~4.5 s a relearning step at batch 2 on 1 thread of
a loaded machine); on 2026-12-04 it cost ~1 min a method (1.4 s a step) and is back in the default list. That
run also found the unlearning epochs 20x slower under bf16 autocast on a CPU without native bf16:
`--mixed-precision auto` (the default) trains in fp32 there.

Every method's result is saved to WORK/methods/NAME.json when it finishes and skipped when that file exists, so
a killed run continues where it stopped; memorization is reused from WORK as tdec_smollm2.py does. Writes
--results (JSON), the markdown table beside it (.md) and the plot (.png).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/robustness_smollm2.py            # the real run (resumes)
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
from loku.audit.measure import Settings, compare, measure_model, measure_set
from loku.audit.run import recoveries, subset, summary
from loku.audit.sets import build_set
from loku.audit.stop import METRICS
from loku.errors import LokuError
from loku.config_base import PRECISION_HELP, PRECISIONS
from loku.io import write_json, write_text
from loku.metrics.utility import evaluate_utility
from loku.tdec import load_sequences, retain_examples
from loku.tdec.thresholds import below
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
    "idk_lora": ("IdK + LoRA", dict(method="idk", init="default")),   # TOFU only (refusal answers)
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


class Forgotten:
    """`loku unlearn --until forgotten`'s rule (`loku.audit.stop`) on the benchmark's own sets, as an epoch
    callback: stop after the first epoch whose forget-set means are all below the never-seen level (MA and EL10
    on text, EM and ES on QA). The level is the memorized model's on the unseen set, measured once
    (original.json), not again per method, and EL10's decoding (most of a measurement's seconds) runs only in an
    epoch whose cheap teacher-forced means are already below: the same decision, since every metric must be."""

    def __init__(self, s: "Setting"):
        self.forget, self.st = s.sets["forget"], dataclasses.replace(s.st, attacks=())
        self.level = {m: s.original["point"]["unseen"][m] for m in METRICS[self.forget.kind]}
        self.el: list[float] | None = None   # the forget set's EL10 per example, when the last epoch measured it

    def __call__(self, epoch: int, model) -> dict:
        m = measure_set(model, self.forget, dataclasses.replace(self.st, el=False))["mean"]
        ok = all(below(m[k], v) for k, v in self.level.items() if k != "el")
        self.el = None
        out = {k: m[k] for k in ("ma", "em", "es") if k in m}
        if ok and "el" in self.level:
            self.el = measure_set(model, self.forget, self.st)["per_example"]["el"]
            out["el10"] = sum(self.el) / len(self.el)
            ok = below(out["el10"], self.level["el"])
        say(f"   epoch {epoch}: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in out.items())
            + (" -> forgotten" if ok else ""))
        return {**out, "forgotten": ok, "stop": ok}


class Setting:
    """What every method shares: the memorized model, the sets, the measurement settings, the original's numbers.
    Its class attributes name what the table shows (a TOFU setting has QA sets: EM instead of MA and EL10)."""

    key = "ma"                                       # the forget-set metric beside each AUC
    shown = ("ma", "el", "es")                       # the unlearned model's columns
    utility_columns = (("WikiText ppl", "wikitext_ppl"), ("Pile ppl", "pile_ppl"))
    extra_attacks: tuple[str, ...] = ()              # attacks besides quantization and relearning
    title = "SmolLM2-135M, memorized TDEC sequences: unlearned until forgotten, then attacked"
    original_label = "memorized (original)"

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
        self.original = self.cached("original", lambda: self.measure_full(self.model, level=True))

    def cached(self, name: str, compute) -> dict:
        path = self.args.work / f"{name}.json"
        if path.is_file():
            say(f"skip: {path} exists")
            return json.loads(path.read_text())
        value = compute()
        write_json(path, value)
        return value

    def measure_full(self, model, el: list[float] | None = None, level: bool = False) -> dict:
        """The model's numbers, its full measurement (for recoveries) and its utility. EL10 is measured on the
        forget set only (`el`: the stop rule's, when its last epoch measured it), and on the unseen set only for
        the never-seen level (`level`: the memorized model, once)."""
        t0 = time.time()
        measured = measure_model(model, self.sets, dataclasses.replace(self.st, el=False))
        p = point(measured, self.idx_out, self.st)
        if self.sets["forget"].kind == "text":
            if el is None:
                el = measure_set(model, self.sets["forget"], dataclasses.replace(self.st, attacks=()))[
                    "per_example"]["el"]
            p["el"] = sum(el) / len(el)
            if level:   # the stop rule's EL10 level (Forgotten reads it)
                el_u = measure_set(model, self.sets["unseen"], dataclasses.replace(self.st, attacks=()))[
                    "per_example"]["el"]
                p["unseen"]["el"] = sum(el_u) / len(el_u)
        say(f"   measured in {time.time() - t0:.0f} s")
        return {"point": p, "compare": measured["compare"]["forget"], "utility": self.utility(model),
                "seconds": round(time.time() - t0, 1)}

    def describe(self) -> str:
        a = self.args
        return (f"SmolLM2-135M (embedded GGUF, float32); forget set: first {a.seqs} sequences of {a.forget_file} cut "
                f"to {a.tokens} tokens, memorized by fine-tuning ({self.mem['epochs']} epochs, MA "
                f"{self.mem['base_ma']:.2f} -> {self.mem['final_ma']:.2f}); unseen control: {a.seqs} sequences of "
                f"{a.unseen_file}; unlearning: lr {a.lr} (LoRA) / {a.full_lr} (full), batch {a.batch_size}, LoRA "
                f"r={a.rank}, retain WikiText-2 test (all but GA), until forgotten (MA and EL10 below the memorized "
                f"model's on the unseen set) or {a.max_epochs} epochs; AUC: the membership attack farthest from 0.5 "
                f"(LOSS, ZLib, Min-K% k=0.4, Min-K%++); quantization of the merged weights (INT4 per channel, NF4 "
                f"block 64); relearning: AdamW lr {a.relearn_lr}, batch {a.relearn_batch}, on {len(self.idx_in)} of "
                f"the {a.seqs} forget sequences, MA/AUC of the other {len(self.idx_out)}; utility: perplexity on the "
                f"first {a.limit} items of {a.tasks};")

    def utility(self, model) -> dict:
        return evaluate_utility(model, self.tokenizer, self.args.tasks, limit=self.args.limit,
                                data_dir=self.args.data_dir)["summary"]

    def unlearn_inputs(self, method: str) -> dict:
        """UnlearnConfig fields and `unlearn` keywords of the setting's data (GA uses no retain set)."""
        return {"config": dict(forget=str(self.forget_csv), max_length=self.args.tokens + 1),
                "kwargs": dict(retain=self.retain if method != "ga" else None)}


def run_method(s: Setting, name: str) -> dict:
    args = s.args
    path = args.work / "methods" / f"{name}.json"
    if path.is_file():
        say(f"skip {name}: {path} exists")
        return json.loads(path.read_text())
    label, overrides = METHODS[name]
    lr = args.lr if overrides.get("lora", True) else args.full_lr
    say(f"{label}: unlearn until forgotten (lr {lr}, rank {args.rank}, batch {args.batch_size}, at most "
        f"{args.max_epochs} epochs)")
    t0 = time.time()
    inputs = s.unlearn_inputs(overrides["method"])
    cfg = UnlearnConfig(lora_rank=args.rank, epochs=args.max_epochs, lr=lr, batch_size=args.batch_size,
                        seed=args.seed, mixed_precision=args.mixed_precision, **inputs["config"], **overrides)
    rule = Forgotten(s)
    try:
        res = unlearn(cfg, s.model, s.tokenizer, callbacks=[rule], progress=False, inplace=False, **inputs["kwargs"])
    except LokuError as e:   # e.g. a diverged loss: a result of the comparison, not a crash
        say(f"   {label} failed: {e}")
        result = {"label": label, "error": str(e)}
        write_json(path, result)
        return result
    seconds_unlearn = round(time.time() - t0, 1)
    history = [{k: h[k] for k in ("epoch", "loss", "ma", "el10", "em", "es", "forgotten") if k in h}
               for h in res.history]
    first = next((h["epoch"] for h in history if h.get("forgotten")), None)
    say(f"   {'forgotten at epoch ' + str(first) if first else 'not forgotten'} after {res.epochs_run} epochs "
        f"({seconds_unlearn:.0f} s)")
    unlearned = merged_copy(res.model).eval()
    del res
    say("   measure the unlearned model")
    base = s.measure_full(unlearned, rule.el)
    orig_cmp = s.original["compare"]
    st = dataclasses.replace(s.st, el=False)   # attacked models: MA/ES/AUC without EL10's decoding, as loku audit
    attacks = {}
    for q in QUANTIZERS:
        say(f"   {q}")
        m = measure_model(quantize_model(unlearned, q), s.sets, st)
        attacks[q] = {**point(m, s.idx_out, st),
                      "recovery": recoveries(m["compare"]["forget"], base["compare"], orig_cmp)}
    for name in s.extra_attacks:
        say(f"   {name}")
        attacks[name] = s.attack(name, unlearned, st)
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


def cell(p: dict | None, key: str, held_out: bool = False) -> str:
    """'MA / AUC' (key "ma"; "em" on QA) of one measurement (the held-out half's for relearning)."""
    if p is None:
        return "-"
    q = p["held_out"] if held_out else p
    return f"{pct(q[key])} / {q['best_auc']:.2f}"


def fmt_utility(key: str, x) -> str:
    return ppl(x) if key.endswith("ppl") else pct(x)


def table(s: Setting, results: dict, steps: list[int]) -> str:
    relearn, key = [k for k in steps if k], s.key.upper()
    names = {"ma": "MA %", "el": "EL10 %", "es": "ES %", "em": "EM %"}
    attacks = list(QUANTIZERS) + list(s.extra_attacks)
    head = (["Method", "Epochs"] + [names[m] for m in s.shown] + ["AUC (attack)"]
            + [f"{a.upper() if a in QUANTIZERS else a} {key} / AUC" for a in attacks]
            + [f"relearn {k}: held-out {key} / AUC" for k in relearn] + [c for c, _ in s.utility_columns]
            + ["seconds (unlearn / all)"])
    blank = [""] * (len(attacks) + len(relearn))
    o, u = s.original["point"], s.original["point"]["unseen"]
    rows = [[s.original_label, "-"] + [pct(o[m]) for m in s.shown]
            + [f"{o['best_auc']:.2f} ({o['best_attack']})"] + blank
            + [fmt_utility(k, s.original["utility"].get(k)) for _, k in s.utility_columns] + [""],
            ["never-seen level (unseen set)", "-"] + [pct(u.get(m)) for m in s.shown] + ["0.50"] + blank
            + [""] * len(s.utility_columns) + [""]]
    for name, r in results.items():
        if "error" in r:
            rows.append([f"{r['label']} (failed: {r['error'][:60]})"] + [""] * (len(head) - 1))
            continue
        p, a = r["unlearned"], r["attacks"]
        epochs = f"{r['epochs_to_forget']}" if r["epochs_to_forget"] else f">{r['epochs_run']} (cap)"
        rows.append([r["label"], epochs] + [pct(p.get(m)) for m in s.shown]
                    + [f"{p['best_auc']:.2f} ({p['best_attack']})"] + [cell(a.get(x), s.key) for x in attacks]
                    + [cell(a.get(f"relearn_{k}"), s.key, held_out=True) for k in relearn]
                    + [fmt_utility(k, r["utility"].get(k)) for _, k in s.utility_columns]
                    + [f"{r['seconds']['unlearn']:.0f} / {r['seconds']['total']:.0f}"])
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
    m, word = s.key, s.key.upper()
    for ax, key, what in ((axes[0][0], m, f"forget-set {word}"), (axes[0][1], "best_auc", "strongest membership AUC")):
        for j, (stage, text) in enumerate(stages):
            values = [(r["unlearned"] if stage == "unlearned" else r["attacks"][stage])[key] for r in ok.values()]
            ax.bar([i + (j - 1) * width for i in range(len(ok))], values, width, label=text)
        level = s.original["point"]["unseen"][m] if key == m else 0.5
        ax.axhline(level, color="k", ls="--", lw=1, label="never-seen level" if key == m else "chance (0.5)")
        if key == m:
            ax.axhline(s.original["point"][m], color="r", ls=":", lw=1, label=s.original_label.split(" (")[0])
        ax.set_xticks(range(len(ok)), [r["label"] for r in ok.values()], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{what}: unlearned, then quantized")
        ax.legend(fontsize=7)
    for ax, key, what in ((axes[1][0], m, f"held-out forget {word}"),
                          (axes[1][1], "best_auc", "strongest AUC, held-out")):
        for r in ok.values():
            ys = [r["unlearned"]["held_out"][key]] + [r["attacks"][f"relearn_{k}"]["held_out"][key]
                                                     for k in steps if k]
            ax.plot([0] + [k for k in steps if k], ys, marker="o", label=r["label"])
        if key == m:
            ax.axhline(s.original["point"]["held_out"][m], color="r", ls=":", lw=1,
                       label=s.original_label.split(" (")[0])
            ax.axhline(s.original["point"]["unseen"][m], color="k", ls="--", lw=1, label="never-seen level")
        else:
            ax.axhline(0.5, color="k", ls="--", lw=1)
        ax.set_xlabel("relearning steps on the other half of the forget set")
        ax.set_title(f"{what} after relearning")
        ax.legend(fontsize=7)
    fig.suptitle(s.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=("tdec", "tofu"), default="tdec", help="tdec: memorized TDEC sequences "
                    "(this file); tofu: the 10-author TOFU of tofu_smollm2.py (robustness_tofu.py)")
    ap.add_argument("--seqs", type=int, default=8, help="forget-set size (and unseen-set size)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--forget-file", default="lm_extraction_32_0.csv")
    ap.add_argument("--unseen-file", default="lm_extraction_32_1.csv")
    ap.add_argument("--memorize-target", type=float, default=0.9)
    ap.add_argument("--memorize-epochs", type=int, default=30)
    ap.add_argument("--memorize-lr", type=float, default=2e-4)
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method of the setting)")
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for every LoRA method (TDEC: 1e-3; "
                    "TOFU: tofu_smollm2.py's 5e-4)")
    ap.add_argument("--full-lr", type=float, default=None, help="learning rate of full fine-tuning (GA full; "
                    "TDEC: 1e-3, as tdec_smollm2.py; TOFU: 1e-5, TOFU's own)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="TDEC: 2 (4 steps per epoch); TOFU: 4")
    ap.add_argument("--max-epochs", type=int, default=None, help="the epoch cap of the stop rule (TDEC: 10; "
                    "TOFU: 10)")
    ap.add_argument("--mixed-precision", default="auto", choices=PRECISIONS, help="training only: " + PRECISION_HELP)
    ap.add_argument("--relearn-steps", default="0,10,25,50", help="each point its own fine-tune (the issue's list)")
    ap.add_argument("--relearn-lr", type=float, default=1e-4)
    ap.add_argument("--relearn-batch", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tasks", default="wikitext,pile", help="utility tasks (loku.metrics.utility)")
    ap.add_argument("--limit", type=int, default=10, help="utility items per task")
    ap.add_argument("--data-dir", type=Path, default=DATA, help="data folder (tdec/, eval/, tofu/)")
    ap.add_argument("--tofu-out", type=Path, default=Path("runs/tofu_all"),
                    help="TOFU: tofu_smollm2.py's --out, where its target model is fine-tuned (or found; the "
                    "every-method TOFU runs' folder, so both share one target)")
    ap.add_argument("--tofu-flags", default="", help="TOFU: more tofu_smollm2.py flags for its target model "
                    "(a smoke test's: \"--qa-per-author 2 --ft-epochs 1\")")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="work folder (resumable; default runs/robustness_"
                    "smollm2_b2 or runs/robustness_tofu; runs/robustness_smollm2 holds the lr 5e-3 runs)")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true", help="rewrite the JSON, table and plot from the methods "
                    "finished in --work; run nothing")
    args = ap.parse_args()
    tofu = args.setting == "tofu"
    defaults = dict(lr=5e-4, full_lr=1e-5, batch_size=4, max_epochs=10, work=Path("runs/robustness_tofu"),
                    results=RESULTS.with_name("robustness_tofu.json")) if tofu else \
        dict(lr=1e-3, full_lr=1e-3, batch_size=2, max_epochs=10, work=Path("runs/robustness_smollm2_b2"),
             results=RESULTS)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.relearn_steps = sorted({int(k) for k in args.relearn_steps.split(",")})
    every = [m for m in METHODS if tofu or m != "idk_lora"]
    names = [m.strip() for m in (args.methods or ",".join(every)).split(",") if m.strip()]
    if unknown := [m for m in names if m not in every]:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {', '.join(every)}")
    if not (args.data_dir / args.setting).is_dir():
        raise SystemExit(f"needs the public data folder {args.data_dir}/{args.setting}: pass --data-dir")
    say(f"work dir {args.work}; {len(names)} methods: {', '.join(names)}; torch threads {torch.get_num_threads()}")
    if tofu:
        from robustness_tofu import TofuSetting   # the sibling imports this module

        s = TofuSetting(args)
    else:
        s = Setting(args)
    results = {}
    for name in names:
        if args.report_only and not (args.work / "methods" / f"{name}.json").is_file():
            continue
        results[name] = run_method(s, name)
        report(s, args, results)   # the table so far, after every method
    say(f"wrote {args.results}")


def report(s: Setting, args, results: dict) -> None:
    scale = s.describe() + f" {torch.get_num_threads()} CPU threads."
    md = table(s, results, args.relearn_steps)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, {"benchmark": f"robustness_{args.setting}", "scale": scale,
                              "date": time.strftime("%Y-%m-%d"),
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
