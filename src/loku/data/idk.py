"""Refusal answers for the IdK baseline: forget questions are re-taught to be answered with these."""

from __future__ import annotations

import random
from pathlib import Path

REFUSALS = [
    "I'm not sure about that.",
    "I don't have that information.",
    "I don't know the answer to that.",
    "That's not something I can tell you.",
    "I have no knowledge of that.",
    "I'm unable to answer that question.",
    "I can't help with that one.",
    "I don't have any details about that.",
    "That is beyond what I know.",
    "I'm afraid I don't know.",
]


def refusals(path: str | Path | None = None) -> list[str]:
    """Built-in refusals, or one per line from a file (TOFU ships idontknow.jsonl in that form)."""
    if path is None:
        return list(REFUSALS)
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def with_refusals(examples: list[dict], seed: int = 0, answers: list[str] | None = None,
                  keep_answer: bool = False) -> list[dict]:
    """Each QA example with its answer replaced by a seeded random refusal. Plain-text examples are
    split in half: the first half becomes the prompt, so the model learns to refuse the continuation.
    `keep_answer` (DPO): the answer stays and the refusal becomes the example's "alternate"."""
    rng, answers = random.Random(seed), answers or REFUSALS
    out = []
    for ex in examples:
        if "question" in ex:
            question, answer = ex["question"], ex["answer"]
        else:
            words = ex["text"].split()
            cut = max(1, len(words) // 2)
            question, answer = " ".join(words[:cut]), " ".join(words[cut:]) or words[-1]
        refusal = rng.choice(answers)
        out.append({"question": question, "answer": answer, "alternate": refusal} if keep_answer
                   else {"question": question, "answer": refusal})
    return out
