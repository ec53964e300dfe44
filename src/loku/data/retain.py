"""The retain set of a run: the user's, or, when a method needs one and none is given, loku's built-in
general text; and the check that forget and retain do not share examples.

The built-in set is read from the WikiText-2 test split that loku ships (`data/files/`, CC BY-SA 3.0, source
and license in its README), always from there, so it needs no network and is the same on every machine:
the first PER_ARTICLE paragraphs of each article (of at least MIN_CHARS characters), with WikiText's
tokenization undone and each paragraph cut after its last sentence that ends within MAX_CHARS.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..errors import LokuError
from .sources import SHIPPED, WIKITEXT2_TEST
from .text import load_examples

BUILTIN = "builtin:wikitext-2"   # the name a config records (and `--retain` accepts) for the built-in set
PER_ARTICLE, MIN_CHARS, MAX_CHARS = 4, 200, 600   # 242 paragraphs from the 60 articles, ~115 KB of text


def detokenize(line: str) -> str:
    """WikiText's ` @-@ `, ` , `, `( x )`, ` 's` back to plain text."""
    s = line.strip().replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([,.;:!?%)\]])", r"\1", s)
    s = re.sub(r"([(\[$]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    return re.sub(r'" (.*?) "', r'"\1"', s)


def _cut(text: str) -> str:
    """`text` up to its last sentence end within MAX_CHARS ("" when there is none)."""
    if len(text) <= MAX_CHARS:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?= [A-Z\"])", text[:MAX_CHARS])]
    return text[:ends[-1]] if ends else ""


def general_paragraphs(raw: str) -> list[str]:
    """The built-in set's paragraphs from WikiText raw text (articles open with a ` = Title = ` line)."""
    out, taken = [], PER_ARTICLE
    for line in raw.splitlines():
        line = line.strip()
        if re.fullmatch(r"= [^=].* =", line):   # a new article
            taken = 0
        elif line and not line.startswith("=") and taken < PER_ARTICLE:
            text = _cut(detokenize(line))
            if len(text) >= MIN_CHARS:
                out.append(text)
                taken += 1
    return out


@lru_cache(maxsize=1)
def _builtin_texts() -> tuple[str, ...]:
    return tuple(general_paragraphs((SHIPPED / WIKITEXT2_TEST.path).read_text(encoding="utf-8")))


def builtin_retain() -> list[dict]:
    """The built-in general-text retain set, one example per paragraph."""
    return [{"text": t} for t in _builtin_texts()]


def settle_retain(cfg, needs_retain: bool, forget: list[dict], given: list[dict] | None) -> list[dict] | None:
    """The retain examples of a run: `given` (in-memory) or `cfg.retain` (a file, or BUILTIN); when the method
    needs a retain set and has none, the built-in one, announced in one line and recorded as
    `cfg.retain = BUILTIN` (so the run's config.yaml says where its retain set came from and reruns it).
    Raises LokuError when forget and retain share examples, unless `cfg.allow_overlap`."""
    if given is not None:
        retain = given or None
    elif cfg.retain == BUILTIN:
        retain = builtin_retain()
    elif cfg.retain:
        retain = load_examples(cfg.retain, cfg.text_column)   # raises on a file without examples
    else:
        retain = None
    if needs_retain and not retain:
        retain = builtin_retain()
        cfg.retain = BUILTIN
        print(f"retain set: none given, so loku keeps its built-in general text ({len(retain)} WikiText-2 "
              f"paragraphs, CC BY-SA 3.0; recorded as retain: {BUILTIN}); pass --retain FILE to keep your own")
    if retain:
        check_overlap(forget, retain, cfg.allow_overlap)
    return retain


def _key(example: dict) -> tuple:
    """What makes two examples the same: their text, or question and answer, up to whitespace (tokenized ones:
    their tokens and labels)."""
    if "input_ids" in example:
        return tuple(example["input_ids"]), tuple(example["labels"])
    fields = ("question", "answer") if "question" in example else ("text",)
    return tuple(re.sub(r"\s+", " ", str(example.get(f, ""))).strip() for f in fields)


def shared_examples(forget: list[dict], retain: list[dict]) -> int:
    """How many forget examples also appear in the retain set."""
    kept = {_key(r) for r in retain}
    return sum(_key(f) in kept for f in forget)


def check_overlap(forget: list[dict], retain: list[dict], allow: bool) -> None:
    n = shared_examples(forget, retain)
    if not n:
        return
    what = f"forget and retain share {n} of the {len(forget)} forget examples"
    if not allow:
        raise LokuError(f"{what}: the model cannot forget what it is also trained to keep; remove them from the "
                        "retain set (or give a different file), or pass --allow-overlap to train on them anyway")
    print(f"warning: {what}; training on them anyway (--allow-overlap)")
