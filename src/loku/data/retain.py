"""The retain set of a run: the user's, or, when a method needs one and none is given, loku's built-in
general text; and the check that forget and retain do not share examples.

The built-in set is 242 paragraphs of WikiText-2 (CC BY-SA 3.0) shipped inside the package
(`data/general/`, with its source and license), so it needs no network. Keeping general text
while forgetting is what a retain set is for; a user's own retain data, closer to the forget set,
keeps more of what is near it (README: its effect on the demo, measured).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LokuError
from .text import load_examples

BUILTIN = "builtin:wikitext-2"   # the name a config records (and `--retain` accepts) for the built-in set
_FILE = Path(__file__).with_name("general") / "wikitext2_excerpt.txt"


def builtin_retain() -> list[dict]:
    """The built-in general-text retain set, one example per paragraph."""
    return load_examples(_FILE)


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
    """What makes two examples the same: their text, or question and answer, up to whitespace."""
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
