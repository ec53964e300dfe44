"""`loku audit`: is the forget set really gone? The model against never-seen text, before and after attacks.

Order of work: every input is checked (files, set kinds, the adapter against the model, the tokenizers of the
original and reference models) before anything is written; then the unlearned model (and the original) is
measured, then each attack. Each finished part is saved under OUT/parts/ as it completes, so `--resume`
continues an interrupted audit where it stopped (same settings, checked). audit.json, audit.md, audit.png
and manifest.json are written at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from .. import io
from ..errors import LokuError
from .config import AuditConfig
from .inputs import apply_adapter, check_adapter_folder, check_same_tokenizer
from .measure import Settings, compare, measure_model
from .sets import EvalSet, build_set, kind_of, read_examples
from .verdict import recovery

PARTS = "parts"


# ---- resumable parts -----------------------------------------------------------------------------------------

class Parts:
    """Results saved one file each under OUT/parts as they finish; reused by --resume when the settings match."""

    def __init__(self, out: Path, main: bool):
        self.dir, self.main = out / PARTS, main

    def get(self, key: str, compute: Callable[[], dict], log) -> dict:
        path = self.dir / f"{key}.json"
        if path.is_file():
            log(f"  {key}: reused from {path}")
            return json.loads(path.read_text())
        t0 = time.time()
        value = compute()
        value["seconds_total"] = round(time.time() - t0, 1)
        if self.main:
            io.write_json(path, value)
        log(f"  {key}: {value['seconds_total']:.0f} s")
        return value


def _start(cfg: AuditConfig, main: bool) -> Path:
    """The output directory: checked (nothing created) unless resuming, where its saved settings must match."""
    out = Path(cfg.out)
    if not cfg.resume:
        return io.check_out_dir(out, cfg.overwrite)
    saved = out / PARTS / "config.json"
    if not saved.is_file():
        raise LokuError(f"--resume: {out} holds no interrupted audit ({saved} is missing): run without --resume")
    if json.loads(saved.read_text()) != json.loads(json.dumps(cfg.fingerprint())):
        raise LokuError(f"--resume: the audit in {out} was started with other settings ({saved}): rerun with the "
                        "same ones, or use a new --out")
    return out


# ---- summaries -----------------------------------------------------------------------------------------------

def summary(comparison: dict) -> dict:
    """The forget-side numbers of a comparison: ma/el/es/em means and auc_<attack>."""
    out = {m: line["forget"] for m, line in comparison["metrics"].items()}
    out.update({f"auc_{a}": line["auc"] for a, line in comparison["auc"].items()})
    return out


def recoveries(attacked: dict, unlearned: dict, original: dict | None) -> dict | None:
    if original is None:
        return None
    a, u, o = summary(attacked), summary(unlearned), summary(original)
    return {k: recovery(a[k], u.get(k), o.get(k)) for k in a}


def subset(measured: dict, indices: list[int]) -> dict:
    per = {m: [v[i] for i in indices] for m, v in measured["per_example"].items()}
    return {"per_example": per, "mean": {m: sum(v) / len(v) for m, v in per.items()}}


# ---- the audit -----------------------------------------------------------------------------------------------

def run_audit(cfg: AuditConfig, *, model=None, tokenizer=None, original=None, reference=None,
              log: Callable[[str], None] = print) -> dict:
    """Run the audit `cfg` describes; returns the report (also written to cfg.out). In-memory models may be
    given instead of the paths (`model`, `tokenizer`, `original`, `reference`); they are never modified."""
    from ..distributed import barrier, is_main

    t_start = time.time()
    main = is_main()
    out = _start(cfg, main)

    # -- data, then tokenizers: every input error before a weight loads or a file is written
    forget_ex = read_examples(cfg.forget, cfg.text_column, "forget")
    unseen_ex = read_examples(cfg.unseen, cfg.text_column, "unseen")
    kind = kind_of(forget_ex)
    if kind_of(unseen_ex) != kind:
        raise LokuError(f"--forget {cfg.forget} holds {_kind_words(kind)} but --unseen {cfg.unseen} holds "
                        f"{_kind_words(kind_of(unseen_ex))}: the never-seen set must be of the same kind")
    retain_ex = read_examples(cfg.retain, cfg.text_column, "retain") if cfg.retain else None
    related_ex = read_examples(cfg.relearn_data, cfg.text_column, "relearn-data") \
        if cfg.relearn_data and "relearn" in cfg.attacks else None
    paraphrased = _paraphrased_questions(cfg, kind)
    if cfg.adapter:
        check_adapter_folder(cfg.adapter)
    if tokenizer is None:
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    for what, name, given in (("original", cfg.original, original), ("reference", cfg.reference, reference)):
        if name and given is None:
            from ..models import load_tokenizer

            check_same_tokenizer(tokenizer, load_tokenizer(name, trust_remote_code=cfg.trust_remote_code), what,
                                 name, cfg.model)
    sets = {"forget": build_set("forget", cfg.forget, forget_ex, tokenizer, max_tokens=cfg.max_tokens, n=cfg.n,
                                limit=cfg.rows, prompt_format=cfg.prompt_format),
            "unseen": build_set("unseen", cfg.unseen, unseen_ex, tokenizer, max_tokens=cfg.max_tokens, n=cfg.n,
                                limit=cfg.rows, prompt_format=cfg.prompt_format)}
    if retain_ex is not None:
        sets["retain"] = build_set("retain", cfg.retain, retain_ex, tokenizer, max_tokens=cfg.max_tokens, n=cfg.n,
                                   limit=cfg.rows, prompt_format=cfg.prompt_format)
    if "relearn" in cfg.attacks and len(sets["forget"]) < 2 and related_ex is None:
        raise LokuError("relearning on part of the forget set needs at least 2 forget examples: give more, or "
                        "pass --relearn-data FILE (related text) to relearn on")

    # -- models
    given = model is not None
    if not given:
        from ..models import load_model

        log(f"loading {cfg.model}")
        model, _ = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    if cfg.adapter:   # PEFT injects its layers into the model it wraps: never into the caller's
        model = apply_adapter(copy.deepcopy(model) if given else model, cfg.adapter, cfg.model)
    original = _load_other(original, cfg.original, cfg, log)
    reference = _load_other(reference, cfg.reference, cfg, log)
    from ..attacks.quantize import merged_copy

    # what is measured and relearned (every attack copies it again); `model` keeps any adapter for "base"
    plain = merged_copy(model).eval() if cfg.adapter or given else model.eval()

    barrier()   # every process has checked --out before the main one creates it
    if main and not cfg.resume:
        io.start_out_dir(out, cfg.overwrite)
        io.write_json(out / PARTS / "config.json", cfg.fingerprint())
    barrier()
    parts = Parts(out, main)

    st = Settings(n=cfg.n, k=cfg.k, attacks=_membership_attacks(reference is not None), el=cfg.el != "none",
                  batch_size=cfg.batch_size, decode_batch_size=cfg.decode_batch_size,
                  pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                  bootstrap=cfg.bootstrap, confidence=cfg.confidence, tolerance=cfg.tolerance, seed=cfg.seed)
    log(f"audit of {_describe(cfg)}: forget {len(sets['forget'])} {_kind_words(kind)}, unseen "
        f"{len(sets['unseen'])}" + (f", retain {len(sets['retain'])}" if "retain" in sets else "")
        + f"; membership attacks {', '.join(st.attacks)}")

    ref_losses = _reference_losses(reference, sets, st) if reference is not None else None
    report = {"config": cfg.to_dict(), "sets": {name: s.describe() for name, s in sets.items()},
              "settings": {"membership_attacks": list(st.attacks), "n": st.n, "k": st.k, "el": cfg.el,
                           "bootstrap": st.bootstrap, "confidence": st.confidence, "tolerance": st.tolerance}}
    log("measuring the unlearned model")
    unlearned = parts.get("unlearned", lambda: measure_model(plain, sets, st, ref_losses), log)
    orig = None
    if original is not None:
        log("measuring the original model")
        orig = parts.get("original", lambda: measure_model(original, sets, st, ref_losses), log)
    report["unlearned"], report["original"] = unlearned, orig
    base = {"unlearned": unlearned["compare"]["forget"], "original": orig and orig["compare"]["forget"]}
    attacks = report["attacks"] = {}
    st = dataclasses.replace(st, el=cfg.el == "all")   # attacked models: EL_n only with --el all

    if "quantize" in cfg.attacks:
        attacks["quantize"] = _quantize(cfg, model, sets, st, ref_losses, base, parts, log)
    if "paraphrase" in cfg.attacks:
        attacks["paraphrase"] = _paraphrase(cfg, kind, plain, original, reference, tokenizer, sets, st, paraphrased,
                                            unlearned, orig, parts, log)
    if "relearn" in cfg.attacks:
        attacks["relearn"] = _relearn(cfg, plain, tokenizer, sets, st, ref_losses, related_ex, kind, unlearned,
                                      orig, parts, log)

    from .report import audit_markdown, plot_audit, verdict_lines

    report["verdicts"] = verdict_lines(report)
    report["seconds"] = round(time.time() - t_start, 1)
    table = audit_markdown(report)
    log("\n" + table)
    if main:
        io.write_json(out / "audit.json", report)
        io.write_text(out / "audit.md", table + "\n")
        plot_audit(report, out / "audit.png")
        io.write_manifest(out)
        log(f"wrote {out}/audit.json, audit.md, audit.png ({report['seconds']:.0f} s)")
    barrier()
    return report


def _kind_words(kind: str) -> str:
    return "texts" if kind == "text" else "question/answer pairs"


def _describe(cfg: AuditConfig) -> str:
    return cfg.model + (f" + {cfg.adapter}" if cfg.adapter else "")


def _membership_attacks(with_reference: bool) -> tuple[str, ...]:
    from ..metrics.membership import ATTACKS

    return tuple(a for a in ATTACKS if a != "reference" or with_reference)


def _load_other(given, name, cfg: AuditConfig, log):
    if given is not None or not name:
        return given
    from ..models import load_model

    log(f"loading {name}")
    return load_model(name, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)[0].eval()


def _reference_losses(reference, sets: dict[str, EvalSet], st: Settings) -> dict[str, list[float]]:
    from ..distributed import map_items
    from ..metrics.membership import mean_losses

    return {name: map_items(lambda idx, s=s: mean_losses(reference, [s.features[i] for i in idx], st.pad_id,
                                                         st.batch_size), range(len(s)))
            for name, s in sets.items()}


def _paraphrased_questions(cfg: AuditConfig, kind: str) -> dict | None:
    """TOFU's paraphrased_question of each forget (and unseen) record, checked up front."""
    from ..attacks.paraphrase import QA_KIND, TEXT_KINDS, read_field

    if "paraphrase" not in cfg.attacks:
        return None
    kinds = cfg.paraphrase_kinds or ([QA_KIND] if kind == "qa" else list(TEXT_KINDS))
    wrong = [k for k in kinds if (k == QA_KIND) != (kind == "qa")]
    if wrong:
        raise LokuError(f"paraphrase kind {wrong[0]!r} does not apply to {_kind_words(kind)}: use "
                        + (f"{QA_KIND} for QA data" if kind == "qa" else f"{', '.join(TEXT_KINDS)} for plain text"))
    if kind != "qa":
        return None
    forget = read_field(cfg.forget, QA_KIND)
    missing = [i + 1 for i, p in enumerate(forget[:cfg.rows]) if p is None]
    if missing:
        raise LokuError(f"--forget {cfg.forget} record {missing[0]} has no {QA_KIND}: the paraphrase attack on QA "
                        f"data needs one per forget record (TOFU's forgetXX_perturbed.json has them), or leave "
                        f"paraphrase out of --attacks")
    return {"forget": forget, "unseen": read_field(cfg.unseen, QA_KIND)}


# ---- attacks -------------------------------------------------------------------------------------------------

def _quantize(cfg, model, sets, st, ref_losses, base, parts, log) -> list[dict]:
    from ..attacks.quantize import quantize_model

    out = []
    for name in cfg.quantizers:
        for mode in cfg.modes:
            log(f"quantize: {name} ({mode})")

            def run(name=name, mode=mode):
                attacked = quantize_model(model, name, mode=mode, head=cfg.quantize_head,
                                          embeddings=cfg.quantize_embeddings)
                return measure_model(attacked, sets, st, ref_losses)

            res = parts.get(f"quantize-{name}-{mode}", run, log)
            cmp = res["compare"]["forget"]
            out.append({"quantizer": name, "mode": mode, "result": res,
                        "recovery": recoveries(cmp, base["unlearned"], base["original"])})
    return out


def _probe_set(name: str, s: EvalSet, features: list[dict], tokenizer) -> EvalSet:
    from ..metrics.membership import zlib_sizes

    return EvalSet(name, s.path, "probe", s.rows, features, zlib_sizes(tokenizer, features))


def _paraphrase(cfg, kind, plain, original, reference, tokenizer, sets, st, paraphrased, unlearned, orig, parts,
                log) -> dict:
    """Text: the continuation after the exact prefix (baseline) and after each perturbed prefix. QA: the answer
    after the paraphrased question, against the baseline measurement (the exact question)."""
    from ..attacks.paraphrase import QA_KIND, TEXT_KINDS, prefix_probes, question_probes

    pairs = {"forget": ("forget", "unseen")}
    out = {"kinds": []}
    if kind == "qa":
        exact_u, exact_o = unlearned["compare"]["forget"], orig and orig["compare"]["forget"]
        probes = {name: _probe_set(name, sets[name], question_probes(
            tokenizer, sets[name].examples, max_length=cfg.max_tokens, paraphrased=paraphrased[name],
            prompt_format=cfg.prompt_format), tokenizer)
            for name in ("forget", "unseen")}
        runs = [(QA_KIND, probes)]
    else:
        def probes_for(k):
            return {name: _probe_set(name, sets[name], prefix_probes(
                tokenizer, sets[name].sequences, k, prefix_fraction=cfg.prefix_fraction, rate=cfg.perturb_rate,
                seed=cfg.seed), tokenizer) for name in ("forget", "unseen")}

        exact = probes_for("exact")
        ref = _reference_losses(reference, exact, st) if reference is not None else None
        log("paraphrase: exact prefix")
        u = parts.get("paraphrase-exact-unlearned", lambda: measure_model(plain, exact, st, ref, pairs), log)
        o = parts.get("paraphrase-exact-original", lambda: measure_model(original, exact, st, ref, pairs), log) \
            if original is not None else None
        out["exact"] = {"unlearned": u, "original": o}
        exact_u, exact_o = u["compare"]["forget"], o and o["compare"]["forget"]
        runs = [(k, probes_for(k)) for k in (cfg.paraphrase_kinds or TEXT_KINDS)]
    for k, probes in runs:
        log(f"paraphrase: {k}")
        ref = _reference_losses(reference, probes, st) if reference is not None else None
        res = parts.get(f"paraphrase-{k}", lambda probes=probes, ref=ref: measure_model(plain, probes, st, ref, pairs),
                        log)
        out["kinds"].append({"kind": k, "result": res,
                             "recovery": recoveries(res["compare"]["forget"], exact_u, exact_o)})
    out["prefix_fraction"] = cfg.prefix_fraction if kind != "qa" else None
    return out


def _relearn(cfg, plain, tokenizer, sets, st, ref_losses, related_ex, kind, unlearned, orig, parts, log) -> dict:
    """(a) relearn on part of the forget set, measured on the held-out part and the whole set; (b) relearn on
    related data, measured on the forget set. Step 0 is the unlearned model's own measurement."""
    from ..attacks.relearn import RelearnSettings, relearn, split_forget

    settings = RelearnSettings(lr=cfg.relearn_lr, batch_size=cfg.relearn_batch_size, seed=cfg.seed)
    out = {"steps": cfg.relearn_steps, "lr": cfg.relearn_lr, "batch_size": cfg.relearn_batch_size}

    def held_out(measured: dict, idx: list[int]) -> dict:
        return compare(subset(measured["sets"]["forget"], idx), measured["sets"]["unseen"], st)

    def curve(name: str, features: list[dict], idx_out: list[int] | None) -> list[dict]:
        base_u, base_o = unlearned["compare"]["forget"], orig and orig["compare"]["forget"]
        points = []
        for k in cfg.relearn_steps:
            log(f"relearn ({name}): {k} steps")
            res = unlearned if k == 0 else parts.get(
                f"relearn-{name}-{k}", lambda k=k: measure_model(relearn(plain, features, st.pad_id, k, settings),
                                                                 sets, st, ref_losses), log)
            point = {"steps": k, "result": res if k else {"same_as": "unlearned"},
                     "recovery": recoveries(res["compare"]["forget"], base_u, base_o)}
            if idx_out is not None:
                h = held_out(res, idx_out)
                point["held_out"] = {"compare": h, "recovery": recoveries(
                    h, held_out(unlearned, idx_out), orig and held_out(orig, idx_out))}
            points.append(point)
        return points

    if len(sets["forget"]) >= 2:
        idx_in, idx_out = split_forget(len(sets["forget"]), cfg.relearn_fraction, cfg.seed)
        out["forget_split"] = {"relearned_rows": [sets["forget"].rows[i] for i in idx_in],
                               "held_out_rows": [sets["forget"].rows[i] for i in idx_out]}
        out["forget_part"] = curve("forget", [sets["forget"].features[i] for i in idx_in], idx_out)
        out["held_out_before"] = {"unlearned": held_out(unlearned, idx_out),
                                  "original": orig and held_out(orig, idx_out)}
    if related_ex is not None:
        from ..metrics.forward import text_features
        from ..data.qa import format_qa

        feats = text_features(tokenizer, [e["text"] for e in related_ex], cfg.max_tokens) if "text" in related_ex[0] \
            else [format_qa(tokenizer, e["question"], e["answer"], cfg.max_tokens, cfg.prompt_format)
                  for e in related_ex]
        out["related"] = curve("related", feats, None)
        out["related_data"] = {"path": cfg.relearn_data, "examples": len(feats)}
    return out


__all__ = ["run_audit", "summary", "recoveries"]
