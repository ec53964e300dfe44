"""MUSE's data in its own layout (swj0419/muse_bench `load_data.py`), from a data folder or the hub.

A data folder's muse/ is muse_bench's data/ folder:

    muse/<corpus>/verbmem/forget.json        [{"prompt", "gt"}, ...]
    muse/<corpus>/knowmem/{forget,retain}_qa.json, {forget,retain}_qa_icl.json   [{"question", "answer"}, ...]
    muse/<corpus>/privleak/{forget,retain,holdout}.json                      ["text", ...]
    muse/<corpus>/raw/{forget,retain1,retain2,holdout}.json                  ["text", ...]

The hub copy is the same data: `load_dataset("muse-bench/MUSE-News", "verbmem", split="forget")` (configs
verbmem, knowmem, privleak, raw; columns as above, `text` for the string lists). Which of the two is read
is decided by loku.data.sources (--data-dir / $LOKU_DATA, then the hub), once per corpus: a local corpus
folder is read whole (a missing file is an error, never filled in from the hub).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.sources import HubCopy, find, hub_rows, muse_corpus
from ..errors import LokuError

CORPORA = {"news": "News", "books": "Books"}
FIELDS = {"verbmem": ("prompt", "gt"), "knowmem": ("question", "answer"), "privleak": None, "raw": None}
HINT = ("restore it from muse_bench's data/ (github swj0419/muse_bench load_data.py) into the data folder's "
        "muse/")


def check_corpus(corpus: str) -> str:
    if corpus not in CORPORA:
        raise LokuError(f"unknown MUSE corpus {corpus!r}: choose news or books")
    return corpus


def _check_rows(rows, where: str, keys: tuple[str, ...] | None) -> list:
    if not isinstance(rows, list) or not rows:
        raise LokuError(f"{where} must be a non-empty JSON list: {HINT}")
    for i, row in enumerate(rows):
        if keys is None:
            if not isinstance(row, str):
                raise LokuError(f"{where} item {i} is a {type(row).__name__}, not a string: restore it from MUSE")
            continue
        if not isinstance(row, dict):
            raise LokuError(f"{where} item {i} is not an object with {' and '.join(keys)}: restore it from MUSE")
        for key in keys:
            if not isinstance(row.get(key), str):
                raise LokuError(f"{where} item {i} has no string field {key!r}: restore it from MUSE")
    return rows if keys is None else [{k: r[k] for k in keys} for r in rows]


def _local(root: Path, part: str, split: str) -> list:
    path = root / part / f"{split}.json"
    if not path.is_file():
        if part == "raw" and (root / part / f"{split}.txt").is_file():   # muse_bench also writes the raw .txt
            return (root / part / f"{split}.txt").read_text(encoding="utf-8").split("\n\n")
        raise LokuError(f"MUSE file {path} is missing: {HINT}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LokuError(f"{path} is not valid JSON ({type(e).__name__}: {e}): restore it from MUSE") from None


def _hub(found, part: str, split: str) -> list:
    """A file's rows from the corpus's hub dataset; the file `find` probed is not downloaded twice."""
    copy = HubCopy(found.data.hub.repo, part, split)
    try:
        rows = found.rows if copy == found.data.hub else hub_rows(copy)
    except Exception as e:  # noqa: BLE001 (network, missing config or split: all mean "not there")
        raise LokuError(f"{copy} could not be read ({type(e).__name__}): connect to the Hugging Face hub, or pass "
                        f"--data-dir DIR with muse_bench's data/ as DIR/muse/") from None
    keys = FIELDS[part]
    return list(rows["text"]) if keys is None else [{k: r[k] for k in keys} for r in rows]


# metric -> the (part, split) files it reads; muse_bench's DEFAULT_DATA in constants.py
METRIC_FILES = {
    "verbmem_f": [("verbmem", "forget")],
    "knowmem_f": [("knowmem", "forget_qa"), ("knowmem", "forget_qa_icl")],
    "knowmem_r": [("knowmem", "retain_qa"), ("knowmem", "retain_qa_icl")],
    "privleak": [("privleak", "forget"), ("privleak", "holdout")],
}
METRICS = tuple(METRIC_FILES)


@dataclass
class MuseData:
    """The files a MUSE evaluation (and unlearning run) reads, keyed "part/split"."""

    corpus: str
    source: str                                   # the folder, or the hub dataset
    files: dict[str, list] = field(default_factory=dict)

    def __getitem__(self, key: str) -> list:
        return self.files[key]


def check_metrics(metrics) -> list[str]:
    metrics = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    for m in metrics:
        if m not in METRIC_FILES:
            from ..registry import unknown_choice

            raise unknown_choice("MUSE metric", m, METRICS)
    if not metrics:
        raise LokuError(f"no MUSE metric given: pass some of {', '.join(METRICS)}")
    return metrics


def load_muse(data_dir: str | os.PathLike | None, corpus: str, metrics=METRICS, raw: tuple[str, ...] = (),
              limit: int | None = None) -> MuseData:
    """Read and check every file the chosen metrics (and `raw` splits, for unlearning) need, before any
    model is loaded: from the data folder's muse/<corpus>/ (`data_dir`, else $LOKU_DATA), else the hub
    (loku.data.sources). `limit` keeps the first N items of each evaluation set (not of the raw corpora,
    nor of the few-shot examples)."""
    check_corpus(corpus)
    if limit is not None and limit < 1:
        raise LokuError(f"--limit must be a positive number of items (or 0 for all), got {limit}")
    wanted = [f for m in check_metrics(metrics) for f in METRIC_FILES[m]] + [("raw", s) for s in raw]
    found = find(muse_corpus(corpus, CORPORA[corpus], *wanted[0]), data_dir)
    out = MuseData(corpus, str(found.path) if found.path is not None else found.data.hub.repo)
    for part, split in wanted:
        if found.path is not None:
            rows, where = _local(found.path, part, split), str(found.path / part / f"{split}.json")
        else:
            rows, where = _hub(found, part, split), str(HubCopy(found.data.hub.repo, part, split))
        rows = _check_rows(rows, where, FIELDS[part])
        if limit is not None and part != "raw" and not split.endswith("_icl"):
            rows = rows[:limit]
        out.files[f"{part}/{split}"] = rows
    return out
