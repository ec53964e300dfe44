"""TDEC sequences: texts re-tokenized with the model's own tokenizer and cut to a fixed number of tokens.

Jang et al. measure MA and EL_n on 200-token GPT-Neo sequences. Another model tokenizes the same text
differently, so each text is tokenized again (no special tokens) and cut to `max_tokens`; sequences of
equal length are then scored as (B, T) rows with no padding. A sequence needs at least n + 1 tokens
for EL_n to be defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LokuError

REPO = Path(__file__).resolve().parents[3]
TDEC_FILES = [f"lm_extraction_32_{k}.csv" for k in range(5)]  # the paper's 32-sequence forget sets


def shared_tdec_dir() -> Path | None:
    """../shared/data/tdec beside the repository or the working directory, if present."""
    for root in (REPO.parent, Path.cwd().parent, Path.cwd()):
        path = root / "shared" / "data" / "tdec"
        if path.is_dir():
            return path
    return None


def default_retain() -> Path | None:
    """WikiText-2 test (the paper's retain set), when the shared data folder is present."""
    base = shared_tdec_dir()
    path = base / "retain" / "wikitext2_test.raw" if base else None
    return path if path and path.is_file() else None


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
    from ..data.text import load_examples

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
