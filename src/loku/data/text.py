"""Read forget/retain examples from CSV, JSONL, plain text or QA JSON, and tokenize them.

An example is either `{"text": ...}` (loss on every token) or `{"question": ..., "answer": ...}`
(loss on the answer tokens only).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import LokuError

FORMATS = (".csv", ".jsonl", ".json", ".txt", ".raw")  # .raw: WikiText, one paragraph a line


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LokuError(f"data file {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise LokuError(f"data path {path} is a directory: pass a .csv, .jsonl, .json or .txt file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LokuError(f"{path} line {line} is not UTF-8: re-encode the file as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)") from None


def _from_csv(path: Path, text: str, column: str) -> list[dict]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    if not header:
        return []
    if {"question", "answer"} <= set(header) and column not in header:
        return [{"question": r["question"], "answer": r["answer"]} for r in reader]
    if column not in header:
        raise LokuError(f"{path} has no column {column!r} (columns: {', '.join(header)}): "
                        f"pass --text-column with one of them")
    rows = []
    for i, r in enumerate(reader, start=2):
        if r.get(column) is None:
            raise LokuError(f"{path} row {i} has fewer fields than the header: fix or remove that row")
        rows.append({"text": r[column]})
    return rows


def _from_records(path: Path, records: list, column: str) -> list[dict]:
    rows = []
    for i, r in enumerate(records, start=1):
        if isinstance(r, str):
            rows.append({"text": r})
        elif isinstance(r, dict) and "question" in r and "answer" in r:
            rows.append({"question": str(r["question"]), "answer": str(r["answer"])})
        elif isinstance(r, dict) and column in r:
            rows.append({"text": str(r[column])})
        else:
            keys = ", ".join(r) if isinstance(r, dict) else type(r).__name__
            raise LokuError(f"{path} record {i} has neither {column!r} nor question/answer (has: {keys}): "
                            "pass --text-column or fix the record")
    return rows


def load_examples(path: str | Path, text_column: str = "text") -> list[dict]:
    """All examples of one file; raises LokuError naming file, row and fix on anything malformed."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise LokuError(f"{path}: unknown data format {path.suffix!r}: use one of {', '.join(FORMATS)}")
    text = _decode(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _from_csv(path, text, text_column)
    elif suffix in (".txt", ".raw"):
        rows = [{"text": line} for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LokuError(f"{path} line {i} is not valid JSON ({e.msg}): fix that line") from None
        rows = _from_records(path, records, text_column)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # TOFU ships some files as several JSON arrays, one per line.
            try:
                data = [r for line in text.splitlines() if line.strip() for r in json.loads(line)]
            except json.JSONDecodeError:
                raise LokuError(f"{path} line {e.lineno} is not valid JSON ({e.msg}): fix the file") from None
        if isinstance(data, dict):
            data = [data]
        rows = _from_records(path, data, text_column)
    if not rows:
        raise LokuError(f"{path} holds no examples: add at least one row")
    return rows


def tokenize_example(example: dict, tokenizer, max_length: int) -> dict:
    """input_ids and labels (-100 where no loss applies), truncated to max_length."""
    if "text" in example:
        ids = tokenizer(example["text"], truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids, "labels": list(ids)}
    from .qa import format_qa

    return format_qa(tokenizer, example["question"], example["answer"], max_length)


def tokenize_examples(examples: list[dict], tokenizer, max_length: int, source: str = "data") -> list[dict]:
    feats = [tokenize_example(e, tokenizer, max_length) for e in examples]
    for i, f in enumerate(feats):
        if sum(label != -100 for label in f["labels"][1:]) == 0:
            raise LokuError(f"{source} example {i + 1} has no token to learn from after tokenization "
                            f"(max_length={max_length}): raise --max-length or drop the example")
    return feats
