"""Split `tofu_smollm2.py` / `tdec_smollm2.py` over every method into runs that each fit a time budget.

Seconds per method at the real size: the last real run's own timings for the methods it had; for the others,
a toy run of every method (`--methods all` at the docstring's smoke sizes) gives each method's cost relative to
those the real run measured, scaled by the real run's mean (TOFU: unlearning + per-epoch scoring; TDEC: per
epoch of unlearning, times --max-epochs as if no method stopped early, plus utility). The first run also
carries the shared set-up (TOFU: target/retain fine-tuning and their evaluation; TDEC: survey, memorizing,
thresholds, utility before), the real run's total minus its methods. Methods are packed into the fewest runs
under the budget, longest first onto the least loaded run.

    .venv/bin/python benchmarks/split_plan.py tofu --smoke /tmp/toy.json          # the TOFU plan
    .venv/bin/python benchmarks/split_plan.py tdec --smoke /tmp/tdec_toy/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REAL = {"tofu": RESULTS / "tofu_smollm2.json", "tdec": RESULTS / "tdec_smollm2_8x100.json"}
OLD_TDEC_NAMES = {"ga_full": "ga+full", "ga_lora": "ga", "gd_lora": "gd", "npo_lora": "npo", "ihl_lora": "ihl",
                  "ihl_fila": "ihl+fila"}   # the labels of tdec_smollm2.py before every method came in


def tofu_costs(real: dict, smoke: dict) -> tuple[dict[str, float], float]:
    """({label: estimated seconds}, set-up seconds) for TOFU: unlearning and scoring scaled separately."""
    ref = [k for k in real["methods"] if k in smoke["methods"]]
    costs = {}
    for part in ("seconds", "eval_seconds"):   # unlearning; the per-epoch TOFU scoring
        scale = sum(real["methods"][k][part] for k in ref) / sum(smoke["methods"][k][part] for k in ref)
        for k, m in smoke["methods"].items():
            costs[k] = costs.get(k, 0.0) + (real["methods"][k][part] if k in real["methods"] else m[part] * scale)
    measured = sum(m["seconds"] + m["eval_seconds"] for m in real["methods"].values())
    setup = real["total_seconds_this_run"] - measured   # fine-tuning, retain/target evaluation
    return costs, setup


def tdec_costs(real: dict, smoke: dict) -> tuple[dict[str, float], float]:
    """({label: estimated seconds}, set-up seconds) for TDEC: unmeasured methods at --max-epochs epochs."""
    methods = {OLD_TDEC_NAMES.get(k, k): m for k, m in real["methods"].items()}
    measured = {k: m["seconds"]["total"] for k, m in methods.items()}
    epochs = real["args"]["max_epochs"]

    def per_epoch(m):
        return m["seconds"]["unlearn"] / max(1, len(m.get("curve", [])) or m.get("epochs_run", 1))

    toy = {k: per_epoch(m) for k, m in smoke["methods"].items() if "error" not in m}
    ref = [k for k in measured if k in toy and methods[k]["epochs_run"] == epochs]   # ran every epoch
    scale = sum(per_epoch(methods[k]) for k in ref) / sum(toy[k] for k in ref)
    utility = sum(methods[k]["seconds"]["utility"] for k in ref) / len(ref)
    costs = {k: measured.get(k, toy[k] * scale * epochs + utility) for k in toy}
    setup = real["total_seconds"] - sum(measured.values())   # survey, memorize, thresholds, utility before
    return costs, setup


def pack(costs: dict[str, float], setup: float, budget: float) -> list[list[str]]:
    """The fewest runs of at most `budget` seconds, balanced: longest method first onto the least loaded run
    (the first run starts with `setup`), with one run more until every run fits."""
    n = max(1, math.ceil((setup + sum(costs.values())) / budget))
    while True:
        runs, loads = [[] for _ in range(n)], [setup] + [0.0] * (n - 1)
        for label in sorted(costs, key=costs.get, reverse=True):
            i = min(range(n), key=loads.__getitem__)
            runs[i].append(label)
            loads[i] += costs[label]
        if max(loads) <= budget:
            return runs
        n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchmark", choices=("tofu", "tdec"))
    ap.add_argument("--smoke", type=Path, required=True, help="results JSON of a toy run of every method")
    ap.add_argument("--real", type=Path, default=None, help="results JSON of the last real run")
    ap.add_argument("--budget-min", type=float, default=80.0, help="minutes per run (90 less a margin)")
    args = ap.parse_args()
    real = json.loads((args.real or REAL[args.benchmark]).read_text())
    smoke = json.loads(args.smoke.read_text())
    costs, setup = (tofu_costs if args.benchmark == "tofu" else tdec_costs)(real, smoke)
    order = list(smoke["methods"])
    print(f"set-up (first run only): {setup / 60:.0f} min")
    for label in order:
        if label in costs:
            print(f"  {label:10s} {costs[label] / 60:5.1f} min")
    for i, run in enumerate(pack(costs, setup, args.budget_min * 60), 1):
        total = sum(costs[k] for k in run) + (setup if i == 1 else 0)
        run = [k for k in order if k in run]
        print(f"run {i}: ~{total / 60:.0f} min: --methods {','.join(run)}")


if __name__ == "__main__":
    main()
