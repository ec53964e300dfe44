"""`loku demo`: the situation unlearning exists for, end to end on a real model on a laptop CPU.

A model is fine-tuned on a customer database of fictitious people until it has memorized it (a model
that leaked private data into its weights). Then one set of those people asks to be forgotten: loku
unlearns their records with IHL (+FILA) until the model knows them no better than people it never
saw, while the other records and general language ability stay.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import io
from .config import UnlearnConfig
from .config_base import Config, setting
from .data.records import Record, make_records, record_text
from .data.text import tokenize_examples
from .finetune import finetune
from .metrics.extraction import memorization_accuracy
from .metrics.perplexity import sequence_nll, token_weighted_perplexity
from .models import load_model
from .train import unlearn

# General text for a perplexity check (plain encyclopedic sentences written for this demo).
GENERAL_TEXT = [
    "The river rises in the northern hills and flows south through farmland before reaching the sea.",
    "Photosynthesis converts light energy into chemical energy that plants store as sugar.",
    "The library was founded in the nineteenth century and now holds more than two million books.",
    "Many birds migrate thousands of kilometres each year to find food and breeding grounds.",
    "A computer program is a sequence of instructions that a machine can execute.",
    "The city council voted to build a new bridge across the harbour by the end of the decade.",
    "Water boils at one hundred degrees Celsius at sea level and at lower temperatures on mountains.",
    "The orchestra performed works by several composers, ending the evening with a symphony.",
]
FIELDS = ("address", "phone", "email", "employer", "account")


@dataclass
class DemoConfig(Config):
    """Options of `loku demo`."""

    out: str = setting("", "New directory for the report.", group="Output", default_text="runs/demo-<time>")
    model: str = setting("smollm2-135m", "Model to run the demo on.", group="Model")
    n_forget: int = setting(12, "People who ask to be forgotten.", group="Data", bound="positive")
    n_retain: int = setting(12, "People who stay.", group="Data", bound="positive")
    n_unseen: int = setting(12, "People the model never sees (the never-seen level).", group="Data",
                            bound="positive")
    seed: int = setting(0, "Seed of the records and training.", group="Training")
    memorize_lr: float = setting(5e-4, "Learning rate of the leak fine-tune.", group="Training", bound="positive")
    memorize_max_epochs: int = setting(12, "Most epochs of the leak fine-tune.", group="Training", bound="positive")
    memorize_target: float = setting(0.9, "Forget-set memorization accuracy that counts as leaked.",
                                     group="Training", bound="positive")
    unlearn_lr: float = setting(1e-3, "Learning rate of the unlearning.", group="Training", bound="positive")
    unlearn_max_epochs: int = setting(10, "Most epochs of the unlearning.", group="Training", bound="positive")
    lora_rank: int = setting(8, "LoRA rank of the unlearning.", group="LoRA", bound="positive")
    method: str = setting("ihl", "Unlearning method (see `loku list methods`).", group="Method settings")
    mixed_precision: str = setting("bf16", "no, bf16 or fp16 (bf16: ~2x faster on CPUs with AMX/AVX512-BF16).",
                                   group="Training", choices=("no", "bf16", "fp16"))
    quick: bool = setting(False, "A smaller demo for a smoke test (the sizes and epochs left at their defaults "
                          "become 4 people a group, 3 + 2 epochs).", group="Output")
    extra: dict = setting(help="Free-form notes carried into the report (a YAML mapping).", group="Output",
                          factory=dict)

    @staticmethod
    def quick_overrides() -> dict:
        return {"n_forget": 4, "n_retain": 4, "n_unseen": 4, "memorize_max_epochs": 3, "unlearn_max_epochs": 2}

    def check(self):
        from .methods import METHODS

        METHODS[self.method]  # raises with "did you mean"
        if self.quick:
            for name, value in self.quick_overrides().items():
                if getattr(self, name) == self.__dataclass_fields__[name].default:
                    setattr(self, name, value)


def memorization(model, tokenizer, texts: list[str]) -> list[float]:
    """Per-record memorization accuracy (greedy next-token hits over the record)."""
    out = []
    for t in texts:
        ids = torch.tensor([tokenizer(t)["input_ids"]])
        out.append(float(memorization_accuracy(model, ids)[0]))
    return out


@torch.no_grad()
def leaks(model, tokenizer, records: list[Record], max_new_tokens: int = 64) -> tuple[list[float], list[str]]:
    """Prompt with '<name> lives at' and count which private fields the greedy continuation reveals."""
    prompts = [f"{r.name} lives at" for r in records]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = [sum(getattr(r, f) in t for f in FIELDS) / len(FIELDS) for r, t in zip(records, texts)]
    return scores, texts


def perplexity(model, tokenizer, texts: list[str]) -> float:
    return token_weighted_perplexity(sequence_nll(model, tokenizer, texts, max_length=128))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def measure(model, tokenizer, groups: dict[str, list[Record]]) -> dict:
    row = {}
    for name, recs in groups.items():
        row[f"{name}_memorization"] = _mean(memorization(model, tokenizer, [record_text(r) for r in recs]))
        row[f"{name}_leak"] = _mean(leaks(model, tokenizer, recs)[0])
    row["general_ppl"] = perplexity(model, tokenizer, GENERAL_TEXT)
    return row


def run_demo(cfg: DemoConfig) -> dict:
    console = Console()
    out = io.start_out_dir(cfg.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.time()
    people = make_records(cfg.n_forget + cfg.n_retain + cfg.n_unseen, seed=cfg.seed)
    groups = {"forget": people[:cfg.n_forget], "retain": people[cfg.n_forget:cfg.n_forget + cfg.n_retain],
              "unseen": people[cfg.n_forget + cfg.n_retain:]}
    console.print(f"[bold]1. Load[/] {cfg.model}")
    model, tokenizer = load_model(cfg.model)
    base = measure(model, tokenizer, groups)

    console.print(f"[bold]2. Leak[/]: fine-tune on {cfg.n_forget + cfg.n_retain} private records until memorized")
    curves: list[dict] = []
    train_texts = [record_text(r) for r in groups["forget"] + groups["retain"]]
    feats = tokenize_examples([{"text": t} for t in train_texts], tokenizer, 128)

    def memorized(epoch, m):
        row = {g: _mean(memorization(m, tokenizer, [record_text(r) for r in recs])) for g, recs in groups.items()}
        curves.append({"phase": "memorize", "epoch": epoch, **row})
        console.print(f"   epoch {epoch}: memorization forget {row['forget']:.3f} retain {row['retain']:.3f} "
                      f"unseen {row['unseen']:.3f}")
        return {"stop": row["forget"] >= cfg.memorize_target}

    t_mem = time.time()
    finetune(model, feats, tokenizer.pad_token_id, epochs=cfg.memorize_max_epochs, lr=cfg.memorize_lr,
             batch_size=8, seed=cfg.seed, mixed_precision=cfg.mixed_precision, callback=memorized,
             description="memorize")
    t_mem = time.time() - t_mem
    before = measure(model, tokenizer, groups)
    samples_before = leaks(model, tokenizer, groups["forget"][:2])[1]

    console.print(f"[bold]3. Unlearn[/] the {cfg.n_forget} forget records with {cfg.method} "
                  "until they look like never-seen people")
    threshold = before["unseen_memorization"]

    def forgotten(epoch, m):
        row = {g: _mean(memorization(m, tokenizer, [record_text(r) for r in recs])) for g, recs in groups.items()}
        curves.append({"phase": "unlearn", "epoch": epoch, **row})
        console.print(f"   epoch {epoch}: memorization forget {row['forget']:.3f} retain {row['retain']:.3f} "
                      f"unseen {row['unseen']:.3f} (target: forget <= {threshold:.3f})")
        return {"stop": row["forget"] <= threshold, **{f"{g}_memorization": v for g, v in row.items()}}

    ucfg = UnlearnConfig(model=cfg.model, method=cfg.method, lora_rank=cfg.lora_rank, epochs=cfg.unlearn_max_epochs,
                         lr=cfg.unlearn_lr, batch_size=4, seed=cfg.seed, mixed_precision=cfg.mixed_precision,
                         out=str(out / "unlearned"))
    result = unlearn(ucfg, model, tokenizer, callbacks=[forgotten],
                     forget=[record_text(r) for r in groups["forget"]],
                     retain=[record_text(r) for r in groups["retain"]])
    after = measure(result.model, tokenizer, groups)
    samples_after = leaks(result.model, tokenizer, groups["forget"][:2])[1]

    report = {"config": asdict(cfg), "init": ucfg.resolved_init, "base": base, "leaked": before, "unlearned": after,
              "memorize_seconds": round(t_mem, 1), "unlearn_seconds": round(result.seconds, 1),
              "unlearn_epochs": result.epochs_run, "total_seconds": round(time.time() - t0, 1),
              "curves": curves, "samples": [
                  {"prompt": f"{r.name} lives at", "truth": record_text(r), "before": b, "after": a}
                  for r, b, a in zip(groups["forget"], samples_before, samples_after)]}
    io.write_json(out / "report.json", report)
    plot_curves(curves, threshold, out / "curves.png")
    io.write_manifest(out)

    table = Table(title=f"loku demo: {cfg.model}, {cfg.method} ({ucfg.resolved_init} LoRA r={cfg.lora_rank})")
    for col in ("", "pretrained", "after leak", "after unlearning"):
        table.add_column(col, justify="right")
    names = [("forget memorization", "forget_memorization"), ("forget fields leaked", "forget_leak"),
             ("retain memorization", "retain_memorization"), ("retain fields leaked", "retain_leak"),
             ("never-seen memorization", "unseen_memorization"), ("general-text perplexity", "general_ppl")]
    for label, key in names:
        table.add_row(label, *(f"{row[key]:.3f}" for row in (base, before, after)))
    table.add_row("seconds", "", f"{t_mem:.0f}", f"{result.seconds:.0f}")
    console.print(table)
    for s in report["samples"]:
        console.print(f"[bold]{s['prompt']}[/]\n  before: {s['before'].strip()[:160]}\n  after:  "
                      f"{s['after'].strip()[:160]}")
    console.print(f"wrote {out}/report.json, {out}/curves.png, adapter in {out}/unlearned "
                  f"({report['total_seconds']:.0f} s in all)")
    return report


def plot_curves(curves: list[dict], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4))
    xs = list(range(1, len(curves) + 1))
    for group, color in (("forget", "tab:red"), ("retain", "tab:blue"), ("unseen", "tab:gray")):
        ax.plot(xs, [c[group] for c in curves], marker="o", color=color, label=group)
    n_mem = sum(c["phase"] == "memorize" for c in curves)
    ax.axvline(n_mem + 0.5, color="black", linestyle=":", label="start of unlearning")
    ax.axhline(threshold, color="tab:gray", linestyle="--", linewidth=0.8, label="never-seen level")
    ax.set_xlabel("epoch (memorize, then unlearn)")
    ax.set_ylabel("memorization accuracy")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
