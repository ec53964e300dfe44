"""The demo's unlearning epochs run two ways, alternating in one process on one leaked model saved by
`benchmarks/demo_tuning.py leak DIR`: what `reference_reuse.py` and `target_positions.py` compare. The adapters of
the two ways must come out bit-identical; the seconds are each epoch's optimizer steps."""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from loku.demo import DemoConfig, forget, make_groups
from loku.io import write_json
from loku.models import load_model

# A leaked column that no unlearning check meets (it never generates): the unlearning runs to its last epoch.
NEVER = {"unseen_memorization": -1.0, "general_ppl": float("inf")}


def arguments(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("path", help="a leaked model saved by benchmarks/demo_tuning.py leak DIR")
    ap.add_argument("--seed", type=int, default=0, help="the leak's seed (its people)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    return ap.parse_args()


def unlearn_epochs(path: str, seed: int, epochs: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(seconds of each epoch's optimizer steps, the adapters) of the demo's unlearning on the model in `path`."""
    # the settings these benchmarks measured (the demo's defaults until 2026-12-07): ce+kl, the same retain batch
    # at every step (today's default streams general sentences, so no retain output is reused)
    cfg = DemoConfig(seed=seed, unlearn_max_epochs=epochs, ihl_retain_loss="ce+kl", retain_pool=0)
    model, tokenizer = load_model(path)
    saved = Path(path, "unknown.json")
    unknown = json.loads(saved.read_text()) if saved.is_file() else []
    result, _, _ = forget(model, tokenizer, make_groups(cfg), cfg, [], Console(quiet=True), leaked=NEVER, out=None,
                          unknown=unknown)
    lora = {k: v.clone() for k, v in result.model.state_dict().items() if "lora_" in k}
    return [h["seconds"] for h in result.history], lora


def compare(args: argparse.Namespace, before: Callable[[], AbstractContextManager], key: str,
            labels: tuple[str, str], results: Path) -> dict:
    """Alternates `args.rounds` rounds of the two ways (`before()`: a context in which the old way runs), writes
    the summary to `results` and returns it."""
    rows, adapters = [], {}
    for r in range(args.rounds):
        for old, label in zip((True, False), labels):
            t0 = time.time()
            if old:
                with before():
                    seconds, adapters[label] = unlearn_epochs(args.path, args.seed, args.epochs)
            else:
                seconds, adapters[label] = unlearn_epochs(args.path, args.seed, args.epochs)
            rows.append({"round": r, key: label, "epoch_seconds": seconds, "wall": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    a, b = (adapters[label] for label in labels)
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mean = {label: sum(sum(x["epoch_seconds"]) for x in rows if x[key] == label) / args.rounds for label in labels}
    summary = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "model": args.path, "seed": args.seed, "epochs": args.epochs, "rounds": rows,
               "training_seconds": mean, "ratio_now_over_before": round(mean[labels[1]] / mean[labels[0]], 3),
               "adapters_identical": identical}
    write_json(results, summary)
    print(summary)
    return summary
