"""Tune `loku demo`'s two phases separately: the leak fine-tune is minutes, so it is run once and saved, and
the unlearning is tried against the saved model.

    python benchmarks/demo_tuning.py leak DIR [key=value ...]       # leak, save the leaked model to DIR
    python benchmarks/demo_tuning.py unlearn DIR [key=value ...]    # unlearn the model saved in DIR

key=value are `loku demo` settings (DemoConfig fields); unlearn.key=value sets a field of the unlearning's
UnlearnConfig (`unlearn.ihl_retain_loss=kl`). Each run appends one line (settings, the columns of the
demo's table, per-epoch curves, wall and CPU seconds) to benchmarks/results/demo_tuning.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console

from loku.data.records import record_text
from loku.demo import (DemoConfig, everyone, forget, leak, make_groups, measure, revealed_others, strangers,
                       unknown_name_texts)
from loku.models import load_model

RESULTS = Path(__file__).parent / "results" / "demo_tuning.jsonl"


def settings(overrides: tuple[str, ...], **defaults) -> tuple[DemoConfig, dict]:
    """The DemoConfig that `key=value` overrides (over `defaults`) give, and the unlearning's own fields
    (`unlearn.key=value`)."""
    pairs = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    cfg = DemoConfig(**{**defaults, **{k: v for k, v in pairs.items() if not k.startswith("unlearn.")}})
    cfg.check()
    return cfg, {k.removeprefix("unlearn."): v for k, v in pairs.items() if k.startswith("unlearn.")}


def main(phase: str, path: str, *overrides: str) -> None:
    cfg, unlearn_settings = settings(overrides)
    console, groups, curves = Console(), make_groups(cfg), []
    t0, c0 = time.time(), time.process_time()
    line = {"phase": phase, "settings": dict(o.split("=", 1) for o in overrides), "dir": path}
    if phase == "leak":
        model, tokenizer = load_model(cfg.model)
        line["base"] = measure(model, tokenizer, groups)[0]
        unknown = unknown_name_texts(model, tokenizer, strangers(cfg))
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "unknown.json").write_text(json.dumps(unknown))
        leak(model, tokenizer, groups, cfg, curves, console, unknown)
        line["leaked"] = measure(model, tokenizer, groups)[0]
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
    else:
        model, tokenizer = load_model(path)
        leaked = json.loads(Path(path, "leaked.json").read_text()) if Path(path, "leaked.json").exists() else None
        line["leaked"] = leaked or measure(model, tokenizer, groups)[0]
        Path(path, "leaked.json").write_text(json.dumps(line["leaked"]))
        unknown = []   # the pretrained model's continuations, as the demo computes them before the leak
        if cfg.n_strangers:
            saved = Path(path, "unknown.json")
            unknown = json.loads(saved.read_text()) if saved.exists() else []
            if len(unknown) != cfg.n_strangers:
                unknown = unknown_name_texts(*load_model(cfg.model), strangers(cfg))
            line["unknown"] = unknown[:3]
        result, _, unlearned = forget(model, tokenizer, groups, cfg, curves, console, line["leaked"], None, unknown,
                                      **unlearn_settings)
        line["unlearned"], shown = unlearned or measure(result.model, tokenizer, groups)
        texts = shown["forget"][1]
        line["reveals_others"] = revealed_others(texts, groups["forget"], everyone(groups))
        line["samples"] = texts[:3]
        kept, kept_texts = shown["retain"]   # which retain fields broke
        line["retain_samples"] = [{"truth": record_text(r), "generated": t, "fields": k}
                                  for r, t, k in zip(groups["retain"], kept_texts, kept)]
    line.update(curves=curves, wall=round(time.time() - t0, 1), cpu=round(time.process_time() - c0, 1))
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    console.print({k: v for k, v in line.items() if k not in ("curves", "samples")})


if __name__ == "__main__":
    main(*sys.argv[1:])
