"""Read forget/retain examples from CSV, JSONL, plain text or QA JSON, and tokenize them.

An example is either `{"text": ...}` (loss on every token) or `{"question": ..., "answer": ...}`
(loss on the answer tokens only, in the prompt format chosen: `loku.data.qa`). In memory (the Python API) it
may also come tokenized, `{"input_ids": [...], "labels": [...]}` with -100 where no loss applies: the loss on
any tokens of a text, e.g. only the private values inside a record (`loku demo`).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from ..errors import LokuError
from .qa import DEFAULT_PROMPT_FORMAT, format_qa

FORMATS = (".csv", ".jsonl", ".json", ".txt", ".raw")  # .raw: WikiText, one paragraph a line
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a whole document in one cell (default: 128 KiB)


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
    # strict: a quoted field still open at the end of the file (a file cut short) is an error, not one
    # example swallowing every line after it.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        header = reader.fieldnames or []
        if not header:
            return []
        qa = {"question", "answer"} <= set(header) and column not in header
        if not qa and column not in header:
            raise LokuError(f"{path} has no column {column!r} (columns: {', '.join(header)}): "
                            f"pass --text-column with one of them")
        keys = ("question", "answer") if qa else (column,)
        rows, rows_iter = [], iter(reader)
        while True:
            start = reader.line_num + 1   # the file's line where the next row starts
            try:
                r = next(rows_iter)
            except StopIteration:
                break
            where = f"{path} row on line {start}"
            if None in r:   # DictReader files fields beyond the header under the key None
                raise LokuError(f"{where} has more fields than the header ({len(header)}): quote text that "
                                'holds commas ("like, this") or fix that row')
            if None in r.values():   # fields missing at the end of the row
                raise LokuError(f"{where} has fewer fields than the header ({len(header)}): fix or remove "
                                "that row")
            rows.append({k: r[k] for k in keys} if qa else {"text": r[column]})
    except csv.Error as e:
        raise LokuError(f"{path} row on line {start} is not valid CSV ({e}): fix the quoting there (a file "
                        "cut short ends inside a quoted field)") from None
    return rows


def _answer_text(path: Path, i: int, record: dict, key: str) -> str:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise LokuError(f"{path} record {i} has {key!r} = {value!r}: give it as text")
    return str(value)


def _from_records(path: Path, records: list, column: str) -> list[dict]:
    rows = []
    for i, r in enumerate(records, start=1):
        if isinstance(r, str):
            rows.append({"text": r})
        elif isinstance(r, dict) and "question" in r and "answer" in r:
            rows.append({"question": _answer_text(path, i, r, "question"),
                         "answer": _answer_text(path, i, r, "answer")})
        elif isinstance(r, dict) and column in r:
            rows.append({"text": _answer_text(path, i, r, column)})
        elif isinstance(r, dict) and ("question" in r or "answer" in r):
            has, lacks = ("question", "answer") if "question" in r else ("answer", "question")
            raise LokuError(f"{path} record {i} has {has!r} but no {lacks!r}: add the {lacks} (a QA example "
                            "needs both)")
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
        if not isinstance(data, list):
            raise LokuError(f"{path} holds a JSON {type(data).__name__}, not a list of examples: write "
                            '[{"question": ..., "answer": ...}, ...] or [{"text": ...}, ...]')
        rows = _from_records(path, data, text_column)
    if not rows:
        raise LokuError(f"{path} holds no examples: add at least one row")
    return rows


def tokenize_example(example: dict, tokenizer, max_length: int, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> dict:
    """input_ids and labels (-100 where no loss applies), truncated to max_length; QA examples in
    `prompt_format` (plain text has none)."""
    if "text" in example:
        ids = tokenizer(example["text"], truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids, "labels": list(ids)}
    if "input_ids" in example:
        ids, labels = list(example["input_ids"]), list(example.get("labels", ()))
        if len(labels) != len(ids):
            raise LokuError(f"a tokenized example has {len(ids)} input_ids but {len(labels)} labels: give labels "
                            "of the same length (-100 where no loss applies)")
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}
    out = format_qa(tokenizer, example["question"], example["answer"], max_length, prompt_format)
    if "alternate" in example:   # DPO's preferred answer to the same question, kept row for row
        alt = format_qa(tokenizer, example["question"], example["alternate"], max_length, prompt_format)
        out.update(alt_input_ids=alt["input_ids"], alt_labels=alt["labels"])
    return out


def tokenize_examples(examples: list[dict], tokenizer, max_length: int, source: str = "data",
                      prompt_format: str = DEFAULT_PROMPT_FORMAT) -> list[dict]:
    """Tokenize and truncate to max_length (longer examples are cut silently); max_length itself must fit
    the tokenizer's model_max_length, which `loku.models.load_model` sets to the model's context."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        raise LokuError(f"--max-length {max_length} is longer than the model's context of {limit} tokens "
                        f"(max_position_embeddings, the tokenizer's model_max_length): pass --max-length "
                        f"{limit} or less")
    feats = [tokenize_example(e, tokenizer, max_length, prompt_format) for e in examples]
    for i, f in enumerate(feats):
        if sum(label != -100 for label in f["labels"][1:]) == 0:
            raise LokuError(f"{source} example {i + 1} has no token to learn from after tokenization "
                            f"(max_length={max_length}): raise --max-length or drop the example")
    return feats
