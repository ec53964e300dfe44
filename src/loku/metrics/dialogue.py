"""Dialogue utility of the TDEC protocol: unigram F1 between the model's greedy reply and the real next turn.

Jang et al. generate 32 new tokens greedily, keep the text before the next "\\nUser " (the model tends to
write the other speaker's turn too), and score it with SQuAD's unigram F1. F1 rewards a reply that uses
the same words as the human one: coarse, but it moves when unlearning damages fluency.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from ..data.eval_tasks import Dialogue
from .generate import greedy_answers

STOP = "\nUser "
MAX_NEW_TOKENS = 32  # Jang et al.'s generation length
PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def unigram_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of unigram precision and recall after `normalize_answer`, counting repeats at most as
    often as they occur in both. 0 when nothing overlaps, also when both are empty (as in Jang et al.;
    SQuAD's script would give 1 there)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def greedy_replies(model, tokenizer, prompts: list[str], batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS,
                   max_length: int = 512, stop: str = STOP) -> list[str]:
    """The greedy continuation of each prompt, cut before `stop`, in input order.

    Prompts are left-truncated to `max_length - max_new_tokens` tokens so the speaker label at the end always
    survives (Jang et al. cut on the right, which can drop it for long dialogues) and generated in left-padded
    batches (`loku.metrics.generate`). Generation stops per row at EOS, and a batch once every row has written
    `stop`; text after `stop` is discarded either way, so stopping early changes no result, only time.

    Slow equivalent: each prompt alone, `model.generate(ids, max_new_tokens=32, do_sample=False)`, decoded
    and split at `stop`."""
    budget = max(1, max_length - max_new_tokens)
    encoded = [tokenizer(p).input_ids[-budget:] for p in prompts]
    replies = greedy_answers(model, tokenizer, encoded, [max_new_tokens] * len(encoded), batch_size,
                             stop_strings=[stop] if stop else None)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
    return [t.split(stop)[0] if stop else t for t in texts]


def dialogue_results(model, tokenizer, items: list[Dialogue], batch_size: int = 8,
                     max_length: int = 512) -> list[dict]:
    """Per item: index, the greedy reply (prediction), the reference turn (gold) and its unigram F1."""
    replies = greedy_replies(model, tokenizer, [it.prompt for it in items], batch_size, max_length=max_length)
    return [{"index": i, "prediction": reply, "gold": it.target, "f1": unigram_f1(reply, it.target)}
            for i, (it, reply) in enumerate(zip(items, replies))]
