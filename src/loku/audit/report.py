"""audit.md (the verdict table) and audit.png (relearning curves, AUC per attack) from the audit report."""

from __future__ import annotations

from pathlib import Path

from .. import io
from .verdict import ABOVE, BELOW, INDISTINGUISHABLE

LABELS = {"ma": "MA", "el": "EL{n}", "es": "ES", "em": "EM", "loss": "AUC LOSS", "zlib": "AUC ZLib",
          "min_k": "AUC Min-K%", "min_k_plus_plus": "AUC Min-K%++", "reference": "AUC reference"}


def _conditions(report: dict) -> list[tuple[str, str, dict, dict | None]]:
    """(condition, probe, comparison, recovery) for every measured condition, in report order."""
    rows = [("before attacks", "forget set", report["unlearned"]["compare"]["forget"], None)]
    if report.get("original"):
        rows.append(("original model (before unlearning)", "forget set", report["original"]["compare"]["forget"],
                     None))
    attacks = report.get("attacks", {})
    for q in attacks.get("quantize", []):
        rows.append((f"quantized {q['quantizer']} ({q['mode']})", "forget set", q["result"]["compare"]["forget"],
                     q["recovery"]))
    para = attacks.get("paraphrase")
    if para:
        if para.get("exact"):
            rows.append(("exact prefix (probe baseline)", "continuation", para["exact"]["unlearned"]["compare"]
                         ["forget"], None))
        for p in para["kinds"]:
            probe = "answer" if p["kind"] == "paraphrased_question" else "continuation"
            name = "paraphrased question" if p["kind"] == "paraphrased_question" else f"prefix {p['kind']}"
            rows.append((name, probe, p["result"]["compare"]["forget"], p["recovery"]))
    rel = attacks.get("relearn")
    if rel:
        unlearned = report["unlearned"]["compare"]["forget"]
        for p in rel.get("forget_part", []):
            if p["steps"] == 0:
                continue
            cond = f"relearned {p['steps']} steps on part of the forget set"
            rows.append((cond, "held-out part", p["held_out"]["compare"], p["held_out"]["recovery"]))
            rows.append((cond, "forget set", p["result"]["compare"]["forget"], p["recovery"]))
        for p in rel.get("related", []):
            if p["steps"]:
                rows.append((f"relearned {p['steps']} steps on related data", "forget set",
                             p["result"]["compare"]["forget"], p["recovery"]))
        del unlearned
    return rows


def verdict_lines(report: dict) -> list[dict]:
    """One line per (condition, probe, metric): values, margin, interval, verdict, recovery."""
    lines = []
    for cond, probe, cmp, rec in _conditions(report):
        for m, line in cmp["metrics"].items():
            lines.append({"condition": cond, "probe": probe, "metric": m, "forget": line["forget"],
                          "unseen": line["unseen"], "margin": line["margin"], "interval": line["interval"],
                          "verdict": line["verdict"], "recovery": rec and rec.get(m)})
        for a, line in cmp["auc"].items():
            lines.append({"condition": cond, "probe": probe, "metric": a, "forget": line["auc"], "unseen": 0.5,
                          "margin": line["margin"], "interval": [x - 0.5 for x in line["interval"]],
                          "verdict": line["verdict"], "recovery": rec and rec.get(f"auc_{a}")})
    return lines


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _signed(x) -> str:
    return "-" if x is None else f"{x:+.3f}"


def audit_markdown(report: dict) -> str:
    cfg, n = report["config"], report["config"]["n"]
    sets = report["sets"]
    lines = report["verdicts"]
    head = [f"# Audit of {cfg['model']}" + (f" + {cfg['adapter']}" if cfg.get("adapter") else ""),
            "",
            f"Forget set {sets['forget']['path']} ({sets['forget']['examples']} examples) against never-seen "
            f"{sets['unseen']['path']} ({sets['unseen']['examples']} examples)."]
    original = [ln for ln in lines if ln["condition"].startswith("original model")]
    measured = [ln for ln in lines if not ln["condition"].startswith("original model")]
    tells = [ln for ln in measured if ln["verdict"] != INDISTINGUISHABLE]
    base = [ln for ln in measured if ln["condition"] == "before attacks"]
    base_tells = [ln for ln in base if ln["verdict"] != INDISTINGUISHABLE]
    head.append("")
    if not base_tells:
        head.append(f"**Before attacks: indistinguishable from never-seen on all {len(base)} measures.**")
    else:
        head.append(f"**Before attacks: distinguishable from never-seen on {len(base_tells)} of {len(base)} "
                    f"measures** ({', '.join(_label(ln['metric'], n) for ln in base_tells)}).")
    attacked = [ln for ln in tells if ln["condition"] not in ("before attacks", "exact prefix (probe baseline)")]
    if any(ln["condition"] != "before attacks" for ln in measured):
        conds = list(dict.fromkeys(ln["condition"] for ln in attacked))
        head.append("After attacks: " + ("indistinguishable under every attack." if not conds else
                                         f"distinguishable under {len(conds)} condition(s): "
                                         + "; ".join(conds) + "."))
    if original:
        o_tells = [ln for ln in original if ln["verdict"] != INDISTINGUISHABLE]
        head.append(f"The original model (before unlearning) is distinguishable on {len(o_tells)} of "
                    f"{len(original)} measures.")
    table = ["| condition | probe | measure | forget | never-seen | margin | 95% interval of the margin | verdict "
             "| recovery |", "|---|---|---|---:|---:|---:|---|---|---:|"]
    for ln in lines:
        lo, hi = ln["interval"]
        table.append(f"| {ln['condition']} | {ln['probe']} | {_label(ln['metric'], n)} | {_f(ln['forget'])} | "
                     f"{_f(ln['unseen'])} | {_signed(ln['margin'])} | [{lo:+.3f}, {hi:+.3f}] | {ln['verdict']} | "
                     f"{_f(ln['recovery'], 2)} |")
    notes = ["",
             "Margin: mean over the forget set minus mean over the never-seen set (MA, EL, ES, EM), or membership "
             "AUC minus 0.5 (forget = members; loku's scores are higher for members). Interval: percentile "
             f"bootstrap ({report['settings']['bootstrap']} resamples, seeded). Verdict: "
             f"\"{INDISTINGUISHABLE}\" when the interval reaches 0"
             + (f" (within {report['settings']['tolerance']})" if report["settings"]["tolerance"] else "")
             + f"; \"{ABOVE}\": the model still knows the forget set better; \"{BELOW}\": it now looks less familiar "
             "than never-seen text, which gives it away as well.",
             "Recovery: (attacked - unlearned) / (original - unlearned) of the forget-side value (0: nothing came "
             "back, 1: all that unlearning removed); '-' without --original or when unlearning moved the value by "
             "less than 0.01. For prefix probes the unlearned and original values are those of the exact prefix.",
             "MA equals EM on plain text (same tokens); QA sets and probes have no MA or EL (their prompt is not "
             "scored)."
             + ({"before": f" EL{n} is computed before attacks only (--el all: after every attack too).",
                 "none": f" EL{n} was not computed (--el none)."}.get(report["settings"]["el"], ""))]
    return "\n".join(head + [""] + table + notes)


def _label(metric: str, n: int) -> str:
    return LABELS.get(metric, metric).format(n=n)


def plot_audit(report: dict, path: str | Path) -> None:
    """Left: over relearning steps, the recovery fraction (without --original: the forget-side value) of ES, EM,
    EL and the best membership AUC, on the held-out part (solid), the whole forget set (dashed) and after
    relearning on related data (dotted). Right: membership AUC per condition and attack (0.5 = never-seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .verdict import recovery

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    rel = report.get("attacks", {}).get("relearn")
    has_original = report.get("original") is not None
    n = report["config"]["n"]
    if rel:
        metrics = {"es": "ES", "em": "EM", "el": f"EL{n}", "auc": "best membership AUC"}
        colors = dict(zip(metrics, ("tab:blue", "tab:orange", "tab:red", "tab:purple")))
        before = {"forget_part": (report["unlearned"]["compare"]["forget"],
                                  report["original"] and report["original"]["compare"]["forget"])}
        before["related"] = before["forget_part"]
        if rel.get("held_out_before"):
            before["held_out"] = (rel["held_out_before"]["unlearned"], rel["held_out_before"]["original"])
        for series, style, name in (("held_out", "-", "held-out part"), ("forget_part", "--", "forget set"),
                                    ("related", ":", "after related data")):
            points = rel.get("related" if series == "related" else "forget_part", [])
            if not points or series not in before:
                continue
            u, o = before[series]
            for m, label in metrics.items():
                ys = []
                for p in points:
                    x = _value(_point_compare(report, p, series), m)
                    ys.append(recovery(x, _value(u, m), o and _value(o, m)) if has_original else x)
                if any(y is not None for y in ys):
                    left.plot([p["steps"] for p in points], [float("nan") if y is None else y for y in ys], style,
                              marker="o", color=colors[m], label=f"{label}, {name}")
        left.set_xlabel("relearning steps")
        left.set_ylabel("recovery fraction" if has_original else "forget-set value")
        left.axhline(0, color="grey", linewidth=0.8)
        if has_original:
            left.axhline(1, color="grey", linewidth=0.8, linestyle=":")
        left.legend(fontsize=6, ncol=2)
        left.set_title("Relearning" + (" (1 = all that unlearning removed is back)" if has_original else ""),
                       fontsize=9)
    else:
        left.text(0.5, 0.5, "no relearning attack run\n(--attacks relearn)", ha="center", va="center")
        left.set_axis_off()
    conds = [(ln["condition"] + ("" if ln["probe"] in ("forget set",) else f" [{ln['probe']}]"), ln)
             for ln in report["verdicts"] if ln["metric"] in report["settings"]["membership_attacks"]]
    names = list(dict.fromkeys(c for c, _ in conds))
    attacks = report["settings"]["membership_attacks"]
    width = 0.8 / max(len(attacks), 1)
    for j, a in enumerate(attacks):
        values = {c: ln["forget"] for c, ln in conds if ln["metric"] == a}
        right.bar([i + j * width for i in range(len(names))], [values.get(c, float("nan")) for c in names],
                  width=width, label=_label(a, n))
    right.axhline(0.5, color="black", linestyle="--", linewidth=0.9, label="never-seen level")
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    right.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
    right.set_ylim(0, 1)
    right.set_ylabel("membership AUC")
    right.legend(fontsize=6)
    right.set_title("Forget vs never-seen: membership AUC per condition", fontsize=9)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _value(cmp: dict, metric: str):
    """A comparison's forget-side value of ma/el/es/em, or "auc": the best (highest) membership AUC."""
    if metric == "auc":
        return max((line["auc"] for line in cmp["auc"].values()), default=None)
    line = cmp["metrics"].get(metric)
    return line and line["forget"]


def _point_compare(report: dict, point: dict, series: str) -> dict:
    if series == "held_out":
        return point["held_out"]["compare"]
    if point["steps"] == 0:
        return report["unlearned"]["compare"]["forget"]
    return point["result"]["compare"]["forget"]
