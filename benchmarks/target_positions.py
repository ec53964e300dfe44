"""Seconds of the demo's unlearning epochs (IHL + FILA, `--ihl-retain-loss ce+kl`, the whole retain set in every
step) with the cross-entropy and IHL softmaxes over every position of the batch, as before this change, and over
the target positions only, as now (`loku.losses.token_logprobs`, `inverted_hinge_loss`). The demo's retain batch
is 20 rows of 12 to 81 tokens: 895 of its 1620 positions are tokens, the rest padding; its forget batch's targets
are the private values only. Alternating runs in one process, on one model (a leaked one saved by
`benchmarks/demo_tuning.py leak DIR`, or the pretrained `smollm2-135m`); the adapters of the two must be
bit-identical.

    python benchmarks/target_positions.py DIR [--seed 0 --epochs 2 --rounds 2]   # --seed: the leak's (the people)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from loku import losses
from loku.demo import DemoConfig, forget, make_groups
from loku.io import write_json
from loku.methods import hinge
from loku.models import load_model

RESULTS = Path(__file__).parent / "results" / "target_positions.json"


# ---- before this change (loku.losses at 5d34cc5): the softmax over every position, padding included ----
def token_logprobs_every_position(logits, labels, ignore_index=losses.IGNORE):
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    nll = F.cross_entropy(losses.upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                          reduction="none").view(labels.shape)
    return -nll, mask


def inverted_hinge_loss_every_position(logits, labels, ignore_index=losses.IGNORE):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != ignore_index
    target = labels.clamp(min=0).unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    logit_y = logits.gather(-1, target).squeeze(-1)
    top2_val, top2_idx = logits.topk(2, dim=-1)
    y_is_top = top2_idx[..., 0] == target.squeeze(-1)
    logit_other = torch.where(y_is_top, top2_val[..., 1], top2_val[..., 0])
    per_token = 1.0 + torch.exp(logit_y - lse) - torch.exp(logit_other - lse)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def run(path: str, seed: int, epochs: int, before: bool) -> tuple[list[float], dict]:
    """(seconds of each epoch's optimizer steps, the adapters); `before`: the losses as they ran before."""
    now = losses.token_logprobs, hinge.inverted_hinge_loss
    if before:
        losses.token_logprobs, hinge.inverted_hinge_loss = token_logprobs_every_position, \
            inverted_hinge_loss_every_position
    try:
        cfg = DemoConfig(seed=seed, unlearn_max_epochs=epochs)
        model, tokenizer = load_model(path)
        saved = Path(path, "unknown.json")
        unknown = json.loads(saved.read_text()) if saved.is_file() else []
        never = {"unseen_memorization": 0.0, "general_ppl": float("inf")}   # no stop before the last epoch
        result, _, _ = forget(model, tokenizer, make_groups(cfg), cfg, [], Console(quiet=True), leaked=never,
                              out=None, unknown=unknown)
    finally:
        losses.token_logprobs, hinge.inverted_hinge_loss = now
    lora = {k: v.clone() for k, v in result.model.state_dict().items() if "lora_" in k}
    return [h["seconds"] for h in result.history], lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows, adapters = [], {}
    for r in range(args.rounds):
        for before in (True, False):
            t0 = time.time()
            seconds, adapters[before] = run(args.path, args.seed, args.epochs, before)
            rows.append({"round": r, "softmax over": "every position" if before else "target positions",
                         "epoch_seconds": seconds, "wall": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    identical = adapters[True].keys() == adapters[False].keys() and all(
        torch.equal(adapters[True][k], adapters[False][k]) for k in adapters[True])
    mean = {k: sum(sum(x["epoch_seconds"]) for x in rows if x["softmax over"] == k) / args.rounds
            for k in ("every position", "target positions")}
    summary = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "model": args.path, "seed": args.seed, "epochs": args.epochs, "rounds": rows, "training_seconds": mean,
               "ratio_now_over_before": round(mean["target positions"] / mean["every position"], 3),
               "adapters_identical": identical}
    write_json(RESULTS, summary)
    print(summary)


if __name__ == "__main__":
    main()
