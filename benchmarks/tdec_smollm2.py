"""TDEC on the embedded SmolLM2-135M: which method forgets fastest while keeping the model usable?

The paper's protocol (Jang et al. 2023; LoKU Table 1) assumes a model that can emit its forget set verbatim:
GPT-Neo was trained on the Pile, where the TDEC sequences come from. SmolLM2 was not, so:

1. survey   - how much of the TDEC texts SmolLM2 has memorized anyway (MA of every sequence of the five
              32-sequence files, against WikiText); it knows some license headers nearly by heart.
2. memorize - the forget set (first --seqs sequences of --forget-file, cut to --tokens SmolLM2 tokens) is
              fine-tuned into the model until its mean MA reaches --memorize-target (as TOFU does with its
              fictitious authors), unless the model already knows it that well.
3. thresholds - the memorized model's mean EL10 and MA on --seqs sequences of another, unseen TDEC file.
4. before   - utility of the memorized model (reasoning accuracy, perplexity; first --limit items per task),
              and PDU's retain-loss budget (its WikiText-2 cross-entropy).
5. methods  - every method of --methods (default all), each from the memorized model, at one rank and
              learning rate, with the stop rule (stop after the first epoch where the forget set's mean EL10
              and MA are both below the thresholds, at most --max-epochs; ES, the extraction strength, is
              measured beside them); then utility. Labels as `loku tofu unlearn --methods` reads them: a loku
              method name (LoRA, default init), `ihl+fila`, `ga+full` / `npo+full` (full fine-tuning). idk and
              dpo refuse the second half of each sequence (loku's built-in refusals). Not run, with the reason
              in the JSON: lunar without --lunar-harmful FILE, lmcleaner (no recorded trajectory of phase 2).

Every phase and every method writes its result under --work (a method: WORK/methods/<label>/report.json, or
failed.json when it failed, e.g. diverged) and is skipped when that result exists, so a killed run resumes
and runs with different --methods share one --work (one at a time, with the same other flags). Each run
prints the markdown table and writes --results from every method finished in --work; `--report-only` only
that.

The README table's scale, every method, split into runs that each fit 2 CPU cores in under 90 minutes
(estimated by `benchmarks/split_plan.py tdec --smoke TOY/results.json`: the 2026-11-28 timings of the six
methods it had, the others scaled per epoch from the toy run below and assumed to run all 8 epochs; the first
run also does phases 1-4, ~8 min):

    export OMP_NUM_THREADS=2
    TDEC="--seqs 8 --tokens 100 --max-epochs 8 --limit 5 --tasks piqa,arc_easy,copa,pile,wikitext \\
          --work runs/tdec_all --results benchmarks/results/tdec_smollm2_all.json"
    .venv/bin/python benchmarks/tdec_smollm2.py $TDEC --methods ga,npo,rmu,t3,npo+full               # ~62 min (+ phases 1-4)
    .venv/bin/python benchmarks/tdec_smollm2.py $TDEC --methods gd,undial,ceu,sibl                   # ~63 min
    .venv/bin/python benchmarks/tdec_smollm2.py $TDEC --methods kl,simnpo,dpo,wga,gru                # ~61 min
    .venv/bin/python benchmarks/tdec_smollm2.py $TDEC --methods idk,ihl,satimp,pdu,ihl+fila,ga+full  # ~64 min
    .venv/bin/python benchmarks/tdec_smollm2.py $TDEC --report-only

Most of a method's time is the per-epoch EL10 of the forget set (~20 s while it is memorized, ~2 min once it is
forgotten), then ~15 s of utility. The toy run below checks the plumbing (every method, ~25 min on 1 thread
beside other jobs). To rerun methods with another --lr, delete WORK/methods (memorization, thresholds and the
reference utility are kept).
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tdec_smollm2.py --seqs 4 --tokens 48 --max-epochs 2 \\
        --memorize-epochs 2 --survey-rows 4 --limit 2 --work /tmp/tdec_toy --results /tmp/tdec_toy/results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from loku import UnlearnConfig, load_model
from loku.data.text import tokenize_examples
from loku.errors import LokuError
from loku.finetune import finetune
from loku.config_base import PRECISION_HELP, PRECISIONS
from loku.io import write_json
from loku.metrics.extraction import memorization_accuracy
from loku.methods import METHODS
from loku.metrics.utility import evaluate_utility
from loku.tdec import (TDEC_FILES, TdecConfig, compute_thresholds, load_sequences, markdown_table, retain_examples,
                       run_tdec, table_row, tokenize_sequences)
from loku.tofu.run import parse_method
from loku.tofu.scores import answer_scores
from method_labels import add_method_flags, labels_for, not_applicable

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the development data folder (a dev tool)
RESULTS = Path(__file__).resolve().parent / "results" / "tdec_smollm2.json"
PDU_RETAIN_ROWS = 64   # retain examples PDU's budget is measured on
T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:7.0f} s] {msg}", flush=True)


def done(path: Path) -> dict | None:
    if path.is_file():
        say(f"skip: {path} exists")
        return json.loads(path.read_text())
    return None


def overrides(label: str) -> dict:
    """UnlearnConfig fields of a --methods label: NAME (LoRA, default init), NAME+INIT, NAME+full."""
    spec = parse_method(label)
    if not spec.lora:
        return dict(method=spec.method, lora=False)
    return dict(method=spec.method, init=spec.init or "default")


def pdu_budget(args, model, tokenizer) -> float:
    """PDU's retain-loss budget (PDU.yaml leaves it to the user: "e.g. the start model's retain loss"): the
    memorized model's token-mean cross-entropy on the first PDU_RETAIN_ROWS retain (WikiText-2) examples,
    kept in WORK/pdu_retain_loss_eps.json."""
    path = args.work / "pdu_retain_loss_eps.json"
    if (cached := done(path)) is not None:
        return cached["pdu_retain_loss_eps"]
    rows = retain_examples(args.data_dir)[:PDU_RETAIN_ROWS]
    scores = answer_scores(model, tokenize_examples(rows, tokenizer, args.tokens + 1), tokenizer.pad_token_id)
    eps = sum(scores["loss"]) / sum(scores["tokens"])
    write_json(path, {"pdu_retain_loss_eps": eps, "rows": len(rows),
                      "what": "memorized model's token-mean cross-entropy on the first retain examples"})
    say(f"   PDU retain-loss budget: the memorized model's retain cross-entropy {eps:.4f}")
    return eps


@torch.no_grad()
def ma_of(model, seqs) -> list[float]:
    """MA of every sequence, one forward pass each (cheap: the survey needs no EL)."""
    return [float(memorization_accuracy(model, torch.tensor([x]))[0]) for x in seqs.ids]


def survey(args, tdec: Path, model, tokenizer) -> dict:
    """Phase 1: the base model's MA on the TDEC files and on WikiText."""
    path = args.work / "survey.json"
    if (cached := done(path)) is not None:
        return cached
    say(f"1. survey: MA of base SmolLM2 on {args.survey_rows} sequences x {args.tokens} tokens of each TDEC file")
    files = {}
    for name in TDEC_FILES:
        seqs = load_sequences(tdec / "forget" / name, tokenizer, max_tokens=args.tokens, limit=args.survey_rows)
        ma = ma_of(model, seqs)
        files[name] = {"ma": ma, "ma_mean": sum(ma) / len(ma), "memorized_over_0.7": sum(m > 0.7 for m in ma)}
        say(f"   {name}: mean MA {files[name]['ma_mean']:.3f}, {files[name]['memorized_over_0.7']} of {len(ma)} "
            f"above 0.7 (max {max(ma):.2f})")
    wiki = tokenize_sequences([e["text"] for e in retain_examples(args.data_dir)], tokenizer, max_tokens=args.tokens,
                              path="WikiText-2 test", limit=args.survey_rows, skip_short=True, min_tokens=args.tokens)
    wiki_ma = ma_of(model, wiki)
    all_ma = [m for f in files.values() for m in f["ma"]]
    result = {"tokens": args.tokens, "rows_per_file": args.survey_rows, "files": files,
              "tdec_ma_mean": sum(all_ma) / len(all_ma), "wikitext_ma_mean": sum(wiki_ma) / len(wiki_ma),
              "wikitext_ma": wiki_ma}
    say(f"   all TDEC: mean MA {result['tdec_ma_mean']:.3f} over {len(all_ma)}; "
        f"WikiText {result['wikitext_ma_mean']:.3f}")
    write_json(path, result)
    return result


def memorize(args, forget_path: Path, model, tokenizer) -> dict:
    """Phase 2: fine-tune the forget set into the model until its mean MA reaches the target; save the model."""
    path, model_dir = args.work / "memorize.json", args.work / "memorized"
    if (cached := done(path)) is not None:
        return cached
    seqs = load_sequences(forget_path, tokenizer, max_tokens=args.tokens, limit=args.seqs)
    base = sum(ma_of(model, seqs)) / len(seqs)
    say(f"2. memorize: base MA on the forget set {base:.3f} (target {args.memorize_target})")
    history, t0 = [], time.time()
    if base < args.memorize_target:
        def reached(epoch, m):
            ma = sum(ma_of(m, seqs)) / len(seqs)
            say(f"   epoch {epoch}: forget-set MA {ma:.3f}")
            return {"ma": ma, "stop": ma >= args.memorize_target}

        feats = tokenize_examples([{"text": t} for t in seqs.texts(tokenizer)], tokenizer, args.tokens + 1)
        history = finetune(model, feats, tokenizer.pad_token_id, epochs=args.memorize_epochs, lr=args.memorize_lr,
                           batch_size=min(8, args.seqs), seed=args.seed, mixed_precision=args.mixed_precision,
                           callback=reached, description="memorize")
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    final = history[-1]["ma"] if history else base
    result = {"forget_file": str(forget_path), "rows": seqs.rows, "tokens": [len(x) for x in seqs.ids],
              "base_ma": base, "final_ma": final, "finetuned": bool(history), "epochs": len(history),
              "lr": args.memorize_lr, "history": history, "seconds": round(time.time() - t0, 1),
              "model_dir": str(model_dir) if history else "smollm2-135m"}
    if final < args.memorize_target:
        say(f"   warning: forget-set MA {final:.3f} is below the target after {len(history)} epochs")
    write_json(path, result)
    return result


def thresholds(args, tdec: Path, model, tokenizer) -> dict:
    """Phase 3: the memorized model's mean EL10/MA on sequences it never saw (another TDEC file)."""
    path = args.work / "thresholds.json"
    if (cached := done(path)) is not None:
        return cached
    heldout = tdec / "forget" / args.threshold_file
    seqs = load_sequences(heldout, tokenizer, max_tokens=args.tokens, limit=args.seqs)
    say(f"3. thresholds: EL10/MA of the memorized model on {len(seqs)} unseen sequences of {args.threshold_file}")
    out = compute_thresholds(model, seqs, source=f"memorized SmolLM2 on {len(seqs)} sequences of {args.threshold_file}")
    th = out["thresholds"]
    result = {"el": th.el, "ma": th.ma, "n": th.n, "source": th.source, "el_items": out["el"], "ma_items": out["ma"],
              "seconds": out["seconds"]}
    say(f"   EL10 {100 * th.el:.2f} %, MA {100 * th.ma:.2f} % ({out['seconds']:.0f} s)")
    write_json(path, result)
    return result


def before_utility(args, model, tokenizer) -> dict:
    """Phase 4: utility of the memorized model, the reference for every method."""
    path = args.work / "before_utility.json"
    if (cached := done(path)) is not None:
        return cached
    say(f"4. utility of the memorized model ({args.tasks}, first {args.limit} items per task)")
    t0 = time.time()
    result = evaluate_utility(model, tokenizer, args.tasks, limit=args.limit, data_dir=args.data_dir,
                              log=lambda s: say(f"   {s}"))
    result["seconds"] = round(time.time() - t0, 1)
    write_json(path, result)
    return result


def run_method(args, name: str, mem: dict, th: dict, forget_path: Path, pdu_eps: float) -> dict:
    """Phase 5: one method from a fresh copy of the memorized model, via `loku.tdec.run_tdec`; its report
    (or its failure) is kept in WORK/methods/<label>/."""
    out = args.work / "methods" / name
    for kept in ("report.json", "failed.json"):
        if (cached := done(out / kept)) is not None:
            return cached
    label = name
    say(f"5. {label}: unlearn (lr {args.lr}, rank {args.rank}, at most {args.max_epochs} epochs), then utility")
    model, tokenizer = load_model(mem["model_dir"])
    # idk/dpo train on (first half, refusal) pairs in the chat format: its template and the refusal need room
    # beyond the sequence's own tokens; the other methods train on exactly the measured tokens
    refusing = METHODS[parse_method(name).method].forget_answers in ("idk", "idk-pair")
    ucfg = UnlearnConfig(lora_rank=args.rank, epochs=args.max_epochs, lr=args.lr, batch_size=args.batch_size,
                         max_length=2 * args.tokens + 128 if refusing else args.tokens + 1, seed=args.seed,
                         mixed_precision=args.mixed_precision, pdu_retain_loss_eps=pdu_eps,
                         lunar_harmful=str(args.lunar_harmful) if args.lunar_harmful else None, **overrides(name))
    cfg = TdecConfig(forget=str(forget_path), out=str(out), model=mem["model_dir"], rows=args.seqs,
                     max_tokens=args.tokens, el_threshold=th["el"], ma_threshold=th["ma"], tasks=args.tasks,
                     limit=args.limit, data_dir=str(args.data_dir), save=False, overwrite=True,
                     full_batch=args.full_batch, unlearn=ucfg)
    try:
        return run_tdec(cfg, model, tokenizer, log=lambda s: say(f"   {s}"))
    except LokuError as e:  # e.g. GA's loss diverging: a result of the comparison, not a crash
        say(f"   {label} failed: {e}")
        failed = {"label": label, "error": str(e)}
        write_json(out / "failed.json", failed)
        return failed


def finished(args, labels: list[str]) -> dict:
    """Every method report kept in WORK/methods/, in the order of `labels` (others after them)."""
    found = {p.parent.name: p for p in sorted((args.work / "methods").glob("*/*.json"))
             if p.name in ("report.json", "failed.json")}
    order = [l for l in labels if l in found] + [l for l in found if l not in labels]
    return {name: json.loads(found[name].read_text()) for name in order}


def summarize(args, surveyed, mem, th, before, reports, skipped: dict[str, str]) -> dict:
    rows = [table_row("memorized model (before)", el=None, ma=mem["final_ma"], utility=before["summary"])]
    methods = {}
    for name, rep in reports.items():
        label = rep.get("label", name)
        if "error" in rep:
            rows.append(table_row(f"{label} (failed)"))
            methods[name] = {"label": label, "error": rep["error"]}
            continue
        u = rep["utility"]["summary"] if rep.get("utility") else None
        rows.append(table_row(label, epochs=rep["epochs_to_forget"], max_epochs=rep["max_epochs"],
                              el=rep["final"]["el_mean"], ma=rep["final"]["ma_mean"], es=rep["final"].get("es_mean"),
                              utility=u, seconds=rep["seconds"]["unlearn"]))
        curve = [{k: e.get(k) for k in ("epoch", "el_mean", "ma_mean", "es_mean", "forgotten")} for e in rep["epochs"]]
        methods[name] = {"label": label, "init": rep["init"], "epochs_to_forget": rep["epochs_to_forget"],
                         "epochs_run": rep["epochs_run"], "final": rep["final"], "utility": u, "curve": curve,
                         "initial": {k: rep["initial"].get(k) for k in ("el_mean", "ma_mean", "es_mean")},
                         "seconds": rep["seconds"]}
    first = next((r for r in reports.values() if "error" not in r), None)
    if first is not None:
        rows[0]["el"] = first["initial"]["el_mean"]
        rows[0]["ma"] = first["initial"]["ma_mean"]
        rows[0]["es"] = first["initial"].get("es_mean")
    scale = (f"SmolLM2-135M (embedded GGUF, float32), forget set: first {args.seqs} sequences of {args.forget_file} "
             f"cut to {args.tokens} SmolLM2 tokens, memorized by fine-tuning ({mem['epochs']} epochs, MA "
             f"{mem['base_ma']:.2f} -> {mem['final_ma']:.2f}); thresholds from {args.seqs} unseen sequences of "
             f"{args.threshold_file}: EL10 {100 * th['el']:.2f} %, MA {100 * th['ma']:.2f} %; LoRA r={args.rank}, "
             f"lr {args.lr}, batch {args.batch_size}, at most {args.max_epochs} epochs; utility: "
             f"{args.tasks}, first {args.limit} items per task; {torch.get_num_threads()} CPU threads. "
             "Seconds: unlearning incl. the per-epoch EL10/MA/ES evaluation."
             + "".join(f" Not run: {label} ({why})." for label, why in skipped.items()))
    table = markdown_table(rows, seconds=True)
    return {"table": table, "scale": scale, "result": {
        "benchmark": "tdec_smollm2", "scale": scale, "args": {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()},
        "survey": {k: v for k, v in surveyed.items() if k != "files"} | {
            "files": {f: {k: v for k, v in d.items() if k != "ma"} for f, d in surveyed["files"].items()}},
        "memorize": {k: v for k, v in mem.items() if k != "history"}, "thresholds": th,
        "before_utility": before["summary"], "methods": methods, "not_applicable": skipped, "table": table,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "total_seconds": round(time.time() - T0, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=16, help="forget-set size (and threshold-set size)")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per sequence")
    ap.add_argument("--forget-file", default="lm_extraction_32_0.csv")
    ap.add_argument("--threshold-file", default="lm_extraction_32_1.csv")
    ap.add_argument("--survey-rows", type=int, default=32, help="sequences per TDEC file in the survey")
    ap.add_argument("--memorize-target", type=float, default=0.9)
    ap.add_argument("--memorize-epochs", type=int, default=30)
    ap.add_argument("--memorize-lr", type=float, default=2e-4)
    add_method_flags(ap, "table and JSON from the methods finished in --work")
    ap.add_argument("--lr", type=float, default=1e-3, help="one learning rate for every method")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4, help="4 steps an epoch at 16 sequences: the per-epoch "
                    "EL10 evaluation costs more than a step, so several steps an epoch forget for less")
    ap.add_argument("--full-batch", action=argparse.BooleanOptionalAction, default=False,
                    help="one optimizer step per epoch over the whole forget set (Jang et al.; loku tdec run's "
                         "default); off by default here: the README table steps every --batch-size sequences")
    ap.add_argument("--max-epochs", type=int, default=10)
    ap.add_argument("--mixed-precision", default="auto", choices=PRECISIONS, help="training only: " + PRECISION_HELP)
    ap.add_argument("--tasks", default="reasoning,ppl")
    ap.add_argument("--limit", type=int, default=10, help="utility items per task")
    ap.add_argument("--data-dir", type=Path, default=DATA, help="data folder (tdec/, eval/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("runs/tdec_smollm2"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    try:
        names = labels_for(args.methods)
    except LokuError as e:
        raise SystemExit(str(e))
    if args.lunar_harmful and not args.lunar_harmful.is_file():
        raise SystemExit(f"--lunar-harmful {args.lunar_harmful} does not exist: pass a file of refusal prompts")
    every = labels_for("all")
    skipped = not_applicable(every, args.lunar_harmful, "tdec")
    if args.report_only:
        kept = [args.work / f for f in ("survey.json", "memorize.json", "thresholds.json", "before_utility.json")]
        if missing := [str(p) for p in kept if not p.is_file()]:
            raise SystemExit(f"--report-only: {', '.join(missing)} missing: run the benchmark first")
        surveyed, mem, th, before = (json.loads(p.read_text()) for p in kept)
        summary = summarize(args, surveyed, mem, th, before, finished(args, every), skipped)
        print("\n" + summary["scale"] + "\n\n" + summary["table"], flush=True)
        write_json(args.results, summary["result"])
        say(f"wrote {args.results}")
        return
    for label in [n for n in names if n in skipped]:
        say(f"not run: {label}: {skipped[label]}")
    names = [n for n in names if n not in skipped]
    tdec = args.data_dir / "tdec"
    if not tdec.is_dir():
        raise SystemExit(f"needs the public data folder {tdec}: pass --data-dir (../shared/data beside the checkout)")
    args.work.mkdir(parents=True, exist_ok=True)
    forget_path = tdec / "forget" / args.forget_file
    say(f"work dir {args.work}; {len(names)} methods: {', '.join(names)}; torch threads {torch.get_num_threads()}")

    if (args.work / "survey.json").is_file() and (args.work / "memorize.json").is_file():
        surveyed, mem = done(args.work / "survey.json"), done(args.work / "memorize.json")
    else:
        model, tokenizer = load_model("smollm2-135m")
        surveyed = survey(args, tdec, model, tokenizer)
        mem = memorize(args, forget_path, model, tokenizer)
        del model
    kept = [args.work / f for f in ("thresholds.json", "before_utility.json", "pdu_retain_loss_eps.json")]
    if all(p.is_file() for p in kept):
        th, before = done(kept[0]), done(kept[1])
        pdu_eps = done(kept[2])["pdu_retain_loss_eps"]
    else:
        model, tokenizer = load_model(mem["model_dir"])
        th = thresholds(args, tdec, model, tokenizer)
        before = before_utility(args, model, tokenizer)
        pdu_eps = pdu_budget(args, model, tokenizer)
        del model
    for name in names:
        run_method(args, name, mem, th, forget_path, pdu_eps)
    summary = summarize(args, surveyed, mem, th, before, finished(args, every), skipped)
    print("\n" + summary["scale"] + "\n\n" + summary["table"], flush=True)
    write_json(args.results, summary["result"])
    say(f"wrote {args.results}")


if __name__ == "__main__":
    main()
