"""The sets an audit measures, tokenized once with the audited model's tokenizer.

Plain text is tokenized as TDEC does (no special tokens, cut to `max_tokens`; at least n + 1 tokens for EL_n)
and every token but the first is scored. QA pairs use loku's training format (`loku.data.qa.format_qa`, in
the audit's `prompt_format`, which must be the one the model was trained with) and only the answer is
scored; MA and EL_n are defined on plain text only, so QA sets report ES, EM and the membership scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LokuError


@dataclass
class EvalSet:
    name: str
    path: str
    kind: str                     # "text" or "qa"
    rows: list[int]               # 1-based position of each example in its file
    features: list[dict]          # {"input_ids", "labels"}: what is scored
    zlib: list[int]               # zlib size of each example's scored text (the zlib attack)
    examples: list[dict] = field(default_factory=list)  # the loaded examples ({"text"} or {"question", "answer"})

    def __len__(self) -> int:
        return len(self.features)

    @property
    def sequences(self) -> list[list[int]]:
        """Whole token rows (text sets): what MA and EL_n measure."""
        return [f["input_ids"] for f in self.features]

    def subset(self, indices: list[int], name: str) -> "EvalSet":
        return EvalSet(name, self.path, self.kind, [self.rows[i] for i in indices],
                       [self.features[i] for i in indices], [self.zlib[i] for i in indices],
                       [self.examples[i] for i in indices] if self.examples else [])

    def describe(self) -> dict:
        lengths = [len(f["input_ids"]) for f in self.features]
        return {"path": self.path, "kind": self.kind, "examples": len(self), "rows": self.rows,
                "tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)}}


def read_examples(path: str, text_column: str, what: str) -> list[dict]:
    from ..data.text import load_examples

    examples = load_examples(path, text_column)
    kinds = {"text" if "text" in e else "qa" for e in examples}
    if len(kinds) > 1:
        raise LokuError(f"--{what} {path} mixes plain text and question/answer records: use one kind per file")
    return examples


def kind_of(examples: list[dict]) -> str:
    return "text" if "text" in examples[0] else "qa"


def build_set(name: str, path: str, examples: list[dict], tokenizer, *, max_tokens: int, n: int,
              limit: int | None = None, prompt_format: str = "auto") -> EvalSet:
    """Tokenize the first `limit` examples (all by default); a text too short for EL_n is a LokuError naming
    its row."""
    from ..data.qa import format_qa
    from ..metrics.forward import check_features
    from ..metrics.membership import zlib_sizes
    from ..tdec.data import tokenize_sequences

    examples = examples[:limit] if limit else examples
    if not examples:
        raise LokuError(f"the {name} set {path} holds no examples: give it at least one")
    if kind_of(examples) == "text":
        seqs = tokenize_sequences([e["text"] for e in examples], tokenizer, max_tokens=max_tokens, n=n, path=path)
        features = [{"input_ids": x, "labels": [-100] + x[1:]} for x in seqs.ids]
        rows = seqs.rows
    else:
        features = [format_qa(tokenizer, e["question"], e["answer"], max_tokens, prompt_format) for e in examples]
        rows = list(range(1, len(features) + 1))
        try:
            check_features(features, f"{path} record")
        except LokuError as e:
            raise LokuError(f"{e} (or raise --max-tokens {max_tokens}: the prompt may fill it)") from None
    return EvalSet(name, str(path), kind_of(examples), rows, features, zlib_sizes(tokenizer, features),
                   list(examples))
