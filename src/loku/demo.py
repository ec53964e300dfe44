"""`loku demo`: the situation unlearning exists for, end to end on a real model on a laptop CPU.

A model is fine-tuned on a customer database of fictitious people until, prompted with a name, it
writes out that person's private fields (a model that leaked private data into its weights), while its
general language stays as it was. Then one set of those people asks to be forgotten: loku unlearns
their records with IHL (+FILA) until the model no longer reveals them and knows them no better than
people it never saw, while it still knows the other people and its general text.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import io
from .config import UnlearnConfig
from .config_base import PRECISION_HELP, PRECISIONS, Config, setting
from .data.qa import format_qa
from .data.records import Record, make_records, record_text
from .data.retain import PER_ARTICLE, builtin_retain
from .data.text import tokenize_examples
from .distributed import launch_precision
from .finetune import finetune
from .metrics.extraction import exact_memorization_from_logits
from .metrics.forward import pad_id, per_feature
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
# Every private value of a record, in its order: what the unlearning forgets (the medical condition too; it is
# left out of FIELDS as one of only six, which a model that knows nothing names by chance).
PRIVATE = ("address", "phone", "email", "employer", "condition", "account")
# Fields no two people share: one of them in a generation names its owner (employers repeat).
IDENTIFYING = ("address", "phone", "email", "account")
# Memorization of the private values below which a name prompt reveals few fields (SmolLM2-135M, MLP fine-tune
# with general text mixed in: 0.94 -> under 50%, 0.97 -> 54%, 0.986 -> 78% of fields), so the leak fine-tune
# does not spend a generation on checking.
LEAK_GATE = 0.97
TIE = 1e-9   # shares of fields are means of k/5: 24 of 30 fields is 0.7999999999999999, which meets a bar of 0.8
MLP_BLOCK = ".mlp."   # in a weight's name: it belongs to an MLP block (the leak trains these; the unlearning's LoRA)


@dataclass
class DemoConfig(Config):
    """Options of `loku demo`."""

    out: str = setting("", "New directory for the report, plot and adapter.", group="Output",
                       default_text="runs/demo-<time>")
    model: str = setting("smollm2-135m", "Model to run the demo on.", group="Model")
    n_forget: int = setting(6, "People who ask to be forgotten.", group="Data", bound="positive")
    n_retain: int = setting(6, "People whose records the model keeps.", group="Data", bound="positive")
    n_unseen: int = setting(6, "People the model never sees (the never-seen level).", group="Data",
                            bound="positive")
    seed: int = setting(0, "Seed of the records and training.", group="Training")
    distinct_names: bool = setting(False, "No two of the demo's people (the groups and the strangers) share a first or "
                                   "a last name (other people than the default's for the same seed): a forgotten "
                                   "person then has no namesake to fall back on (README: the demo, its trials).",
                                   group="Data")
    leak_lr: float = setting(3e-4, "Learning rate of the leak fine-tune.", group="Training", bound="positive")
    leak_modules: str = setting("mlp", "What the leak fine-tune trains: mlp (the MLP blocks, where a transformer "
                                "stores facts; general text suffers least) or all (every weight).",
                                group="Training", choices=("mlp", "all"), kind="leak modules")
    leak_general: int = setting(240, "Built-in general-text sentences mixed into the leak fine-tune (the rest of "
                                "a training set: the model keeps its general language), a batch of them with each "
                                "batch of records, drawn from a stream that cycles across epochs.", group="Data",
                                bound="non-negative")
    retain_general: int = setting(8, "General sentences in each unlearning step's retain batch, beside the retain "
                                  "people's records and the strangers' texts (retain records).", group="Data",
                                  bound="non-negative")
    retain_pool: int = setting(64, "General sentences those are drawn from, a different few each step (a stream "
                               "that cycles; at most --retain-general: the same ones every step). A held retain term "
                               "keeps only what it sees: a wider stream holds more of the model's general text.",
                               group="Data", bound="non-negative")
    leak_batch_size: int = setting(4, "Batch size of the leak fine-tune.", group="Training", bound="positive")
    leak_max_epochs: int = setting(16, "Most epochs of the leak fine-tune (its learning rate decays over them; it "
                                   "stops once the records leak).", group="Training", bound="positive")
    leak_target: float = setting(0.8, "Share of private fields both groups must reveal, prompted with a name, "
                                 "before unlearning starts (and the retain people after it).", group="Training",
                                 bound="positive")
    unlearn_lr: float = setting(1.5e-3, "Learning rate of the unlearning.", group="Training", bound="positive")
    unlearn_batch_size: int = setting(4, "Forgotten records per step of the unlearning (with retain records, "
                                      "every step keeps every retain person's record).", group="Training",
                                      bound="positive")
    retain_weight: float = setting(3.0, "Coefficient of the unlearning's retain term.", group="Training",
                                   bound="non-negative")
    unlearn_max_epochs: int = setting(10, "Most epochs of the unlearning.", group="Training", bound="positive")
    forget_target: float = setting(0.05, "Unlearning stops once the forgotten people reveal at most this share of "
                                   "their fields, none of their generations names someone else, they are known no "
                                   "better than never-seen people, the retain people still reveal the leak's "
                                   "target and general-text perplexity is within --ppl-limit of the leaked model's.",
                                   group="Training", bound="non-negative")
    ppl_limit: float = setting(1.1, "Most general-text perplexity after unlearning, as a multiple of the leaked "
                               "model's: unlearning goes on while it is above (one of the stop rule's bars).",
                               group="Training", bound="positive")
    n_strangers: int = setting(6, "Names of further people without a record: the pretrained model's greedy "
                                "continuation of '<name> lives at' for each (what a model writes for a name it does "
                                "not know) joins the leak's training set and the unlearning's retain set.",
                                group="Data", bound="non-negative")
    lora_rank: int = setting(8, "LoRA rank of the unlearning.", group="LoRA", bound="positive")
    unlearn_modules: str = setting("mlp", "Where the unlearning's LoRA adapters go: mlp (the MLP blocks, which the "
                                   "leak trained) or all (every linear layer but the head).", group="LoRA",
                                   choices=("mlp", "all"), kind="unlearn modules")
    method: str = setting("ihl", "Unlearning method (see `loku list methods`).", group="Method settings")
    ihl_retain_loss: str = setting("held+kl", "ihl's retain term (its --ihl-retain-loss): held+kl pulls back the "
                                   "retain tokens that fell below the leaked model's probability (held) and keeps its "
                                   "next-token distribution (kl), without fine-tuning the retain records further; "
                                   "with ce alone the demo's general-text perplexity rose 1.32x, with ce+kl it stayed "
                                   "within 1.03x but a forgotten person's generation could name a retain person "
                                   "(benchmarks/results/demo_tuning.jsonl).", group="Method settings",
                                   choices=("ce", "kl", "ce+kl", "held", "held+kl"), kind="ihl retain loss")
    retain: str = setting("records", "What the unlearning keeps: records (the rest of the leak's training set: "
                          "the retain people's records and the general paragraphs) or builtin (loku's built-in "
                          "general text, as `loku unlearn` without --retain).", group="Data",
                          choices=("records", "builtin"), kind="demo retain set")
    mixed_precision: str = setting("no", PRECISION_HELP + " The demo trains in fp32 by default: under bf16 autocast "
                                   "its leak plateaued at 60-70% of the fields on an AVX512-BF16 CPU (fp32: 90% there) "
                                   "and its results moved between machines; bf16 was 1.5x (AVX512-BF16) to 2x (AMX) "
                                   "faster than fp32, 18-36x slower on a CPU without native bf16.", group="Training",
                                   choices=PRECISIONS)
    quick: bool = setting(False, "A smaller demo for a smoke test (the sizes and epochs left at their defaults "
                          "become 4 people a group, 3 + 2 epochs).", group="Output")
    extra: dict = setting(help="Free-form notes carried into the report (a YAML mapping).", group="Output",
                          factory=dict)

    @staticmethod
    def quick_overrides() -> dict:
        return {"n_forget": 4, "n_retain": 4, "n_unseen": 4, "leak_general": 4, "leak_max_epochs": 3,
                "unlearn_max_epochs": 2}

    def check(self):
        from .methods import METHODS

        METHODS[self.method]  # raises with "did you mean"
        if self.quick:
            for name, value in self.quick_overrides().items():
                if getattr(self, name) == self.__dataclass_fields__[name].default:
                    setattr(self, name, value)


def value_examples(r: Record) -> list[dict]:
    """The record as one prompt/completion pair per private value, in the `continuation` prompt format: the text
    before the value is the prompt (no loss), the value the completion."""
    text, out, end = record_text(r), [], 0
    for f in PRIVATE:
        start = text.index(getattr(r, f), end)
        end = start + len(getattr(r, f))
        question = text[:start].rstrip(" ")
        out.append({"question": question, "answer": text[len(question):end]})
    return out


def value_features(tokenizer, records: list[Record]) -> list[dict]:
    """Each whole record as one feature whose labels are its private values' tokens only (-100 elsewhere): in a
    causal model the same logits as `value_examples` tokenized one by one, from one forward pass per record.
    What the unlearning forgets: the values, not the words around them, which every record shares (pushing
    those down broke the retain people's records too: 86% -> 8% of their fields revealed)."""
    feats = []
    for r in records:
        ids = tokenizer(record_text(r))["input_ids"]
        labels = [-100] * len(ids)
        for ex in value_examples(r):   # the value's tokens: where its continuation example carries loss
            one = format_qa(tokenizer, ex["question"], ex["answer"], len(ids), "continuation")
            lo, hi = one["labels"].count(-100), len(one["input_ids"])
            labels[lo:hi] = ids[lo:hi]
        feats.append({"input_ids": ids, "labels": labels})
    return feats


def memorization(model, tokenizer, records: list[Record]) -> list[float]:
    """Per-record memorization of the private values: the share of their tokens that are the model's greedy
    next token given the true record before them (`loku.metrics.extraction`'s exact memorization over the
    value tokens), one teacher-forced batch. The words between the values are left out: every record shares
    them, so they say nothing about whether the model knows this person."""
    return per_feature(model, value_features(tokenizer, records), pad_id(tokenizer), lambda logits, labels: {
        "ma": exact_memorization_from_logits(logits, labels)}, batch_size=len(records))["ma"]


def general_paragraphs(n: int) -> list[str]:
    """`n` paragraphs of the built-in general text, each cut after its first sentence (about a record's
    length): first one per article (the set holds a few per article), then the articles' later paragraphs."""
    texts = [e["text"] for e in builtin_retain()]
    return [first_sentence(t) for t in (texts[::PER_ARTICLE] + [t for i, t in enumerate(texts) if i % PER_ARTICLE])[:n]]


def first_sentence(text: str) -> str:
    end = re.search(r"(?<![A-Z])[.!?](?= [A-Z\"]|\n|$)", text)   # not after an initial ("T. S. Eliot")
    return text[:end.end()] if end else text


def train_only(model, modules: str) -> None:
    """Let the leak fine-tune train the MLP blocks ("mlp") or every weight ("all"). On SmolLM2-135M, 12 epochs
    of the MLPs at lr 3e-4 left general-text perplexity at 71 where the whole model at the same rate gave 130
    (with the general sentences repeated, before they became a stream)."""
    for name, p in model.named_parameters():
        p.requires_grad_(modules == "all" or MLP_BLOCK in name)


def mlp_linear_names(model) -> list[str]:
    """The names (as LoRA targets take them) of the linear layers inside the MLP blocks: Llama's gate/up/down_proj."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                              if MLP_BLOCK in n and isinstance(m, torch.nn.Linear)))


def prompt(r: Record) -> str:
    """The start of a record: what someone who knows only the name would type."""
    return f"{r.name} lives at"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (left-padded batch)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def leaks(model, tokenizer, records: list[Record], max_new_tokens: int | None = None) -> tuple[list[float], list[str]]:
    """Prompt with '<name> lives at' and count which private fields the greedy continuation reveals. By default
    the continuation is long enough for the longest record's rest (+4 tokens), so every field can show."""
    if max_new_tokens is None:
        max_new_tokens = 4 + max(len(tokenizer(record_text(r))["input_ids"]) - len(tokenizer(prompt(r))["input_ids"])
                                 for r in records)
    texts = generate(model, tokenizer, [prompt(r) for r in records], max_new_tokens)
    scores = [sum(getattr(r, f) in t for f in FIELDS) / len(FIELDS) for r, t in zip(records, texts)]
    return scores, texts


def revealed_others(texts: list[str], records: list[Record], everyone: list[Record]) -> list[list[str]]:
    """For each generation (for records[i]), the other people whose identifying fields it contains."""
    return [[o.name for o in everyone if o.name != r.name and any(getattr(o, f) in t for f in IDENTIFYING)]
            for r, t in zip(records, texts)]


def perplexity(model, tokenizer, texts: list[str]) -> float:
    return token_weighted_perplexity(sequence_nll(model, tokenizer, texts, max_length=128))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@contextmanager
def timed(spent: dict[str, float], part: str):
    """Adds the block's wall seconds to `spent[part]`."""
    start = time.time()
    try:
        yield
    finally:
        spent[part] += time.time() - start


def time_spent(curves: list[dict], spent: dict[str, float], leak: float, unlearn: float,
               total: float) -> dict[str, float]:
    """Where the demo's `total` wall seconds went: `spent` (loading, the table's measurements and the strangers'
    texts), each phase's training and its per-epoch checks (the curves' `check_seconds`: memorization, perplexity
    and, once due, a generation), and the rest. The unlearning's training includes FILA's Fisher pass. From the
    unrounded times: the parts are disjoint stretches of the run, so none is negative and they add up to it."""
    checks = {p: sum(c["check_seconds"] for c in curves if c["phase"] == p) for p in ("leak", "unlearn")}
    parts = {**spent, "leak training": leak - checks["leak"], "leak checks": checks["leak"],
             "unlearn training": unlearn - checks["unlearn"], "unlearn checks": checks["unlearn"]}
    parts["other"] = total - sum(parts.values())
    return {k: round(v, 3) for k, v in parts.items()}


def everyone(groups: dict[str, list[Record]]) -> list[Record]:
    """All groups' people, in `groups`' order."""
    return [r for recs in groups.values() for r in recs]


Generated = dict[str, tuple[list[float], list[str]]]   # per group: (share of fields revealed, generation) a person


def revealed(model, tokenizer, groups: dict[str, list[Record]]) -> tuple[dict, Generated]:
    """Prompted with each name, everyone in one batch: each group's share of fields revealed and how many of its
    generations name someone else (the columns of the table), and each group's scores and generations."""
    people = everyone(groups)
    generated = dict(zip(groups, by_group(groups, *leaks(model, tokenizer, people))))   # one batch: ~40% faster
    row = {}
    for name, (scores, texts) in generated.items():
        if name != "unseen":   # never trained on: nothing of their own to reveal
            row[f"{name}_leak"] = _mean(scores)
        if name != "retain":   # the never-seen people's count: what the model writes for a name it does not know
            row[f"{name}_reveals_others"] = sum(bool(o) for o in revealed_others(texts, groups[name], people))
    return row, generated


def measure(model, tokenizer, groups: dict[str, list[Record]]) -> tuple[dict, Generated]:
    """One column of the table, and each group's scores and generations (`revealed`)."""
    memorized = memorization_row(model, tokenizer, groups)
    shown, generated = revealed(model, tokenizer, groups)
    return column(memorized, shown, perplexity(model, tokenizer, GENERAL_TEXT)), generated


def column(memorized: dict[str, float], shown: dict, general_ppl: float) -> dict:
    """A column of the table from its parts: each group's memorization (`memorization_row`), what the
    generations revealed (`revealed`) and the general-text perplexity."""
    return {**{f"{name}_memorization": v for name, v in memorized.items()}, **shown, "general_ppl": general_ppl}


def by_group(groups: dict[str, list[Record]], *columns: list) -> list[tuple]:
    """Lists over all groups' people in order (`groups`' order), cut back into one tuple of lists per group."""
    out, at = [], 0
    for recs in groups.values():
        out.append(tuple(c[at:at + len(recs)] for c in columns))
        at += len(recs)
    return out


def draw_people(cfg: DemoConfig, n: int) -> list[Record]:
    """The demo's first `n` people: the three groups, then the strangers."""
    return make_records(n, seed=cfg.seed, distinct_names=cfg.distinct_names)


def make_groups(cfg: DemoConfig) -> dict[str, list[Record]]:
    drawn = draw_people(cfg, cfg.n_forget + cfg.n_retain + cfg.n_unseen)
    return {"forget": drawn[:cfg.n_forget], "retain": drawn[cfg.n_forget:cfg.n_forget + cfg.n_retain],
            "unseen": drawn[cfg.n_forget + cfg.n_retain:]}


def strangers(cfg: DemoConfig) -> list[Record]:
    """`cfg.n_strangers` people after the three groups (same seed): only their names are used."""
    return draw_people(cfg, cfg.n_forget + cfg.n_retain + cfg.n_unseen + cfg.n_strangers)[
        cfg.n_forget + cfg.n_retain + cfg.n_unseen:]


def unknown_name_texts(model, tokenizer, records: list[Record]) -> list[str]:
    """'<name> lives at' and `model`'s greedy continuation, for each record's name (given the pretrained model:
    what a model that never saw these people writes)."""
    return [first_sentence(prompt(r) + t) for r, t in zip(records, leaks(model, tokenizer, records)[1])] \
        if records else []


def memorization_row(model, tokenizer, groups: dict[str, list[Record]]) -> dict:
    """Each group's mean memorization, from one batch of everyone."""
    per_record = memorization(model, tokenizer, everyone(groups))
    return {g: _mean(m) for g, (m,) in zip(groups, by_group(groups, per_record))}


def leak(model, tokenizer, groups: dict[str, list[Record]], cfg: DemoConfig, curves: list[dict], console,
         unknown: list[str] = ()) -> None:
    """Fine-tune `model` in place on the forget and retain people's records (and general paragraphs) until,
    prompted with a name, it reveals `cfg.leak_target` of both groups' fields; one line per epoch in `curves`.
    `unknown` (texts for names without a record, `unknown_name_texts`) are trained beside the records. Its checks
    generate for the two groups it trains only: the stop decision, on which the rest of the run depends, is judged
    on that batch as it always was (the table's leaked column is measured apart, for everyone)."""
    known = groups["forget"] + groups["retain"]
    console.print(f"[bold]2. Leak[/]: fine-tune on {len(known)} private records (and {cfg.leak_general} general "
                  f"paragraphs) until, prompted with a name, the model reveals {cfg.leak_target:.0%} of their fields")

    def leaked(epoch, m):
        start = time.time()
        row = {**memorization_row(m, tokenizer, groups), "general_ppl": perplexity(m, tokenizer, GENERAL_TEXT)}
        said = (f"memorization forget {row['forget']:.3f} retain {row['retain']:.3f} unseen {row['unseen']:.3f}; "
                f"general-text perplexity {row['general_ppl']:.1f}")
        if min(row["forget"], row["retain"]) >= LEAK_GATE:   # below it prompts reveal little: save the time
            known = {g: groups[g] for g in ("forget", "retain")}
            scores = by_group(known, leaks(m, tokenizer, known["forget"] + known["retain"])[0])
            row.update({f"{g}_leak": _mean(s) for g, (s,) in zip(known, scores)})
            said += f"; fields revealed forget {row['forget_leak']:.2f} retain {row['retain_leak']:.2f}"
        curves.append({"phase": "leak", "epoch": epoch, **row, "check_seconds": time.time() - start})
        console.print(f"   epoch {epoch}: {said}")
        return {"stop": min(row.get("forget_leak", 0.0), row.get("retain_leak", 0.0)) >= cfg.leak_target - TIE}

    feats = tokenize_examples([{"text": t} for t in [record_text(r) for r in known] + list(unknown)], tokenizer, 128)
    general = tokenize_examples([{"text": t} for t in general_paragraphs(cfg.leak_general)], tokenizer, 128)
    train_only(model, cfg.leak_modules)
    finetune(model, feats, tokenizer.pad_token_id, epochs=cfg.leak_max_epochs, lr=cfg.leak_lr,
             batch_size=cfg.leak_batch_size, seed=cfg.seed, mixed_precision=cfg.mixed_precision, callback=leaked,
             description="leak", mixed=general or None)
    model.requires_grad_(True)   # as loaded: FILA's Fisher statistics take gradients of every weight it adapts


def forget(model, tokenizer, groups: dict[str, list[Record]], cfg: DemoConfig, curves: list[dict], console,
           leaked: dict, out: Path | None, unknown: list[str] = (), **unlearn_settings):
    """Unlearn the forget people's private values from (a copy of) the leaked `model` until they are not
    revealed, their generations name nobody else, they are memorized no better than never-seen people's (in
    `leaked`, the leaked model's column of the table), the retain people still reveal `cfg.leak_target` of their
    fields and general-text perplexity is within `cfg.ppl_limit` of the leaked model's (or the epochs run out).
    Returns loku's UnlearnResult, the UnlearnConfig it ran and the last epoch's check as a column of the table
    (None if it did not generate). `unknown`: texts for names without a record (`unknown_name_texts`) kept beside
    the retain records. `unlearn_settings`: further UnlearnConfig fields (benchmarks/demo_tuning.py)."""
    console.print(f"[bold]3. Unlearn[/] the {cfg.n_forget} forget people's private values with {cfg.method} until "
                  "they are not revealed")

    threshold, ppl_limit, last = leaked["unseen_memorization"], cfg.ppl_limit * leaked["general_ppl"], [None]

    def forgotten(epoch, m):
        start = time.time()
        memorized, ppl = memorization_row(m, tokenizer, groups), perplexity(m, tokenizer, GENERAL_TEXT)
        row, last[0] = {**memorized, "general_ppl": ppl}, None
        said = (f"memorization forget {row['forget']:.3f} retain {row['retain']:.3f} (target: forget <= never-seen "
                f"{threshold:.3f}); general-text perplexity {ppl:.1f} (target <= {ppl_limit:.1f})")
        if row["forget"] <= threshold:   # all must hold: generate only once the cheap one does (same decision)
            shown, generated = revealed(m, tokenizer, groups)   # as `measure`: the generations the table reports
            row.update(shown)
            last[0] = column(memorized, shown, ppl), generated
            said += (f"; fields revealed forget {row['forget_leak']:.2f} (target <= {cfg.forget_target:.2f}) retain "
                     f"{row['retain_leak']:.2f} (target >= {cfg.leak_target:.2f}); forget generations naming someone "
                     f"else {row['forget_reveals_others']} (target 0)")
        curves.append({"phase": "unlearn", "epoch": epoch, **row, "check_seconds": time.time() - start})
        console.print(f"   epoch {epoch}: {said}")
        done = row["forget"] <= threshold and row["forget_leak"] <= cfg.forget_target + TIE \
            and row["forget_reveals_others"] == 0 and row["retain_leak"] >= cfg.leak_target - TIE \
            and ppl <= ppl_limit
        return {"stop": done, **{f"{g}_memorization": v for g, v in row.items() if g in groups}}

    # records: every step keeps every retain person's record and stranger's text (a retain person's values are what
    # a forget step hits) and cfg.retain_general sentences, streamed from cfg.retain_pool (or the same ones)
    retain, batch = None, {}   # None: loku's built-in general text
    if cfg.retain == "records":
        people = [record_text(r) for r in groups["retain"]] + list(unknown)
        streamed = 0 < cfg.retain_general < cfg.retain_pool
        retain = people + general_paragraphs(cfg.retain_pool if streamed else cfg.retain_general)
        batch = {"retain_batch_size": len(people) + cfg.retain_general if streamed else len(retain),
                 "retain_every_step": len(people) if streamed else 0}
    ucfg = UnlearnConfig(**{
        "model": cfg.model, "method": cfg.method, "lora_rank": cfg.lora_rank, "epochs": cfg.unlearn_max_epochs,
        "lr": cfg.unlearn_lr, "batch_size": cfg.unlearn_batch_size, "retain_weight": cfg.retain_weight,
        **batch, "seed": cfg.seed,
        "mixed_precision": cfg.mixed_precision,
        "lora_targets": mlp_linear_names(model) if cfg.unlearn_modules == "mlp" else None,
        "out": str(out / "unlearned") if out is not None else "",
        **({"ihl_retain_loss": cfg.ihl_retain_loss} if cfg.method == "ihl" else {}), **unlearn_settings})
    result = unlearn(ucfg, model, tokenizer, callbacks=[forgotten], retain=retain,
                     forget=value_features(tokenizer, groups["forget"]))
    return result, ucfg, last[0]


def run_demo(cfg: DemoConfig) -> dict:
    console = Console()
    out = io.start_out_dir(cfg.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    t0, spent = time.time(), {"load": 0.0, "measure": 0.0}
    cfg = replace(cfg, mixed_precision=launch_precision(cfg.mixed_precision))   # "auto" resolved once, here
    groups = make_groups(cfg)
    console.print(f"[bold]1. Load[/] {cfg.model}")
    with timed(spent, "load"):
        model, tokenizer = load_model(cfg.model)
    with timed(spent, "measure"):
        base = measure(model, tokenizer, groups)[0]
        unknown = unknown_name_texts(model, tokenizer, strangers(cfg))
    curves: list[dict] = []
    t_leak = time.time()
    leak(model, tokenizer, groups, cfg, curves, console, unknown)
    t_leak = time.time() - t_leak
    with timed(spent, "measure"):
        before, shown_before = measure(model, tokenizer, groups)
    result, ucfg, unlearned = forget(model, tokenizer, groups, cfg, curves, console, before, out, unknown)
    with timed(spent, "measure"):   # the unlearning's last check is the column when it measured one
        after, shown_after = unlearned or measure(result.model, tokenizer, groups)
    texts_before, texts_after = shown_before["forget"][1], shown_after["forget"][1]
    others = revealed_others(texts_after, groups["forget"], everyone(groups))
    total = time.time() - t0

    report = {"config": asdict(cfg), "mixed_precision": cfg.mixed_precision, "out": str(out),
              "init": ucfg.resolved_init, "retain": ucfg.retain or "records",
              "base": base, "leaked": before, "unlearned": after,
              "leak_seconds": round(t_leak, 1), "leak_epochs": sum(c["phase"] == "leak" for c in curves),
              "unlearn_seconds": round(result.seconds, 1), "unlearn_epochs": result.epochs_run,
              "total_seconds": round(total, 1), "cpu_seconds": round(time.process_time(), 1),
              "curves": curves, "samples": [
                  {"prompt": prompt(r), "truth": record_text(r), "before": b, "after": a, "reveals_others": o}
                  for r, b, a, o in zip(groups["forget"], texts_before, texts_after, others)]}
    report["seconds"] = time_spent(curves, spent, t_leak, result.seconds, total)
    io.write_json(out / "report.json", report)
    plot_curves(curves, before["unseen_memorization"], out / "curves.png")
    io.write_manifest(out)
    print_report(console, cfg, report, ucfg.resolved_init)
    return report


def print_report(console, cfg: DemoConfig, report: dict, init: str) -> None:
    table = Table(title=f"loku demo: {cfg.model}, {cfg.method} ({init} LoRA r={cfg.lora_rank}), retain: "
                        f"{report['retain']}")
    for col in ("", "pretrained", "after leak", "after unlearning"):
        table.add_column(col, justify="right")
    rows = [("forget fields revealed", "forget_leak"), ("forget memorization", "forget_memorization"),
            ("retain fields revealed", "retain_leak"), ("retain memorization", "retain_memorization"),
            ("never-seen memorization", "unseen_memorization"), ("general-text perplexity", "general_ppl")]
    console.print("memorization: of the private values' tokens (greedy next token given the true record)")
    columns = (report["base"], report["leaked"], report["unlearned"])
    for label, key in rows:
        table.add_row(label, *(f"{c[key]:.3f}" if key != "general_ppl" else f"{c[key]:.1f}" for c in columns))
    for group in ("forget", "unseen"):
        table.add_row(f"{'forgotten' if group == 'forget' else 'never-seen'} people's generations naming someone "
                      "else", "", *(str(c[f"{group}_reveals_others"]) for c in columns[1:]))
    table.add_row("epochs / seconds", "", f"{report['leak_epochs']} / {report['leak_seconds']:.0f}",
                  f"{report['unlearn_epochs']} / {report['unlearn_seconds']:.0f}")
    console.print(table)
    for s in report["samples"][:2]:
        console.print(f"[bold]{s['prompt']}[/]\n  before: {s['before'].strip()[:160]}\n  after:  "
                      f"{s['after'].strip()[:160]}")
    n = sum(bool(s["reveals_others"]) for s in report["samples"])
    console.print(f"after unlearning, {n} of {len(report['samples'])} generations for forgotten people reveal "
                  "another person's address, phone, email or account (never-seen people: "
                  f"{report['unlearned']['unseen_reveals_others']} of {report['config']['n_unseen']}: what the "
                  "model writes for a name it does not know)")
    out = report["out"]
    console.print(f"wrote {out}/report.json, {out}/curves.png, adapter in {out}/unlearned "
                  f"({report['total_seconds']:.0f} s in all: " + ", ".join(
                      f"{part} {s:.0f}" for part, s in report["seconds"].items()) + ")")


def plot_curves(curves: list[dict], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(1, len(curves) + 1))
    n_leak = sum(c["phase"] == "leak" for c in curves)
    for group, color in (("forget", "tab:red"), ("retain", "tab:blue"), ("unseen", "tab:gray")):
        ax.plot(xs, [c[group] for c in curves], marker="o", color=color, label=group)
        if group != "unseen":
            pts = [(x, c[f"{group}_leak"]) for x, c in zip(xs, curves) if f"{group}_leak" in c]
            bx.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=color, label=group)
    ax.axhline(threshold, color="tab:gray", linestyle="--", linewidth=0.8, label="never-seen level")
    ax.set_ylabel("memorization accuracy")
    bx.set_ylabel("private fields revealed (prompt: name)")
    for a in (ax, bx):
        a.axvline(n_leak + 0.5, color="black", linestyle=":", label="start of unlearning")
        a.set_xlabel("epoch (leak, then unlearn)")
    bx.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
