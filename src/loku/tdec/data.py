"""TDEC sequences: texts re-tokenized with the model's own tokenizer and cut to a fixed number of tokens.

Jang et al. measure MA and EL_n on 200-token GPT-Neo sequences. Another model tokenizes the same text
differently, so each text is tokenized again (no special tokens) and cut to `max_tokens`; sequences of
equal length are then scored as (B, T) rows with no padding. A sequence needs at least n + 1 tokens
for EL_n to be defined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..data.sources import WIKITEXT2_TEST, find, tdec_forget_set
from ..data.text import load_examples
from ..errors import LokuError

TDEC_FILES = [f"lm_extraction_32_{k}.csv" for k in range(5)]  # the paper's 32-sequence forget sets
TDEC_SET = re.compile(r"lm_extraction_\d+_\d+")                # a TDEC set named without its folder


def text_file(value: str | Path, data_dir: str | Path | None = None) -> Path:
    """A text file to read: the path itself when it exists, else a TDEC set named by its file name
    (`lm_extraction_32_0` or `lm_extraction_32_0.csv`), looked up in the data folder (loku.data.sources)."""
    path = Path(value).expanduser()
    name = path.name.removesuffix(".csv")
    if path.exists() or path.parent != Path(".") or not TDEC_SET.fullmatch(name):
        return path    # a missing path is reported by the reader, naming it
    return find(tdec_forget_set(name), data_dir).path


def retain_examples(data_dir: str | Path | None = None) -> list[dict]:
    """WikiText-2 raw test (the paper's retain set) as text examples, one per non-empty line, from the data
    folder, loku's own copy, or the hub (loku.data.sources)."""
    found = find(WIKITEXT2_TEST, data_dir)
    if found.path is not None:
        return load_examples(found.path, "text")
    # the hub's rows are the file's lines, each with its "\n" and the empty ones too
    return [{"text": t.rstrip("\r\n")} for t in found.rows["text"] if t.strip()]


@dataclass
class Sequences:
    """Token sequences of one file, each cut to at most `max_tokens` tokens."""

    path: str
    rows: list[int]                        # 1-based index of each kept sequence among the file's rows
    ids: list[list[int]]                   # token ids, no special tokens, len in [min_tokens, max_tokens]
    max_tokens: int
    skipped: list[int] = field(default_factory=list)  # rows too short to measure (only when skipping)

    def __len__(self) -> int:
        return len(self.ids)

    def texts(self, tokenizer) -> list[str]:
        """The cut sequences as text: what unlearning trains on (it tokenizes them again)."""
        return [tokenizer.decode(x, clean_up_tokenization_spaces=False) for x in self.ids]

    def shape(self) -> str:
        lengths = sorted({len(x) for x in self.ids})
        span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        return f"{len(self.ids)} sequences x {span} tokens"


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """Plain texts of a .csv/.jsonl/.txt/.raw file (loku's loader: missing column, bad row -> LokuError)."""
    examples = load_examples(path, text_column)
    if "text" not in examples[0]:
        raise LokuError(f"{path} holds question/answer pairs, but TDEC measures plain text: pass --text-column "
                        "with the column that holds the sequences")
    return [e["text"] for e in examples]


def tokenize_sequences(texts: list[str], tokenizer, *, max_tokens: int = 200, n: int = 10, path: str = "data",
                       limit: int | None = None, skip_short: bool = False, min_tokens: int | None = None) -> Sequences:
    """Tokenize (no special tokens) and cut each text to `max_tokens`; keep the first `limit` sequences.

    A text with fewer than `min_tokens` (default n + 1) tokens is a LokuError naming its row, or, with
    `skip_short` (held-out text such as WikiText, whose headings are a few tokens), is skipped and listed."""
    min_tokens = n + 1 if min_tokens is None else min_tokens
    if min_tokens < n + 1:
        raise LokuError(f"min_tokens {min_tokens} is too short for EL_{n}: use at least {n + 1}")
    if max_tokens < min_tokens:
        raise LokuError(f"--max-tokens {max_tokens} is too short for EL_{n}: use at least {min_tokens}")
    if limit is not None and limit < 1:
        raise LokuError(f"the number of sequences must be positive, got {limit}: pass --rows 1 or more")
    seqs = Sequences(str(path), [], [], max_tokens)
    for i, text in enumerate(texts, start=1):
        if limit is not None and len(seqs.ids) == limit:
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) >= min_tokens:
            seqs.rows.append(i)
            seqs.ids.append(ids)
        elif skip_short:
            seqs.skipped.append(i)
        else:
            raise LokuError(f"{path} row {i} has {len(ids)} tokens but EL_{n} needs at least {min_tokens}: "
                            "remove that row or lengthen its text")
    if not seqs.ids:
        raise LokuError(f"{path} has no text of at least {min_tokens} tokens: use longer texts")
    return seqs


def load_sequences(path: str | Path, tokenizer, *, text_column: str = "text", max_tokens: int = 200, n: int = 10,
                   limit: int | None = None, skip_short: bool = False, min_tokens: int | None = None) -> Sequences:
    """`read_texts` then `tokenize_sequences` (row numbers count the file's examples from 1)."""
    texts = read_texts(path, text_column)
    return tokenize_sequences(texts, tokenizer, max_tokens=max_tokens, n=n, path=str(path), limit=limit,
                              skip_short=skip_short, min_tokens=min_tokens)
