"""Build loku's built-in retain set, src/loku/data/general/wikitext2_excerpt.txt, from WikiText-2.

Input: the WikiText-2 raw test split (../shared/data/tdec/retain/wikitext2_test.raw; the same file as
wikitext-2-raw-v1 wiki.test.raw). For each article (a line ` = Title = `) the first PER_ARTICLE paragraphs
of at least MIN_CHARS characters are kept, WikiText's tokenization is undone (` @-@ ` -> `-`, spaces
before punctuation), and each paragraph is cut after its last sentence that ends within MAX_CHARS.

    python tools/build_general_text.py ../shared/data/tdec/retain/wikitext2_test.raw
"""

import re
import sys
from pathlib import Path

PER_ARTICLE, MIN_CHARS, MAX_CHARS = 4, 200, 600
OUT = Path(__file__).resolve().parents[1] / "src/loku/data/general/wikitext2_excerpt.txt"


def detokenize(line: str) -> str:
    s = line.strip()
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([,.;:!?%)\]])", r"\1", s)
    s = re.sub(r"([(\[$]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    s = re.sub(r'" (.*?) "', r'"\1"', s)
    return s


def cut(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?= [A-Z\"])", text[:MAX_CHARS])]
    return text[:ends[-1]] if ends else ""


def main(raw: str) -> None:
    lines = Path(raw).read_text(encoding="utf-8").splitlines()
    out, taken = [], PER_ARTICLE
    for line in lines:
        line = line.strip()
        if re.fullmatch(r"= [^=].* =", line):   # a new article
            taken = 0
            continue
        if not line or line.startswith("=") or taken >= PER_ARTICLE:
            continue
        text = cut(detokenize(line))
        if len(text) >= MIN_CHARS:
            out.append(text)
            taken += 1
    OUT.write_text("".join(t + "\n" for t in out), encoding="utf-8")
    print(f"wrote {len(out)} paragraphs, {OUT.stat().st_size} bytes, to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
