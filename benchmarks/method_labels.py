"""The method labels `tofu_smollm2.py` and `tdec_smollm2.py` take with --methods, and the methods neither can
run here (with the reason).

A label is what `loku tofu unlearn --methods` reads (`loku.tofu.run.parse_method`): a loku method name (LoRA at
the benchmark's rank, peft's default init), NAME+INIT (`ihl+fila`) or NAME+full (full fine-tuning).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loku.errors import LokuError
from loku.methods import METHODS
from loku.tofu.run import parse_method

EXTRA = ("ihl+fila", "ga+full", "npo+full")   # beside every method with LoRA r=8 (default init)
TRAJECTORY = ("needs the recorded trajectory of the fine-tuning that taught the model its forget set "
              "(loku.methods.editing.TrajectoryWriter); {where} records none, and a whole-model trajectory of "
              "SmolLM2-135M takes 0.54 GB per optimizer step")
WHERE = {"tofu": "the target fine-tuning (65 steps here: ~35 GB)", "tdec": "the memorize phase"}


def all_labels() -> list[str]:
    return [*METHODS.names(), *EXTRA]


def labels_for(methods: str) -> list[str]:
    """`--methods` as labels ("all": every method with LoRA, then EXTRA); unknown names raise LokuError."""
    if methods.strip() == "all":
        return all_labels()
    labels = [m.strip() for m in methods.split(",") if m.strip()]
    if not labels:
        raise LokuError("--methods is empty: pass all, or labels such as ga,gd,ihl+fila,ga+full")
    for label in labels:
        parse_method(label)   # "did you mean" for unknown method or init names
    dup = sorted({m for m in labels if labels.count(m) > 1})
    if dup:
        raise LokuError(f"method {dup[0]!r} is listed twice in --methods: list each once")
    return labels


def not_applicable(labels: list[str], lunar_harmful, benchmark: str) -> dict[str, str]:
    """{label: why it cannot run here} for the labels among `labels` that need a resource this benchmark lacks."""
    out = {}
    for label in labels:
        spec = parse_method(label)
        if spec.method == "lmcleaner":
            out[label] = TRAJECTORY.format(where=WHERE[benchmark])
        elif spec.method == "lunar" and not lunar_harmful:
            out[label] = ("needs --lunar-harmful FILE, prompts the model refuses (OpenUnlearning's "
                          "splits/harmful.json); the data folder has none")
    return out


def add_method_flags(ap: argparse.ArgumentParser, finished_in: str) -> None:
    """--methods, --report-only and --lunar-harmful, as both benchmarks take them; `finished_in` names what
    --report-only reads ("table and JSON from the methods finished in --work")."""
    ap.add_argument("--methods", default="all",
                    help="comma-separated: loku method names (LoRA r=--rank, default init), ihl+fila, ga+full, "
                         "npo+full (full fine-tuning); default all")
    ap.add_argument("--report-only", action="store_true", help=f"train nothing: {finished_in}")
    ap.add_argument("--lunar-harmful", type=Path, default=None,
                    help="LUNAR's refusal prompts (OpenUnlearning's harmful.json); without it lunar is not run")
