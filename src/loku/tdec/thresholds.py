"""Forgetting thresholds: a model's mean EL_n and MA on text it never saw (Jang et al. 2023).

A sequence counts as forgotten once the model extracts it no better than unseen text, so the
thresholds belong to the model: compute them from held-out text (`compute_thresholds`, or
`loku tdec thresholds`), or take a published preset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config_base import Config, setting
from ..errors import LokuError

FILENAME = "thresholds.json"


@dataclass(frozen=True)
class Thresholds:
    el: float          # mean EL_n on unseen text
    ma: float          # mean MA on unseen text
    n: int = 10
    source: str = ""

    def forgotten(self, el: float, ma: float) -> bool:
        """Both strictly below, as Jang et al.'s stopping check (`ma < ma_threshold and el < el_threshold`).
        A threshold of exactly 0 (unseen text never extracted, common for short sequences) is met by 0,
        since nothing can fall below it."""
        return below(el, self.el) and below(ma, self.ma)

    def describe(self) -> str:
        text = f"EL{self.n} {100 * self.el:.2f} %, MA {100 * self.ma:.2f} %"
        return text + (f" ({self.source})" if self.source else "")


def below(value: float, threshold: float) -> bool:
    """TDEC's test of one mean against its never-seen level (also `loku unlearn --until forgotten`'s)."""
    return value < threshold or value == threshold == 0


# The paper's values. Jang et al.'s public configs (joeljang/knowledge-unlearning, configs/) carry these same
# numbers for 125M, 1.3B and 2.7B alike; the larger models' own values were not found in text we could check.
PRESETS: dict[str, Thresholds] = {
    "gpt-neo-125m": Thresholds(0.0499, 0.2994, 10, "LoKU / Jang et al. 2023: GPT-Neo 125M on unseen Pile text"),
}


def preset_for(model_name: str) -> Thresholds | None:
    """The preset of a model name or hub id ('EleutherAI/gpt-neo-125M' -> 'gpt-neo-125m'), if any."""
    key = str(model_name).rstrip("/").split("/")[-1].lower()
    return PRESETS.get(key)


def read_thresholds(spec: str) -> Thresholds:
    """A preset name, or a thresholds.json (or the folder holding one) written by `loku tdec thresholds`."""
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    path = Path(spec)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        import difflib

        close = difflib.get_close_matches(spec.lower(), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LokuError(f"thresholds {spec!r} is neither a preset{hint} ({', '.join(PRESETS)}) nor a {FILENAME}: "
                        "compute them with `loku tdec thresholds --model M --data HELDOUT --out DIR`")
    try:
        data = json.loads(path.read_text())
        return Thresholds(float(data["el"]), float(data["ma"]), int(data.get("n", 10)), data.get("source", str(path)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise LokuError(f"{path} is not a thresholds file ({type(e).__name__}: {e}): write it again with "
                        "`loku tdec thresholds`") from None


def resolve_thresholds(spec: str | None, el: float | None, ma: float | None, model_name: str, n: int) -> Thresholds:
    """Explicit values win, then `spec` (preset or file), then the model's preset; n must match."""
    if (el is None) != (ma is None):
        raise LokuError("give both --el-threshold and --ma-threshold, or neither")
    if el is not None:
        if not (0 <= el <= 1 and 0 <= ma <= 1):
            raise LokuError(f"thresholds are fractions in [0, 1], got EL {el} and MA {ma}: e.g. 0.0499 for 4.99 %")
        return Thresholds(el, ma, n, "given")
    found = read_thresholds(spec) if spec else preset_for(model_name)
    if found is None:
        raise LokuError(f"no forgetting thresholds known for model {model_name!r}: compute them on held-out text "
                        f"with `loku tdec thresholds --model {model_name} --data HELDOUT --out DIR` and pass "
                        "--thresholds DIR, or pass --el-threshold and --ma-threshold")
    if found.n != n:
        raise LokuError(f"the thresholds are for EL_{found.n} but this run measures EL_{n}: pass --n {found.n} "
                        "or thresholds computed with the same n")
    return found


def compute_thresholds(model, seqs, n: int = 10, batch_size: int = 8, source: str = "") -> dict:
    """Mean EL_n and MA of `model` over held-out `Sequences`: {"thresholds": Thresholds, "el", "ma", ...}."""
    from .measure import measure_sequences

    m = measure_sequences(model, seqs, n, batch_size)
    th = Thresholds(m["el_mean"], m["ma_mean"], n, source or f"mean over {len(seqs)} sequences of {seqs.path}")
    return {"thresholds": th, **m, "rows": seqs.rows, "skipped": seqs.skipped, "tokens": [len(x) for x in seqs.ids]}


def thresholds_json(result: dict, model_name: str) -> dict:
    """What `loku tdec thresholds` writes: the two numbers first, then how they were made, then per item."""
    th = result["thresholds"]
    return {**asdict(th), "model": model_name, "count": len(result["el"]), "skipped_rows": result["skipped"],
            "per_item": {"rows": result["rows"], "tokens": result["tokens"], "el": result["el"], "ma": result["ma"]},
            "seconds": result["seconds"]}


@dataclass
class ThresholdsConfig(Config):
    """Options of `loku tdec thresholds` (the keyword arguments of `heldout_thresholds`)."""

    data: str = setting("", "Held-out text the model never saw (.csv/.jsonl/.txt/.raw), or a TDEC set by name "
                        "(lm_extraction_32_1) from the data folder.", group="Data")
    model: str = setting("smollm2-135m", "Hub id, local model directory, .gguf file, or 'smollm2-135m'.",
                         group="Model")
    out: str | None = setting(None, "New directory for thresholds.json.", group="Output", default_text="print only")
    text_column: str = setting("text", "CSV/JSONL column holding the text.", group="Data")
    rows: int | None = setting(None, "Use the first N usable texts.", group="Data", bound="positive")
    max_tokens: int = setting(200, "Cut every text to this many tokens (as the forget set).", group="Data",
                              bound="positive")
    min_tokens: int | None = setting(None, "Skip texts shorter than this.", group="Data", bound="positive",
                                     default_text="n + 1")
    n: int = setting(10, "n of EL_n.", group="Evaluation", bound="positive")
    batch_size: int = setting(8, "Sequences per forward pass.", group="Evaluation", bound="positive")
    data_dir: str | None = setting(None, "Data folder holding the public data (tdec/, eval/, tofu/; see README "
                                   "'Data').", group="Data",
                                   default_text="$LOKU_DATA, then loku's own files, then the Hugging Face hub")
    overwrite: bool = setting(False, "Replace a non-empty --out directory.", group="Output")
    trust_remote_code: bool = setting(False, "Run the model repository's own code.", group="Model")

    def check(self):
        if not self.data:
            raise LokuError("no held-out text given: pass --data FILE (text the model never saw)")


def heldout_thresholds(model_name: str, data: str, *, out: str | None = None, text_column: str = "text",
                       rows: int | None = None, max_tokens: int = 200, n: int = 10, min_tokens: int | None = None,
                       batch_size: int = 8, overwrite: bool = False, trust_remote_code: bool = False,
                       data_dir: str | None = None, model=None, tokenizer=None, log=print) -> dict:
    """`loku tdec thresholds`: a model's thresholds from held-out text (texts shorter than `min_tokens`,
    default n + 1, are skipped: WikiText's headings). `data` is a file, or a TDEC set by name
    (lm_extraction_32_1) from the data folder `data_dir`. Writes OUT/thresholds.json when `out` is given."""
    from .. import io
    from .data import read_texts, text_file, tokenize_sequences

    out_dir = io.check_out_dir(out, overwrite) if out else None
    data = text_file(data, data_dir)
    texts = read_texts(data, text_column)
    if model is None:
        from ..models import load_model, load_tokenizer

        tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    seqs = tokenize_sequences(texts, tokenizer, max_tokens=max_tokens, n=n, path=str(data), limit=rows,
                              skip_short=True, min_tokens=min_tokens)
    if model is None:
        model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
    log(f"{model_name}: MA and EL{n} of {len(seqs)} held-out sequences of {data} "
        f"(up to {max_tokens} tokens; {len(seqs.skipped)} shorter texts skipped)")
    result = compute_thresholds(model, seqs, n, batch_size, source=f"{model_name} on {len(seqs)} sequences of {data}")
    th = result["thresholds"]
    log(f"thresholds: EL{n} {th.el:.4f} ({100 * th.el:.2f} %), MA {th.ma:.4f} ({100 * th.ma:.2f} %) "
        f"in {result['seconds']:.0f} s")
    if out_dir is not None:
        io.start_out_dir(out_dir, overwrite)
        io.write_json(out_dir / FILENAME, thresholds_json(result, model_name))
        log(f"wrote {out_dir / FILENAME}: pass it to `loku tdec run --thresholds {out_dir}`")
    return result
