"""The utility-evaluation sets of the TDEC protocol (Jang et al. 2023, reused by LoKU), read into plain items.

Each task has one small `row -> item` converter that holds its prompt format, so the format can be read
(and tested) in one place and is shared by the local files and the Hugging Face hub. The formats are
Jang et al.'s (github joeljang/knowledge-unlearning, `Datasets.py`); the few deviations are noted where
they happen. Items keep the order of the file, so `limit=N` means "the first N items", as in the paper's
tables and in lm-evaluation-harness.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import LokuError
from ..registry import Registry
from .sources import HubCopy, PublicData, find


@dataclass(frozen=True)
class MultipleChoice:
    """Score every `context + option` and predict the most likely option; `gold` indexes `options`."""
    context: str
    options: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Completion:
    """Correct when greedy decoding after `context` reproduces exactly the tokens of `target` (LAMBADA)."""
    context: str
    target: str


@dataclass(frozen=True)
class Dialogue:
    """Generate a reply to `prompt` (the conversation so far) and compare it with the real `target` turn."""
    prompt: str
    target: str


# ---------------------------------------------------------------- row -> item (the prompt formats)

def piqa_item(row) -> MultipleChoice:
    """Jang et al.: the bare goal, each solution after a space (no "Question:/Answer:" template)."""
    return MultipleChoice(row["goal"], (" " + row["sol1"], " " + row["sol2"]), int(row["label"]))


def hellaswag_item(row) -> MultipleChoice:
    """Jang et al.: raw `ctx` and ` ending` (no bracket clean-up, unlike lm-evaluation-harness)."""
    return MultipleChoice(row["ctx"], tuple(" " + e for e in row["endings"]), int(row["label"]))


def arc_item(row) -> MultipleChoice | None:
    """Bare question, ` choice`. Rows without exactly 4 choices are dropped, as Jang et al. do (570 -> 567
    for ARC-Easy, 299 -> 295 for ARC-Challenge): their batching needed a fixed number of options."""
    texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
    if len(texts) != 4:
        return None
    return MultipleChoice(row["question"], tuple(" " + t for t in texts), labels.index(row["answerKey"]))


def copa_item(row) -> MultipleChoice:
    """Jang et al.: the premise alone, then ` choice`; no "because"/"therefore" connector for the question
    type (lm-evaluation-harness adds one), so cause and effect questions read the same."""
    return MultipleChoice(row["premise"], (" " + row["choice1"], " " + row["choice2"]), int(row["label"]))


def winogrande_item(row) -> MultipleChoice:
    """Jang et al.: context = the sentence before the blank; option = ` name` + the rest of the sentence,
    so the whole option continuation is scored (full scoring, not lm-eval's partial scoring)."""
    sentence = row["sentence"]
    cut = sentence.index("_")
    context, rest = sentence[:cut].rstrip(" "), sentence[cut + 1:]
    return MultipleChoice(context, (" " + row["option1"] + rest, " " + row["option2"] + rest),
                          int(row["answer"]) - 1)


MATHQA_OPTION = re.compile(r"[abcd] \) .*?, |e \) .*?$")


def mathqa_item(row) -> MultipleChoice:
    """Jang et al.: the problem text, then an option value appended WITHOUT a leading space (their regex
    strips "a ) " and the trailing " ,"). Kept for comparability although it glues e.g. ":" and "12"."""
    options = tuple(m[4:].rstrip(" ,") for m in MATHQA_OPTION.findall(row["options"]))
    if len(options) != 5:
        raise LokuError(f"MathQA options {row['options']!r} do not parse into 5 choices a-e: check the file")
    problem = row["Problem"] if "Problem" in row else row["problem"]
    return MultipleChoice(problem, options, "abcde".index(row["correct"]))


def pubmedqa_item(row) -> MultipleChoice:
    """Jang et al.: "Context: <abstract>\\nQuestion: <question>\\nAnswer:" then ` yes` / ` maybe` / ` no`.
    Their `abstract` column is the FIRST passage of the hub's `context.contexts` (the background section),
    not the whole abstract; the hub path reproduces that."""
    hub = "abstract" not in row and "context" in row
    abstract = row["context"]["contexts"][0] if hub else row["abstract"]
    prompt = f"Context: {abstract}\nQuestion: {row['question']}\nAnswer:"
    return MultipleChoice(prompt, (" yes", " maybe", " no"), ["yes", "maybe", "no"].index(row["final_decision"]))


def lambada_item(row) -> Completion:
    """Jang et al.: split on single spaces; target = " " + the last word, context = the words before it."""
    words = row["text"].split(" ")
    return Completion(" ".join(words[:-1]), " " + words[-1])


def normalize_reply(text: str) -> str:
    """Jang et al.'s turn clean-up (from ParlAI): lower-case, re-capitalise sentence starts and "I",
    attach punctuation to the word before it, end with a period. Applied to every turn and the target,
    so that the reference reply and the prompt look like what the model is asked to continue."""
    pairs = [(" .", "."), (" ,", ","), (" ?", "?"), (" !", "!"), (" ' ", "'")]
    text = text.lower()
    for spaced, tight in pairs:  # first separate punctuation from words ...
        text = text.replace(tight, spaced).replace("  ", " ")
    words = text.split(" ")
    for i, w in enumerate(words):
        if i == 0 or w in ("i", "i'm", "i've", "i'll", "i'd"):
            words[i] = w[:1].upper() + w[1:]
        elif w in "?.!" and i < len(words) - 1:  # `in` on a string: also true for "" (Jang et al. do the same)
            words[i + 1] = words[i + 1][:1].upper() + words[i + 1][1:]
    text = " " + " ".join(words) + " "
    for spaced, tight in pairs:  # ... then glue it back
        text = text.replace(spaced, tight)
    text = text.strip().replace("  ", " ")
    if text and text[-1] not in "!.?)\"'":
        text += "."
    return text


def dialogue_prompt(turns: list[str]) -> str:
    """Jang et al.: one "User 1: ..." / "User 2: ..." line per turn, then the speaker label of the turn to
    generate ("User 1:" or "User 2:", no trailing space)."""
    lines = [f"User {1 + i % 2}: {normalize_reply(t)}\n" for i, t in enumerate(turns)]
    return "".join(lines) + f"User {1 + len(turns) % 2}:"


def dialogue_item(turns) -> Dialogue:
    turns = list(turns)
    return Dialogue(dialogue_prompt(turns[:-1]), normalize_reply(turns[-1]))


def _text_item(row) -> str | None:
    """A perplexity set's item is its text; blank ones are skipped (nothing to predict)."""
    text = str(row["text"])
    return text if text.strip() else None


# ---------------------------------------------------------------- the task table

@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                    # "choice", "completion", "dialogue" or "ppl"
    path: str                    # relative to the eval data dir
    convert: Callable | None     # row -> item, or None to drop the row; None here: the row's text
    hub: tuple | None = None     # (dataset id, config, split) on the Hugging Face hub, when one exists
    note: str = ""


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("piqa", "choice", "reasoning/piqa", piqa_item, ("ybisk/piqa", None, "validation")),
    TaskSpec("hellaswag", "choice", "reasoning/hellaswag", hellaswag_item, ("Rowan/hellaswag", None, "validation")),
    TaskSpec("arc_easy", "choice", "reasoning/arc_easy", arc_item, ("allenai/ai2_arc", "ARC-Easy", "validation")),
    TaskSpec("arc_challenge", "choice", "reasoning/arc_challenge", arc_item,
             ("allenai/ai2_arc", "ARC-Challenge", "validation")),
    TaskSpec("copa", "choice", "reasoning/copa", copa_item, ("aps/super_glue", "copa", "validation")),
    TaskSpec("winogrande", "choice", "reasoning/winogrande", winogrande_item,
             ("allenai/winogrande", "winogrande_s", "validation")),
    TaskSpec("mathqa", "choice", "reasoning/mathqa_test_subset.jsonl", mathqa_item,
             ("allenai/math_qa", None, "validation"),
             note="test subset, n=1000 (Jang et al. used the validation split; the hub source gives it)"),
    TaskSpec("pubmedqa", "choice", "reasoning/pubmed_qa.csv", pubmedqa_item,
             ("qiaojin/PubMedQA", "pqa_labeled", "train"),
             note="Jang et al.'s 500-question file; the hub source is the full 1000-question pqa_labeled"),
    TaskSpec("lambada", "completion", "reasoning/lambada.csv", lambada_item,
             ("EleutherAI/lambada_openai", "default", "test"),
             note="Jang et al.'s 4992-passage file; the hub source is lambada_openai (5153)"),
    *[TaskSpec(n, "dialogue", f"dialogue/{n}.json", dialogue_item)
      for n in ("wizard_of_wikipedia", "empathetic_dialogues", "blended_skill_talk", "wizard_of_internet")],
    TaskSpec("pile", "ppl", "ppl/pile.csv", None),
    TaskSpec("wikitext", "ppl", "ppl/wikitext.csv", None),
]}
TASK_REGISTRY: Registry[TaskSpec] = Registry("evaluation task")
for _spec in TASKS.values():
    TASK_REGISTRY.register(_spec.name, _spec)
REASONING_TASKS = [n for n, t in TASKS.items() if t.kind in ("choice", "completion")]
DIALOGUE_TASKS = [n for n, t in TASKS.items() if t.kind == "dialogue"]
PPL_TASKS = [n for n, t in TASKS.items() if t.kind == "ppl"]


# ---------------------------------------------------------------- reading files

def task_data(spec: TaskSpec) -> PublicData:
    """The task as a public data set: eval/<path> in a data folder, or its hub copy (loku.data.sources)."""
    return PublicData(f"TDEC utility task {spec.name}", f"eval/{spec.path}", HubCopy(*spec.hub) if spec.hub else None,
                      "Jang et al. 2023's validation_data/ files, joeljang/knowledge-unlearning")


def _read_rows(path: Path) -> Iterable:
    """Rows as dict-likes. Jang et al. drop rows with any missing field (`dropna`); we do the same."""
    if path.is_dir():
        from datasets import load_from_disk

        return iter(load_from_disk(str(path)))
    import pandas as pd

    if path.suffix == ".csv":
        return (r for _, r in pd.read_csv(path, lineterminator="\n").dropna().iterrows())
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":  # {"text": {"0": [turns...], ...}}: one dialogue per key
        frame = pd.read_json(path).dropna()
        return iter(frame["text"]) if "text" in frame else iter([])
    raise LokuError(f"{path}: unknown file type (expected a save_to_disk folder, .csv, .jsonl or .json)")


def load_task(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list:
    """The first `limit` items of a task: `MultipleChoice`/`Completion`/`Dialogue` items, or the texts of a
    perplexity set. The data comes from `data_dir` (else $LOKU_DATA), else the task's hub copy
    (`loku.data.sources.find`)."""
    return load_task_from(name, data_dir, limit)[0]


def load_task_from(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> tuple[list, str]:
    """`load_task`, and where the items came from (a file or folder, or the hub dataset)."""
    spec = TASK_REGISTRY[name]
    if limit is not None and limit < 1:
        raise LokuError(f"limit must be a positive number of items, got {limit}: pass at least 1")
    found = find(task_data(spec), data_dir)
    where = found.where
    read = (lambda: _read_rows(found.path)) if found.path is not None else (lambda: iter(found.rows))  # noqa: E731
    convert = spec.convert or _text_item
    items, i = [], 0
    try:
        for i, row in enumerate(read()):
            item = convert(row)
            if item is not None:
                items.append(item)
            if limit is not None and len(items) >= limit:
                break
    except KeyError as e:
        raise LokuError(f"{where}: row {i} has no field {e}: restore the file from the public data") from e
    except (ValueError, OSError) as e:  # empty or corrupt csv/json, unreadable folder
        raise LokuError(f"cannot read {where} ({type(e).__name__}: {e}): restore it from the public data") from e
    if not items:
        raise LokuError(f"task {name!r}: {where} holds no usable rows: restore the file from the public data")
    return items, where
