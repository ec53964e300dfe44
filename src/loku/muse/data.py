"""MUSE's data in its own layout (swj0419/muse_bench `load_data.py`), from a local folder or the hub.

    data/<corpus>/verbmem/forget.json        [{"prompt", "gt"}, ...]
    data/<corpus>/knowmem/{forget,retain}_qa.json, {forget,retain}_qa_icl.json   [{"question", "answer"}, ...]
    data/<corpus>/privleak/{forget,retain,holdout}.json                      ["text", ...]
    data/<corpus>/raw/{forget,retain1,retain2,holdout}.json                  ["text", ...]

The hub copy is the same data: `load_dataset("muse-bench/MUSE-News", "verbmem", split="forget")` (configs
verbmem, knowmem, privleak, raw; columns as above, `text` for the string lists).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LokuError

CORPORA = {"news": "News", "books": "Books"}
HUB = "muse-bench/MUSE-{}"
ENV_VAR = "LOKU_DATA"           # <LOKU_DATA>/muse holds muse_bench's data/ folder
FIELDS = {"verbmem": ("prompt", "gt"), "knowmem": ("question", "answer"), "privleak": None, "raw": None}
HINT = ("download it with muse_bench's load_data.py (github swj0419/muse_bench) or pass --data to a folder "
        "laid out like its data/")


def muse_source(data: str | os.PathLike | None) -> Path | None:
    """Where MUSE comes from: the given folder, else $LOKU_DATA/muse when it exists, else None (the hub).
    The one place that decides it, to be switched over to loku.data.sources."""
    if data is None and os.environ.get(ENV_VAR):
        candidate = Path(os.environ[ENV_VAR]).expanduser() / "muse"
        data = candidate if candidate.is_dir() else None
    if data is None:
        return None
    path = Path(data).expanduser()
    if not path.is_dir():
        raise LokuError(f"MUSE data folder {path} does not exist: {HINT}")
    return path


def check_corpus(corpus: str) -> str:
    if corpus not in CORPORA:
        raise LokuError(f"unknown MUSE corpus {corpus!r}: choose news or books")
    return corpus


def corpus_dir(root: Path, corpus: str) -> Path:
    """muse_bench's data/ folder (holding news/ and books/) or one corpus folder itself."""
    for path in (root / corpus, root):
        if any((path / part).is_dir() for part in FIELDS):
            return path
    raise LokuError(f"{root} holds no MUSE {corpus} data (no {corpus}/verbmem, knowmem, privleak or raw "
                    f"folder): {HINT}")


def _check_rows(rows, where: str, keys: tuple[str, ...] | None) -> list:
    if not isinstance(rows, list) or not rows:
        raise LokuError(f"{where} must be a non-empty JSON list: restore it from MUSE ({HINT})")
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


def _hub(corpus: str, part: str, split: str) -> list:
    from datasets import load_dataset

    rows = load_dataset(HUB.format(CORPORA[corpus]), part, split=split)
    keys = FIELDS[part]
    return list(rows["text"]) if keys is None else [{k: r[k] for k in keys} for r in rows]


def read_split(source: Path | None, corpus: str, part: str, split: str) -> list:
    """One MUSE file as muse_bench reads it: dicts for verbmem/knowmem, strings for privleak/raw."""
    if source is None:
        rows, where = _hub(corpus, part, split), f"hub {HUB.format(CORPORA[corpus])} {part}/{split}"
    else:
        root = corpus_dir(source, corpus)
        rows, where = _local(root, part, split), str(root / part / f"{split}.json")
    return _check_rows(rows, where, FIELDS[part])


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


def load_muse(data: str | os.PathLike | None, corpus: str, metrics=METRICS, raw: tuple[str, ...] = (),
              limit: int | None = None) -> MuseData:
    """Read and check every file the chosen metrics (and `raw` splits, for unlearning) need, before any
    model is loaded. `limit` keeps the first N items of each evaluation set (not of the raw corpora,
    nor of the few-shot examples)."""
    check_corpus(corpus)
    source = muse_source(data)
    if limit is not None and limit < 1:
        raise LokuError(f"--limit must be a positive number of items (or 0 for all), got {limit}")
    wanted = [f for m in check_metrics(metrics) for f in METRIC_FILES[m]] + [("raw", s) for s in raw]
    out = MuseData(corpus, str(source) if source else HUB.format(CORPORA[corpus]))
    for part, split in wanted:
        rows = read_split(source, corpus, part, split)
        if limit is not None and part != "raw" and not split.endswith("_icl"):
            rows = rows[:limit]
        out.files[f"{part}/{split}"] = rows
    return out
