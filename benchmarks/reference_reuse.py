"""Seconds of the demo's unlearning epochs (IHL + FILA, `--ihl-retain-loss ce+kl`, the whole retain set in every
step) with the frozen reference run as before this change (on the forget and the retain batch at every step)
and as now (only on the batches the method reads, `Method.reference_on`; the retain batch's outputs once, since
it is the same at every step). Alternating runs in one process, on one leaked model saved by
`benchmarks/demo_tuning.py leak DIR`; the adapters of the two must be bit-identical.

    python benchmarks/reference_reuse.py DIR [--epochs 2 --rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console

from loku.data.batches import PairedBatches
from loku.demo import DemoConfig, forget, make_groups
from loku.io import write_json
from loku.methods import METHODS
from loku.models import load_model

RESULTS = Path(__file__).parent / "results" / "reference_reuse.json"


def run(path: str, epochs: int, before: bool) -> tuple[list[float], dict]:
    """(seconds of each epoch's optimizer steps, the adapters); `before`: the reference as it ran before."""
    ihl, constant = METHODS["ihl"], PairedBatches.constant_retain
    if before:
        METHODS._items["ihl"] = dataclasses.replace(ihl, reference_on=("forget", "retain", "alt"))
        PairedBatches.constant_retain = property(lambda self: False)
    try:
        cfg = DemoConfig(unlearn_max_epochs=epochs)
        model, tokenizer = load_model(path)
        groups = make_groups(cfg)
        unknown = json.loads(Path(path, "unknown.json").read_text())
        never = {"unseen_memorization": 0.0, "general_ppl": float("inf")}   # no stop before the last epoch
        result, _, _ = forget(model, tokenizer, groups, cfg, [], Console(quiet=True), leaked=never, out=None,
                              unknown=unknown)
    finally:
        METHODS._items["ihl"], PairedBatches.constant_retain = ihl, constant
    lora = {k: v.clone() for k, v in result.model.state_dict().items() if "lora_" in k}
    return [h["seconds"] for h in result.history], lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows, adapters = [], {}
    for r in range(args.rounds):
        for before in (True, False):
            t0 = time.time()
            seconds, adapters[before] = run(args.path, args.epochs, before)
            rows.append({"round": r, "reference": "before" if before else "now", "epoch_seconds": seconds,
                         "wall": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    identical = adapters[True].keys() == adapters[False].keys() and all(
        torch.equal(adapters[True][k], adapters[False][k]) for k in adapters[True])
    mean = {k: sum(sum(x["epoch_seconds"]) for x in rows if x["reference"] == k) / args.rounds
            for k in ("before", "now")}
    summary = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "epochs": args.epochs, "rounds": rows, "training_seconds": mean,
               "ratio_now_over_before": round(mean["now"] / mean["before"], 3), "adapters_identical": identical}
    write_json(RESULTS, summary)
    print(summary)


if __name__ == "__main__":
    main()
