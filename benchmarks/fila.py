"""FILA and VILA on SmolLM2-135M with a TDEC-style forget set, in three resumable phases:

  memorize  full fine-tuning on the forget set until its MA >= --memorize-ma (SmolLM2 never memorized most
            TDEC texts; this makes the TOFU-style "model that knows the forget set"), saved in --work.
  cost      time and peak memory of Fisher statistics + factors (FILA, VILA) against one IHL epoch with plain
            LoRA on the same batches; each measured in a fresh subprocess (peak RSS from the kernel's
            high-water mark, reset after loading; torch.cuda.max_memory_allocated on a GPU).
  forget    epochs of IHL until the forget set's mean MA falls below the never-seen level (mean MA of the
            memorized model on held-out WikiText lines that no phase trains on), with plain LoRA, FILA and
            VILA at the same rank and learning rate.

Forget set: the first --sequences texts of TDEC lm_extraction_32_0.csv, each cut to --tokens SmolLM2 tokens.
Retain set: WikiText-2 test lines (no headings) cut the same way; the held-out lines follow them.
Prints markdown tables and writes --out (JSON). A killed run continues where it stopped (--fresh restarts).

    .venv/bin/python benchmarks/fila.py [--sequences 16 --tokens 100 --batch-size 4 --rank 8 --lr 5e-4 --max-epochs 20]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tdec"
HERE = Path(__file__).resolve().parent
INITS = {"default": "plain LoRA", "fila": "FILA", "vila": "VILA"}
COSTS = ("epoch", "fila", "vila", "fila-randomized")
# Settings that change the numbers: a --work directory holds the results of one such set only.
KEY_ARGS = ("model", "forget_file", "retain_file", "sequences", "tokens", "retain_lines", "heldout_lines", "rank",
            "alpha", "lr", "batch_size", "seed", "max_epochs", "memorize_ma", "memorize_lr", "memorize_epochs")


# ------------------------------------------------------------------------------------------------- data

def token_rows(texts: list[str], tokenizer, tokens: int, count: int, min_tokens: int) -> list[list[int]]:
    """The first `count` texts with >= min_tokens tokens, each cut to `tokens` and made to survive a
    decode/encode round trip (unlearning tokenizes the text again; MA is scored on those ids)."""
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:tokens]
        if len(ids) < min_tokens:
            continue
        ids = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"][:tokens]
        rows.append(ids)
        if len(rows) == count:
            return rows
    raise SystemExit(f"only {len(rows)} texts have {min_tokens}+ tokens; ask for fewer")


def load_sets(args, tokenizer) -> dict[str, list[list[int]]]:
    csv.field_size_limit(1 << 30)
    with open(args.forget_file, newline="", encoding="utf-8") as f:
        forget_texts = [r["text"] for r in csv.DictReader(f)]
    lines = [l.strip() for l in Path(args.retain_file).read_text(encoding="utf-8").splitlines()]
    lines = [" " + l for l in lines if l and not l.startswith("=")]   # WikiText lines start after a space
    wiki = token_rows(lines, tokenizer, args.tokens, args.retain_lines + args.heldout_lines, args.tokens)
    return {"forget": token_rows(forget_texts, tokenizer, args.tokens, args.sequences, args.tokens),
            "retain": wiki[:args.retain_lines], "heldout": wiki[args.retain_lines:]}


def texts_of(rows: list[list[int]], tokenizer) -> list[str]:
    return [tokenizer.decode(r) for r in rows]


def config(args, init: str, epochs: int):
    from loku import UnlearnConfig

    return UnlearnConfig(method="ihl", init=init, lora_rank=args.rank, lora_alpha=args.alpha, lr=args.lr,
                         epochs=epochs, batch_size=args.batch_size, max_length=args.tokens + 8, seed=args.seed)


# ------------------------------------------------------------------------------------------------- metrics

def mean_ma(model, rows: list[list[int]]) -> float:
    """Mean memorization accuracy, one row at a time (rows differ by a token or two in length)."""
    from loku.metrics.extraction import memorization_accuracy

    return sum(float(memorization_accuracy(model, torch.tensor([r]))[0]) for r in rows) / len(rows)


@torch.no_grad()
def perplexity(model, rows: list[list[int]]) -> float:
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for r in rows:
        ids = torch.tensor([r], device=device)
        nll += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * (len(r) - 1)
        n += len(r) - 1
    return float(torch.tensor(nll / n).exp())


# ------------------------------------------------------------------------------------------------- state

class State:
    """results.json of the --work directory: finished units, so a killed run skips them."""

    def __init__(self, work: Path, key: dict, fresh: bool):
        self.path = work / "state.json"
        if fresh and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"key": key}
        if self.data["key"] != key:
            changed = sorted(k for k in key if self.data["key"].get(k) != key[k])
            raise SystemExit(f"{work} holds a run with other settings ({', '.join(changed)}): pass --fresh "
                             f"or another --work")

    def get(self, *path):
        d = self.data
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d

    def put(self, value, *path) -> None:
        from loku.io import write_json

        d = self.data
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = value
        write_json(self.path, self.data)


# ------------------------------------------------------------------------------------------------- memorize

def memorize(args, state: State, work: Path) -> dict:
    from loku import load_model
    from loku.data.text import tokenize_examples
    from loku.finetune import finetune

    done = state.get("memorize")
    if done and (work / "memorized" / "model.safetensors").is_file():
        print(f"[memorize] done before: MA {done['ma_before']:.3f} -> {done['ma_after']:.3f} in "
              f"{done['epochs']} epochs", flush=True)
        return done
    model, tok = load_model(args.model)
    sets = load_sets(args, tok)
    before = mean_ma(model, sets["forget"])
    print(f"[memorize] forget set: {len(sets['forget'])} sequences x {args.tokens} tokens; MA before {before:.3f}; "
          f"full fine-tuning until MA >= {args.memorize_ma}", flush=True)

    def until_memorized(epoch, m):
        ma = mean_ma(m, sets["forget"])
        print(f"[memorize] epoch {epoch}: forget MA {ma:.3f}", flush=True)
        return {"ma": ma, "stop": ma >= args.memorize_ma}

    feats = tokenize_examples([{"text": t} for t in texts_of(sets["forget"], tok)], tok, args.tokens + 8, "forget")
    t0 = time.time()
    history = finetune(model, feats, tok.pad_token_id, epochs=args.memorize_epochs, lr=args.memorize_lr,
                       batch_size=args.batch_size, seed=args.seed, callback=until_memorized,
                       description="memorize (full fine-tuning)")
    after = history[-1]["ma"]
    if after < args.memorize_ma:
        print(f"[memorize] WARNING: MA {after:.3f} < {args.memorize_ma} after {len(history)} epochs; "
              f"raise --memorize-epochs or --memorize-lr", flush=True)
    model.save_pretrained(work / "memorized", safe_serialization=True)
    tok.save_pretrained(work / "memorized")
    result = {"ma_before": before, "ma_after": after, "epochs": len(history), "seconds": round(time.time() - t0, 1),
              "history": history}
    state.put(result, "memorize")
    return result


# ------------------------------------------------------------------------------------------------- cost

class PeakMemory:
    """Peak memory above the level at `start()`: CUDA allocator on a GPU, else resident set size (Linux's
    VmHWM, which is what getrusage's ru_maxrss reports, reset through /proc/self/clear_refs so the model
    load's transient peak does not hide the phase's; without /proc, the ru_maxrss delta)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        gc.collect()
        try:   # hand memory freed while loading back to the OS, so the phase cannot quietly reuse it
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
            self.base, self.how = self._status("VmRSS"), "VmHWM"
        except OSError:
            self.base, self.how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.how == "VmHWM":
            peak = self._status("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return round(max(peak - self.base, 0) / 2**20, 1)


def measure(args, kind: str) -> dict:
    """One cost measurement (run in its own process): `kind` is epoch, fila, vila or fila-randomized."""
    from loku import load_model, unlearn
    from loku.fila import apply_fila
    from loku.fisher import relative_importance, run_statistics
    from loku.lora import plan_lora, wrap_lora
    from loku.training.setup import run_batches

    cuda = torch.cuda.is_available()
    model, tok = load_model(args.model)
    sets = load_sets(args, tok)
    forget, retain = texts_of(sets["forget"], tok), texts_of(sets["retain"], tok)
    cfg = config(args, "default", 1)
    meter = PeakMemory(cuda)
    if cuda:   # weights on the device before the baseline: the peak is what the phase itself adds
        model = model.cuda()
    with torch.no_grad():   # safetensors weights are mapped lazily: page them all in before the baseline
        for p in model.parameters():
            p.sum()
    if kind == "epoch":
        meter.start()
        res = unlearn(cfg, model, tok, forget=forget, retain=retain, progress=False)
        return {"seconds": res.history[0]["seconds"], "peak_mib": meter.peak_mib(),
                "steps": math.ceil(len(forget) / cfg.batch_size)}
    # The batches unlearn's first epoch sees (what FILA's statistics are taken on).
    pairs = list(run_batches(cfg, [{"text": t} for t in forget], [{"text": t} for t in retain], tok, 1).epoch(0))
    model.config.use_cache = False
    plan = plan_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.alpha)
    meter.start()
    t0 = time.perf_counter()
    stats = run_statistics("vila" if kind == "vila" else "fila", model, pairs, plan, progress=False)
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    importance = relative_importance(stats, cfg.fisher_eps)
    del stats
    peft_model = wrap_lora(model, plan)
    apply_fila(peft_model, importance, svd="randomized" if kind.endswith("randomized") else "exact")
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"fisher_seconds": round(t1 - t0, 2), "factor_seconds": round(t2 - t1, 2),
            "seconds": round(t2 - t0, 2), "peak_mib": meter.peak_mib(), "modules": len(plan.module_names)}


def cost(args, state: State, work: Path) -> dict:
    for kind in COSTS:
        if state.get("cost", kind):
            print(f"[cost] {kind}: done before", flush=True)
            continue
        print(f"[cost] {kind}: measuring in a fresh process ...", flush=True)
        result_file = work / f"cost-{kind}.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--measure", kind, "--measure-out", str(result_file)]
        subprocess.run(cmd, check=True)
        r = json.loads(result_file.read_text())
        print(f"[cost] {kind}: {r['seconds']:.1f} s, peak +{r['peak_mib']:.0f} MiB", flush=True)
        state.put(r, "cost", kind)
    return state.get("cost")


# ------------------------------------------------------------------------------------------------- forget

def forget_phase(args, state: State, work: Path) -> dict:
    from loku import load_model, unlearn

    model, tok = load_model(str(work / "memorized"))
    sets = load_sets(args, tok)
    threshold = state.get("threshold")
    if threshold is None:
        threshold = {"ma": mean_ma(model, sets["heldout"]), "lines": len(sets["heldout"]),
                     "ma_forget": mean_ma(model, sets["forget"]), "ppl_heldout": perplexity(model, sets["heldout"])}
        state.put(threshold, "threshold")
    print(f"[forget] never-seen level: mean MA {threshold['ma']:.3f} on {threshold['lines']} held-out WikiText "
          f"lines (forget MA now {threshold['ma_forget']:.3f})", flush=True)
    del model
    forget, retain = texts_of(sets["forget"], tok), texts_of(sets["retain"], tok)
    for init, label in INITS.items():
        if state.get("forget", init):
            print(f"[forget] {label}: done before", flush=True)
            continue
        model, tok = load_model(str(work / "memorized"))
        curve = []

        def until_forgotten(epoch, m):
            ma = mean_ma(m, sets["forget"])
            curve.append(ma)
            print(f"[forget] {label} epoch {epoch}: forget MA {ma:.3f} (never-seen {threshold['ma']:.3f})",
                  flush=True)
            return {"forget_ma": ma, "stop": ma < threshold["ma"]}

        t0 = time.time()
        res = unlearn(config(args, init, args.max_epochs), model, tok, forget=forget, retain=retain,
                      callbacks=[until_forgotten])
        reached = curve[-1] < threshold["ma"]
        r = {"epochs_to_forget": len(curve) if reached else None, "epochs_run": len(curve), "forget_ma": curve,
             "heldout_ma": mean_ma(res.model, sets["heldout"]), "heldout_ppl": perplexity(res.model, sets["heldout"]),
             "seconds": round(time.time() - t0, 1), "epoch_seconds": [h["seconds"] for h in res.history]}
        state.put(r, "forget", init)
        del model, res
        gc.collect()
    return state.get("forget")


# ------------------------------------------------------------------------------------------------- report

def tables(args, data: dict) -> str:
    out = []
    c = data.get("cost")
    if c and all(k in c for k in COSTS):
        e, fila = c["epoch"], c["fila"]
        out += [f"Cost of the initialisation against one IHL epoch (plain LoRA r={args.rank}) on the same "
                f"{e['steps']} batches; peak = memory above the loaded model, each in a fresh process.", "",
                "| | Fisher s | factors s | total s | x one epoch | peak MiB | x FILA peak |", "|---|---|---|---|---|---|---|",
                f"| one IHL epoch | | | {e['seconds']:.1f} | 1.00 | {e['peak_mib']:.0f} | |"]
        for kind, label, time_target, mem_target in (("fila", "FILA", " (target <= 1.5)", ""),
                                                     ("vila", "VILA", "", " (target <= 0.5)"),
                                                     ("fila-randomized", "FILA, randomized SVD", "", "")):
            r = c[kind]
            out.append(f"| {label} | {r['fisher_seconds']:.1f} | {r['factor_seconds']:.1f} | {r['seconds']:.1f} | "
                       f"{r['seconds'] / e['seconds']:.2f}{time_target} | {r['peak_mib']:.0f} | "
                       f"{r['peak_mib'] / max(fila['peak_mib'], 1e-9):.2f}{mem_target} |")
        out.append("")
        if e["steps"] < 2:
            out += [f"Note: VILA's statistics are variances over batches; with {e['steps']} batch per side they "
                    "are zero up to rounding, so its factors are meaningless at this scale.", ""]
    f, th = data.get("forget"), data.get("threshold")
    if f and th:
        m = data.get("memorize", {})
        out += [f"Epochs of IHL (r={args.rank}, lr={args.lr:g}, batch {args.batch_size}) until the forget set's mean "
                f"MA < {th['ma']:.3f}, the memorized model's mean MA on {th['lines']} held-out WikiText lines "
                f"(forget MA at the start {th['ma_forget']:.3f}, after memorizing from {m.get('ma_before', float('nan')):.3f}; "
                f"held-out perplexity at the start {th['ppl_heldout']:.1f}).", "",
                "| LoRA init | epochs to forget | forget MA per epoch | held-out MA after | held-out ppl after | seconds |",
                "|---|---|---|---|---|---|"]
        for init, label in INITS.items():
            if init in f:
                r = f[init]
                reached = r["epochs_to_forget"] if r["epochs_to_forget"] is not None else f"> {r['epochs_run']}"
                if r["heldout_ppl"] > 2 * th["ppl_heldout"]:   # forgetting by breaking the model does not count
                    reached = f"{reached} (model broken)"
                curve = " ".join(f"{x:.2f}" for x in r["forget_ma"])
                out.append(f"| {label} | {reached} | {curve} | {r['heldout_ma']:.3f} | {r['heldout_ppl']:.1f} | "
                           f"{r['seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--forget-file", default=str(DATA / "forget" / "lm_extraction_32_0.csv"))
    ap.add_argument("--retain-file", default=str(DATA / "retain" / "wikitext2_test.raw"))
    ap.add_argument("--sequences", type=int, default=16, help="forget sequences (TDEC texts)")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per sequence (forget, retain, held-out)")
    ap.add_argument("--retain-lines", type=int, default=64)
    ap.add_argument("--heldout-lines", type=int, default=32, help="WikiText lines for the never-seen MA level")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4, help="4: 4 batches per epoch, so VILA has a variance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--memorize-ma", type=float, default=0.9)
    ap.add_argument("--memorize-lr", type=float, default=1e-4)
    ap.add_argument("--memorize-epochs", type=int, default=30)
    ap.add_argument("--phases", default="memorize,cost,forget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench-fila", help="resumable state and the memorized model")
    ap.add_argument("--fresh", action="store_true", help="discard --work and start again")
    ap.add_argument("--redo", default="", help="comma list of phases whose stored results to drop and run again")
    ap.add_argument("--out", default=str(HERE / "results" / "fila.json"))
    ap.add_argument("--measure", choices=COSTS, help=argparse.SUPPRESS)       # internal: one cost subprocess
    ap.add_argument("--measure-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.disable_progress_bar()   # one weight-loading bar per model load would drown the progress lines
    if args.measure:
        from loku.io import write_json

        write_json(args.measure_out, measure(args, args.measure))
        return
    work = Path(args.work)
    key = {k: getattr(args, k) for k in KEY_ARGS}
    state = State(work, key, args.fresh)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - {"memorize", "cost", "forget"}
    if unknown:
        raise SystemExit(f"unknown phase(s) {sorted(unknown)}: choose from memorize, cost, forget")
    for phase in (p.strip() for p in args.redo.split(",") if p.strip()):
        for key in {"forget": ("forget", "threshold")}.get(phase, (phase,)):
            state.data.pop(key, None)
    sys.argv = [a for a in sys.argv if a != "--fresh"]   # the cost subprocesses must not wipe --work
    t0 = time.time()
    if "memorize" in phases or "forget" in phases:
        memorize(args, state, work)
    if "cost" in phases:
        cost(args, state, work)
    if "forget" in phases:
        forget_phase(args, state, work)
    data = {k: v for k, v in state.data.items() if k != "key"}
    table = tables(args, data)
    print("\n" + table)
    result = {"args": key, **data, "table": table, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(),
              "device": "cuda" if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d"),
              "seconds_this_call": round(time.time() - t0, 1)}
    from loku.io import write_json

    write_json(args.out, result)
    print(f"\nwrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
