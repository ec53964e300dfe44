"""Where the demo's unlearning raises general-text perplexity: a few unlearning epochs on a leaked model (saved by
`demo_tuning.py leak DIR`), never stopping early, then each token of the demo's general text scored by the leaked
and the unlearned model.

    python benchmarks/demo_general_damage.py DIR EPOCHS [key=value ...]   # keys as demo_tuning.py's

Prints the per-epoch memorization (forget, retain) and perplexity, the change of the summed token NLL, its ratio
as perplexity, the standard error of the mean per-token change (how far 120 tokens pin the ratio down), and the
tokens that lost most; appends one line to benchmarks/results/demo_general_damage.jsonl. With fewer EPOCHS than
the demo's the learning rate decays sooner: compare runs of the same EPOCHS only.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from demo_epochs import NEVER
from demo_tuning import settings
from loku.demo import GENERAL_TEXT, forget, make_groups
from loku.models import load_model

RESULTS = Path(__file__).parent / "results" / "demo_general_damage.jsonl"


@torch.no_grad()
def token_nll(model, tokenizer) -> list[tuple[str, float]]:
    """(token, NLL) for every predicted token of the general text, sentence by sentence (no padding)."""
    out = []
    for text in GENERAL_TEXT:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
        out += [(tokenizer.decode([i]), float(x)) for i, x in zip(ids[0, 1:].tolist(), nll)]
    return out


def main(path: str, epochs: str, *overrides: str) -> None:
    cfg, unlearn_settings = settings(overrides, unlearn_max_epochs=int(epochs))
    model, tokenizer = load_model(path)
    unknown = json.loads(Path(path, "unknown.json").read_text())[:cfg.n_strangers]
    before, curves, t0 = token_nll(model, tokenizer), [], time.time()
    result, _, _ = forget(model, tokenizer, make_groups(cfg), cfg, curves, Console(quiet=True), NEVER, None,
                          unknown, **unlearn_settings)
    after = token_nll(result.model, tokenizer)
    delta = [b[1] - a[1] for a, b in zip(before, after)]
    worst = sorted(zip(delta, before, after), key=lambda d: -d[0])[:10]
    line = {"dir": path, "epochs": int(epochs), "settings": dict(o.split("=", 1) for o in overrides),
            "curves": [{k: round(c[k], 4) for k in ("forget", "retain", "general_ppl")} for c in curves],
            "tokens": len(delta), "nll_change": round(sum(delta), 3),
            "perplexity_ratio": round(math.exp(sum(delta) / len(delta)), 4),
            "standard_error": round(statistics.stdev(delta) / len(delta) ** 0.5, 4),
            "top10_share": round(sum(d for d, _, _ in worst) / sum(delta), 3),
            "worst": [[a[0], round(a[1], 2), round(b[1], 2)] for _, a, b in worst],
            "train_seconds": round(result.seconds, 1), "wall": round(time.time() - t0, 1)}
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
