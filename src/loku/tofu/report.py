"""The report of a TOFU unlearning run: Forget Quality / Model Utility per method and epoch, as a markdown
table, JSON, and a plot of Forget Quality (log scale) against Model Utility, one line per method.

`results` is what `run_tofu` returns: {"retain": summary, "target": summary | None, "methods": {label:
{"method", "init", "seconds", "epochs": [{"epoch", "Forget Quality", "Model Utility", ...}]}}, ...}.
"""

from __future__ import annotations

from pathlib import Path

from .. import io

HEADLINE = ("Forget Quality", "Model Utility", "ROUGE Forget", "Prob. Forget", "Truth Ratio Forget", "ES Forget",
            "EM Forget")
RESULTS, TABLE, PLOT = "results.json", "report.md", "fq_mu.png"


def headline(summary: dict) -> dict[str, float]:
    """The numbers a report shows, from one `aggregate` summary."""
    return {k: summary[k] for k in HEADLINE if k in summary}


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-2 and x != 0 else f"{x:.4f}"
    return str(x)


def markdown_table(results: dict) -> str:
    """One row per (method, epoch), after a row for the target (before unlearning) and the retain model."""
    cols = ("model", "init", "epoch", *HEADLINE, "loss", "train s")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]

    def row(*cells):
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")

    for name in ("retain", "target"):
        if results.get(name):
            row(f"{name} model", "", 0 if name == "target" else "", *(results[name].get(k) for k in HEADLINE), None,
                None)
    for label, m in results["methods"].items():
        for e in m["epochs"]:
            row(label, m["init"], e["epoch"], *(e.get(k) for k in HEADLINE), e.get("loss"), e.get("train_seconds"))
    return "\n".join(lines) + "\n"


def plot_fq_mu(results: dict, path: str | Path) -> None:
    """Forget Quality (log y) against Model Utility (x): each method a line through its epochs, starting
    at the target model (epoch 0); the retain model (Forget Quality 1 by definition) is the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-300  # a p-value can underflow to 0; keep it on the log axis
    fig, ax = plt.subplots(figsize=(7, 5))
    target = results.get("target")
    for label, m in results["methods"].items():
        points = ([(0, target["Model Utility"], target["Forget Quality"])] if target else []) + \
                 [(e["epoch"], e["Model Utility"], e["Forget Quality"]) for e in m["epochs"]]
        if not points:
            continue
        epochs, xs, ys = zip(*points)
        line, = ax.plot(xs, [max(y, floor) for y in ys], marker="o", markersize=4, label=label)
        for ep, x, y in points[1:] if target else points:
            ax.annotate(str(ep), (x, max(y, floor)), textcoords="offset points", xytext=(3, 3), fontsize=7,
                        color=line.get_color())
    if target:
        ax.scatter([target["Model Utility"]], [max(target["Forget Quality"], floor)], color="black", zorder=5,
                   label="target (before)")
    retain = results.get("retain")
    if retain:
        ax.scatter([retain["Model Utility"]], [1.0], marker="*", s=160, color="gold", edgecolor="black", zorder=5,
                   label="retain model (goal)")
    ax.set_yscale("log")
    ax.set_ylim(top=2.0)  # Forget Quality is a p-value: 1 at most
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS-test p-value, log scale)")
    ax.set_title(results.get("title", "TOFU"), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(results: dict, out: str | Path) -> dict[str, Path]:
    """results.json, report.md and fq_mu.png in `out`; returns their paths."""
    out = Path(out)
    paths = {"json": out / RESULTS, "table": out / TABLE, "plot": out / PLOT}
    io.write_json(paths["json"], results)
    io.write_text(paths["table"], f"# {results.get('title', 'TOFU')}\n\n{markdown_table(results)}")
    plot_fq_mu(results, paths["plot"])
    return paths
