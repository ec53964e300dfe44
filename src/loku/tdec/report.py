"""The paper's TDEC table (LoKU Table 1 layout) in markdown, and the EL/MA-per-epoch plot."""

from __future__ import annotations

from pathlib import Path

from .. import io

HEAD = ["Epochs", "EL{n} (%) ↓", "MA (%) ↓", "Reasoning (Acc) ↑", "Dialogue (F1) ↑", "Pile (PPL) ↓",
        "Wikitext (PPL) ↓"]


def table_row(label: str, *, epochs: int | None = None, max_epochs: int | None = None, el: float | None = None,
              ma: float | None = None, utility: dict | None = None, seconds: float | None = None,
              es: float | None = None) -> dict:
    """One line of the table. `epochs` None with `max_epochs` set means not forgotten within max_epochs;
    `utility` is `evaluate_utility(...)["summary"]` (or None when it was not run); `es` the extraction
    strength (a column of its own when some row has one)."""
    return {"label": label, "epochs": epochs, "max_epochs": max_epochs, "el": el, "ma": ma, "es": es,
            "utility": utility or {}, "seconds": seconds}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}" if x < 1e4 else f"{x:.2e}"


def _epochs(row: dict) -> str:
    if row["epochs"] is not None:
        return str(row["epochs"])
    return f">{row['max_epochs']}" if row["max_epochs"] is not None else "-"


def markdown_table(rows: list[dict], n: int = 10, seconds: bool = False, extraction: bool = True) -> str:
    """Rows of `table_row` as markdown; `extraction=False` keeps only the utility columns; an ES column
    follows MA when some row has an extraction strength."""
    es = extraction and any(r.get("es") is not None for r in rows)
    skip = 0 if extraction else 3  # Epochs, EL, MA
    head = [h.format(n=n) for h in HEAD[skip:]]
    if es:
        head.insert(3, "ES (%) ↓")
    head = ["Method", *head] + (["Seconds"] if seconds else [])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        u = r["utility"]
        cells = [_epochs(r), _pct(r["el"]), _pct(r["ma"]), _pct(u.get("reasoning_accuracy")),
                 _pct(u.get("dialogue_f1")), _num(u.get("pile_ppl")), _num(u.get("wikitext_ppl"))]
        if es:
            cells.insert(3, _pct(r.get("es")))
        cells = [r["label"], *cells[skip:]]
        if seconds:
            cells.append("-" if r["seconds"] is None else f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_epochs(curve: list[dict], thresholds, path: str | Path, title: str = "") -> None:
    """EL_n and MA of the forget set per epoch (0 = before unlearning), with the threshold lines.
    `curve`: [{"epoch", "el_mean", "ma_mean"}, ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [c["epoch"] for c in curve]
    for key, label, color, level in (("el_mean", f"EL{thresholds.n}", "tab:red", thresholds.el),
                                     ("ma_mean", "MA", "tab:blue", thresholds.ma)):
        ax.plot(xs, [100 * c[key] for c in curve], marker="o", color=color, label=f"{label} (forget set)")
        ax.axhline(100 * level, color=color, linestyle="--", linewidth=0.9, label=f"{label} threshold")
    stop = next((c["epoch"] for c in curve if c.get("forgotten")), None)
    if stop is not None:
        ax.axvline(stop, color="black", linestyle=":", linewidth=0.9, label=f"forgotten (epoch {stop})")
    ax.set_xlabel("epoch (0 = before unlearning)")
    ax.set_ylabel("%")
    ax.set_xticks(xs)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
