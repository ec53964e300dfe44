"""Tokens/s of loku's training step (IHL + retain CE, LoRA r=8) against a bare PyTorch loop doing the same
forward/backward/AdamW work on the same batches, measured alternately in one run; on a GPU also the model
FLOPs utilisation (MFU): executed model FLOPs per second over the card's peak (--peak-tflops).

    .venv/bin/python benchmarks/throughput.py [--rounds 3 --steps 6 --batch 4 --seq 128 --model smollm2-135m]
    .venv/bin/python benchmarks/throughput.py --mixed-precision bf16 --batch 16 --seq 512 --peak-tflops 989   # H200

FLOPs per trained token with a frozen base and LoRA: forward 2N + backward to the inputs 2N (no weight
gradients for frozen weights), N = parameters in the linear layers and the output head, plus attention
scores 2 x 2 x layers x seq x hidden forward (x2 backward); LoRA's own FLOPs are under 1 % at r=8 and left out.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from loku import UnlearnConfig, load_model, unlearn
from loku.data.batches import PairedBatches
from loku.data.text import tokenize_examples
from loku.lora import add_lora, default_target_modules
from loku.losses import cross_entropy, inverted_hinge_loss


def texts(n: int, seq: int, seed: int) -> list[str]:
    """Synthetic sentences long enough to fill `seq` tokens (throughput does not depend on content)."""
    g = torch.Generator().manual_seed(seed)
    words = "the model data private record forget retain token memory weight layer learning rate".split()
    return [" ".join(words[i] for i in torch.randint(0, len(words), (seq * 2,), generator=g).tolist())
            for _ in range(n)]


def bare_loop(model, tokenizer, forget, retain, args, rank) -> float:
    """The same work without loku: peft LoRA, two forwards, IHL + CE, backward, clip, AdamW, schedule."""
    model = add_lora(model, rank, 2 * rank, default_target_modules(model))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.steps)
    batches = PairedBatches(tokenize_examples([{"text": t} for t in forget], tokenizer, args.seq),
                            tokenize_examples([{"text": t} for t in retain], tokenizer, args.seq),
                            args.batch, tokenizer.pad_token_id, seed=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    tokens, t0 = 0, time.time()
    for f, r in batches.epoch(0):
        f, r = ({k: v.to(device) for k, v in b.items()} for b in (f, r))
        with autocast:
            lf = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"], use_cache=False).logits
            lr_ = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"], use_cache=False).logits
            loss = inverted_hinge_loss(lf, f["labels"]) + cross_entropy(lr_, r["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(f["attention_mask"].sum() + r["attention_mask"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.time() - t0)


def loku_loop(model, tokenizer, forget, retain, args, rank) -> float:
    cfg = UnlearnConfig(method="ihl", lora_rank=rank, init="default", epochs=1, lr=2e-4, batch_size=args.batch,
                        max_length=args.seq, mixed_precision=args.mixed_precision)
    res = unlearn(cfg, model, tokenizer, forget=forget, retain=retain, progress=False)
    return res.history[0]["tokens_per_s"]


def flops_per_token(model, seq: int) -> float:
    """Executed model FLOPs per trained token with a frozen base (see the module docstring)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    attention = 2 * 2 * cfg.num_hidden_layers * seq * cfg.hidden_size   # QK^T and AV, forward
    return 2 * (2 * linear + attention)                                 # forward + backward to the inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak for this precision (H200 bf16: 989), for MFU")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    n = args.steps * args.batch
    forget, retain = texts(n, args.seq, 1), texts(n, args.seq, 2)
    rows = []
    for r in range(args.rounds):  # alternate, so machine noise hits both alike
        for name, fn in (("loku", loku_loop), ("bare", bare_loop)):
            tps = fn(copy.deepcopy(model), tokenizer, forget, retain, args, args.rank)
            rows.append({"round": r, "loop": name, "tokens_per_s": tps})
            print(f"round {r} {name:5s} {tps:8.1f} tokens/s", flush=True)
    mean = {k: sum(x["tokens_per_s"] for x in rows if x["loop"] == k) / args.rounds for k in ("loku", "bare")}
    ratio = mean["loku"] / mean["bare"]
    print(f"\n| loop | tokens/s (mean of {args.rounds}) |\n|---|---|")
    print(f"| loku unlearn (IHL + retain CE, LoRA r={args.rank}) | {mean['loku']:.1f} |")
    print(f"| bare PyTorch loop, same work | {mean['bare']:.1f} |")
    print(f"| ratio loku / bare | {ratio:.3f} (target >= 0.9) |")
    per_token = flops_per_token(model, args.seq)
    mfu = {k: v * per_token / (args.peak_tflops * 1e12) for k, v in mean.items()} if args.peak_tflops else None
    print(f"model FLOPs per trained token: {per_token / 1e9:.3f} GFLOP"
          + (f"; MFU loku {100 * mfu['loku']:.1f} %, bare {100 * mfu['bare']:.1f} %" if mfu else ""))
    result = {"args": vars(args), "rows": rows, "mean": mean, "ratio": ratio, "flops_per_token": per_token,
              "mfu": mfu, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "device": "cuda" if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
