"""TOFU splits (Maini et al. 2024), from a data folder's tofu/ (TOFU's JSON files) or from the hub dataset.

TOFU is 200 fictitious authors x 20 QA pairs (`full`, 4000 rows, author-major). `retainYY` is the first
YY% of `full`, `forgetXX` the last XX%, and `forgetXX_perturbed` the same rows with a paraphrased answer
and 5 perturbed (wrong) answers for the truth ratio. `retain_perturbed` is the first 400 rows of `full`
(20 authors) with the same extras; `real_authors_perturbed` and `world_facts_perturbed` are general
knowledge sets with 3 perturbed answers; `holdoutXX` are unseen authors in the same style.

`authors=K` shrinks TOFU to K authors for CPU-sized experiments while keeping its shape: the retained
authors are the first K - F of `full` and the forgotten ones the last F (F = K x forget%), so every forget
row still has its perturbed answers and every retain row its place in `retain_perturbed`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import LokuError
from .batches import collate
from .qa import TOFU_PROMPT_FORMAT, format_qa, qa_prompt
from .sources import find, tofu_split

__all__ = ["SPLITS", "QA_PER_AUTHOR", "load_split", "scaled_authors", "format_qa", "qa_prompt",
           "collate", "tokenize_qa"]

QA_PER_AUTHOR = 20
N_AUTHORS = 200

# split name -> local file. forgetXX and forgetXX_perturbed are the same rows; the plain name is kept
# because the hub has both and training code asks for "forget10".
SPLITS: dict[str, str] = {
    "full": "full.json",
    **{f"retain{p}": f"retain{p}.json" for p in ("90", "95", "99")},
    **{f"forget{p}": f"forget{p}_perturbed.json" for p in ("01", "05", "10")},
    **{f"forget{p}_perturbed": f"forget{p}_perturbed.json" for p in ("01", "05", "10")},
    "retain_perturbed": "retain_perturbed.json",
    "real_authors": "real_authors.json",
    "world_facts": "world_facts.json",
    "real_authors_perturbed": "real_authors_perturbed.json",
    "world_facts_perturbed": "world_facts_perturbed.json",
    **{f"holdout{p}": f"holdout{p}.json" for p in ("01", "05", "10")},
    "idontknow": "idontknow.jsonl",
}


def _check_name(name: str) -> None:
    if name not in SPLITS:
        from ..registry import unknown_choice

        raise unknown_choice("TOFU split", name, SPLITS)


def _read_json_arrays(path: Path) -> list:
    """Rows of a file holding one JSON array, or several back to back: full.json and retainYY.json are
    4 lines of one array each, which plain json.load rejects ("Extra data")."""
    text = path.read_text(encoding="utf-8")
    decoder, rows, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return rows
        try:
            chunk, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise LokuError(f"{path} line {e.lineno} is not valid JSON ({e.msg}): re-download the file") from None
        rows.extend(chunk if isinstance(chunk, list) else [chunk])


def _load_raw(name: str, data_dir: str | Path | None) -> list:
    found = find(tofu_split(name, SPLITS[name]), data_dir)
    if found.path is None:
        return [dict(r) for r in found.rows]
    if name == "idontknow":  # plain text, one refusal a line, despite the .jsonl suffix
        return [ln.strip() for ln in found.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return _read_json_arrays(found.path)


def scaled_authors(authors: int, forget_percent: int) -> tuple[int, int]:
    """(retained, forgotten) author counts of a K-author TOFU: forget10 of 20 authors forgets 2."""
    forgotten, rest = divmod(authors * forget_percent, 100)
    if not 1 <= authors <= N_AUTHORS or rest or forgotten < 1:
        step = 100 // _gcd(100, forget_percent)
        raise LokuError(f"--authors {authors} cannot keep TOFU's {forget_percent}% forget share: use a multiple "
                        f"of {step} between {step} and {N_AUTHORS}")
    return authors - forgotten, forgotten


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _percent(name: str, forget: str) -> int:
    """The forget share a split implies: forget10 -> 10, retain90 -> 10; other splits use `forget`."""
    m = re.fullmatch(r"(forget|retain|holdout)(\d\d)(_perturbed)?", name)
    if m:
        p = int(m.group(2))
        return 100 - p if m.group(1) == "retain" else p
    m = re.fullmatch(r"forget(\d\d)", forget)
    if not m:
        raise LokuError(f"forget split {forget!r} is not one of forget01, forget05, forget10: pass one of those")
    return int(m.group(1))


def _restrict(name: str, rows: list, authors: int, forget: str) -> list:
    kept, forgotten = scaled_authors(authors, _percent(name, forget))
    n = QA_PER_AUTHOR
    if name.startswith("forget"):  # the last authors of full; the last F of them stay forgotten
        return rows[len(rows) - forgotten * n:]
    if name.startswith("holdout"):  # unseen authors, as many as are forgotten
        return rows[: forgotten * n]
    if name.startswith("retain"):  # retainYY and retain_perturbed both start at author 0
        return rows[: kept * n]
    if name == "full":
        return rows[: kept * n] + rows[len(rows) - forgotten * n:]
    return rows  # real authors, world facts, idontknow: not about the fictitious authors


def load_split(name: str, data_dir: str | Path | None = None, *, authors: int | None = None,
               forget: str = "forget10", limit: int | None = None) -> list:
    """Rows (dicts with question, answer, ...; strings for idontknow) of one TOFU split.

    The split is read from `data_dir`/tofu/ (else $LOKU_DATA/tofu/; TOFU's refusals ship with loku), else
    from the hub dataset `locuslab/TOFU` (loku.data.sources).
    `authors=K` keeps only the rows of a K-author TOFU (see the module docstring); the forget share comes
    from the split's own name (forget05, retain95) or else from `forget`. `limit` keeps the first rows,
    as TOFU's `ds_size` does.
    """
    _check_name(name)
    rows = _load_raw(name, data_dir)
    if authors is not None:
        rows = _restrict(name, rows, authors, forget)
    return rows[:limit] if limit is not None else rows


def tokenize_qa(tokenizer, rows: list[dict], max_length: int, answer_key: str = "answer",
                prompt_format: str = TOFU_PROMPT_FORMAT) -> list[dict]:
    """format_qa over rows: the features TOFU fine-tuning trains on (TOFU's phi format by default)."""
    return [format_qa(tokenizer, r["question"], r[answer_key], max_length, prompt_format) for r in rows]
