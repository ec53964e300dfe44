"""Paraphrased probes: is the data gone, or only its exact wording?

A model that forgot a passage only for its exact prefix still completes it from a slightly different one, and a
model that forgot a QA pair only for its exact question still answers a rephrased one. The probes here change
the prompt and keep the scored part (the continuation, the answer) as it was, so the teacher-forced metrics
(ES, EM, membership scores) measure how much of the same target is still extracted.

QA data: TOFU's `paraphrased_question` (in `forgetXX_perturbed.json`) replaces the question; rows without
the field (TOFU's holdout sets have none) keep their question.

Plain text: each sequence x (T tokens) is split into a prefix x_<P, P = round(prefix_fraction x T), and the
continuation x_P..x_{T-1}, which is scored. The prefix is re-tokenized or lightly perturbed, deterministically
(a random.Random seeded by (seed, kind, row)):
- `retokenize`: the same prefix string, cut at random character positions (each with probability `rate`, at
  least one cut) and each piece tokenized alone: the same text under other token boundaries. For byte-level
  BPE tokenizers (GPT-2, SmolLM2, Llama 3) it decodes to the same string; SentencePiece tokenizers may add a
  space at each cut.
- `case`: the first letter of each word (a run of letters) has its case flipped with probability `rate`.
- `whitespace`: each space becomes two spaces with probability `rate`; each newline gets a space before it
  with probability `rate`.
- `punctuation`: each ASCII punctuation character is deleted with probability `rate`.
Every kind but `retokenize` changes at least one character when the prefix has something to change (if no
position was drawn, one is drawn uniformly). `exact` is the unperturbed prefix, the baseline.
"""

from __future__ import annotations

import random
import re
import string

from ..errors import LokuError

TEXT_KINDS = ("retokenize", "case", "whitespace", "punctuation")
QA_KIND = "paraphrased_question"
_WORD = re.compile(r"[A-Za-z]+")


def _rng(seed: int, kind: str, row: int) -> random.Random:
    return random.Random(f"{seed}/{kind}/{row}")  # str seeds hash deterministically (sha512), across runs


def _pick(positions: list[int], rng: random.Random, rate: float) -> list[int]:
    """Each position with probability `rate`; at least one when there is any."""
    chosen = [p for p in positions if rng.random() < rate]
    return chosen or ([rng.choice(positions)] if positions else [])


def perturb(text: str, kind: str, rng: random.Random, rate: float = 0.15) -> str:
    """A lightly perturbed copy of `text` (see the module docstring); `retokenize` leaves the string as it is."""
    if kind == "case":
        starts = _pick([m.start() for m in _WORD.finditer(text)], rng, rate)
        chars = list(text)
        for i in starts:
            chars[i] = chars[i].swapcase()
        return "".join(chars)
    if kind == "whitespace":
        spots = _pick([i for i, c in enumerate(text) if c in " \n"], rng, rate)
        chars = list(text)
        for i in spots:
            chars[i] = "  " if text[i] == " " else " \n"
        return "".join(chars)
    if kind == "punctuation":
        drop = set(_pick([i for i, c in enumerate(text) if c in string.punctuation], rng, rate))
        return "".join(c for i, c in enumerate(text) if i not in drop)
    if kind == "retokenize":
        return text
    from ..registry import unknown_choice

    raise unknown_choice("prefix perturbation", kind, TEXT_KINDS)


def retokenized(tokenizer, text: str, rng: random.Random, rate: float = 0.15) -> list[int]:
    """`text` tokenized in pieces cut at random character positions (at least one cut): other token boundaries."""
    cuts = sorted(set(_pick(list(range(1, len(text))), rng, rate)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    return [t for piece in pieces for t in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def prefix_probes(tokenizer, sequences: list[list[int]], kind: str, *, prefix_fraction: float = 0.5,
                  rate: float = 0.15, seed: int = 0) -> list[dict]:
    """Features whose prompt is the (perturbed) prefix of each sequence and whose scored part is its original
    continuation: {"input_ids": prompt + x_P.., "labels": [-100] x len(prompt) + x_P..}. `kind`: "exact" or one
    of TEXT_KINDS."""
    if not 0 < prefix_fraction < 1:
        raise LokuError(f"prefix fraction must be between 0 and 1, got {prefix_fraction}: e.g. 0.5 (half the "
                        "sequence is the prompt)")
    if kind != "exact" and kind not in TEXT_KINDS:
        from ..registry import unknown_choice

        raise unknown_choice("prefix perturbation", kind, ("exact",) + TEXT_KINDS)
    out = []
    for row, x in enumerate(sequences):
        if len(x) < 3:
            raise LokuError(f"sequence {row + 1} has {len(x)} tokens; a prefix probe needs at least 3: drop it")
        p = min(max(1, round(prefix_fraction * len(x))), len(x) - 1)
        prefix, continuation = x[:p], x[p:]
        if kind != "exact":
            rng = _rng(seed, kind, row)
            text = tokenizer.decode(prefix, clean_up_tokenization_spaces=False)
            prefix = retokenized(tokenizer, text, rng, rate) if kind == "retokenize" else \
                tokenizer(perturb(text, kind, rng, rate), add_special_tokens=False)["input_ids"]
            prefix = prefix or x[:1]
        out.append({"input_ids": prefix + continuation, "labels": [-100] * len(prefix) + continuation})
    return out


def question_probes(tokenizer, rows: list[dict], *, max_length: int, paraphrased: list[str | None],
                    prompt_format: str = "auto") -> list[dict]:
    """QA features with each row's paraphrased question where it has one (else its own question); the answer is
    scored as in training (loku.data.qa.format_qa in `prompt_format`)."""
    from ..data.qa import format_qa

    return [format_qa(tokenizer, p if p else r["question"], r["answer"], max_length, prompt_format)
            for r, p in zip(rows, paraphrased)]


def read_field(path, field: str) -> list[str | None]:
    """The value of `field` in each record of a .json/.jsonl/.csv data file, in the order loku's loader reads
    them (None where a record lacks it); a .txt/.raw file has no fields (all None)."""
    import csv
    import io
    import json
    from pathlib import Path

    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        decoder, rows, pos = json.JSONDecoder(), [], 0
        while pos < len(text):   # one JSON array, or several back to back (TOFU)
            if text[pos].isspace():
                pos += 1
                continue
            chunk, pos = decoder.raw_decode(text, pos)
            rows.extend(chunk if isinstance(chunk, list) else [chunk])
    else:
        return [None] * sum(1 for line in text.splitlines() if line.strip())
    return [r.get(field) if isinstance(r, dict) and r.get(field) not in ("", None) else None for r in rows]

