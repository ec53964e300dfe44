"""The size of loku's changes to SimNPO, IdK and KL (and of its remaining differences from the reference code),
measured on a tiny model that has memorized 32 records (the tiny Llama of tests/conftest.py).

For each method two variants train from the same memorized model (LoRA r=8, same data, seed, epochs and lr):
- SimNPO: OpenUnlearning's (forget weight 0.125, margin 0 inside beta) against loku's former formula (forget
  weight 1, gamma 0.125 added inside the log-sigmoid); also the gradient norm of the forget term at step 0 and
  the value difference of counting the first label of a plain-text sequence in the length (the reference does).
- IdK: one token mean over refusal + retain tokens (the paper's code) against two means added (loku's former).
- KL: batchmean over every position (the references) against the mean over target tokens (loku's former).
Reported: forget and retain next-token accuracy after training, and the loss terms at step 0.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_differences.py   # ~5 min on one CPU core
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # the tiny model and tokenizer of the test suite

from conftest import build_tokenizer, tiny_llama, token_accuracy  # noqa: E402

from loku import UnlearnConfig, unlearn  # noqa: E402
from loku.data.records import make_records, record_text  # noqa: E402
from loku.data.text import tokenize_examples  # noqa: E402
from loku.finetune import finetune  # noqa: E402
from loku.io import write_json  # noqa: E402
from loku.losses import cross_entropy, sequence_logprob, simnpo_loss  # noqa: E402
from loku.methods import LossInputs, method  # noqa: E402

RECORDS = [record_text(r) for r in make_records(32, seed=7)]
FORGET, RETAIN = RECORDS[:16], RECORDS[16:]


@method("simnpo_v0", "loku's former SimNPO: gamma 0.125 added inside the log-sigmoid, forget weight 1",
        needs_retain=True, forget_mean_over="sequences")
def simnpo_v0(x: LossInputs, s):
    avg_logp = sequence_logprob(x.forget_logits, x.forget_labels, mean=True)
    forget = -(2.0 / 4.5) * F.logsigmoid(-4.5 * avg_logp - 0.125).mean()
    return {"forget": forget, "retain": cross_entropy(x.retain_logits, x.retain_labels)}


def memorized_model(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    feats = tokenize_examples([{"text": t} for t in RECORDS], tokenizer, 128)
    finetune(model, feats, tokenizer.eos_token_id, epochs=60, lr=3e-3, batch_size=8, progress=False)
    return model


def train(base, tokenizer, args, **settings) -> dict:
    cfg = UnlearnConfig(init="default", epochs=args.epochs, lr=args.lr, batch_size=8, seed=0, **settings)
    t0 = time.time()
    res = unlearn(cfg, copy.deepcopy(base), tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    return {"forget_acc": round(token_accuracy(res.model, tokenizer, FORGET), 4),
            "retain_acc": round(token_accuracy(res.model, tokenizer, RETAIN), 4),
            "first_epoch": {k: round(v, 5) for k, v in res.history[0].items() if isinstance(v, float)},
            "seconds": round(time.time() - t0, 1)}


def simnpo_step0(base, tokenizer) -> dict:
    """Gradient norm of the weighted forget term at the memorized model, both formulas; and the effect of
    counting a plain-text sequence's first label in its length (OpenUnlearning divides by labels != -100 before
    the shift) on the loss value."""
    feats = tokenize_examples([{"text": t} for t in FORGET[:8]], tokenizer, 128)
    from loku.data.batches import collate

    batch = collate(feats, tokenizer.eos_token_id)
    out = {}
    for name in ("openunlearning", "loku_v0"):
        model = copy.deepcopy(base)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if name == "openunlearning":
            loss = 0.125 * simnpo_loss(logits, batch["labels"], 4.5, 0.0)
        else:
            avg = sequence_logprob(logits, batch["labels"], mean=True)
            loss = -(2.0 / 4.5) * F.logsigmoid(-4.5 * avg - 0.125).mean()
        loss.backward()
        out[f"{name}_forget_grad_norm"] = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()
                                                                  if p.grad is not None)))
    out["v0_over_openunlearning"] = out["loku_v0_forget_grad_norm"] / out["openunlearning_forget_grad_norm"]
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        nll = F.cross_entropy(logits[:, :-1].transpose(-1, -2), labels[:, 1:], ignore_index=-100,
                              reduction="none").sum(-1)
        ref = -F.logsigmoid(4.5 * (nll / (labels != -100).sum(-1))).mean() * 2 / 4.5
        mine = simnpo_loss(logits, labels)
    out["text_length_count"] = {"loku": float(mine), "reference": float(ref),
                                "relative_difference": float((mine - ref) / ref),
                                "mean_tokens": float((labels != -100).sum(-1).float().mean())}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "reference_differences.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    tokenizer = build_tokenizer()
    base = memorized_model(tokenizer)
    result = {"setup": {"model": "tiny Llama (2 layers, hidden 64, vocab 512) memorized on 32 records",
                        "forget": len(FORGET), "retain": len(RETAIN), "epochs": args.epochs, "lr": args.lr,
                        "lora_rank": 8, "batch_size": 8},
              "before": {"forget_acc": round(token_accuracy(base, tokenizer, FORGET), 4),
                         "retain_acc": round(token_accuracy(base, tokenizer, RETAIN), 4)},
              "simnpo_step0": simnpo_step0(base, tokenizer)}
    variants = {
        "simnpo (OpenUnlearning: weight 0.125, margin 0)": dict(method="simnpo"),
        "simnpo (loku before: weight 1, gamma inside)": dict(method="simnpo_v0"),
        "idk pooled (paper's code)": dict(method="idk"),
        "idk separate (loku before)": dict(method="idk", idk_pooling="separate"),
        "kl batchmean (references)": dict(method="kl"),
        "kl tokens (loku before)": dict(method="kl", kl_reduction="tokens"),
    }
    result["runs"] = {}
    for label, settings in variants.items():
        result["runs"][label] = train(base, tokenizer, args, **settings)
        print(label, result["runs"][label], flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    write_json(args.out, result)
    print(json.dumps(result["simnpo_step0"], indent=1))
    print(f"\n| variant | forget acc | retain acc | epoch-1 forget term | epoch-1 retain term |\n|---|---:|---:|---:|---:|")
    print(f"| memorized model | {result['before']['forget_acc']:.3f} | {result['before']['retain_acc']:.3f} | | |")
    for label, r in result["runs"].items():
        e = r["first_epoch"]
        print(f"| {label} | {r['forget_acc']:.3f} | {r['retain_acc']:.3f} | {e.get('forget', float('nan')):.4f} | "
              f"{e.get('retain', float('nan')):.4f} |")


if __name__ == "__main__":
    main()
