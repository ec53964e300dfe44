"""One teacher-forced forward pass per batch: the logits every per-token metric is computed from.

Membership scores (`loku.metrics.membership`), extraction strength and exact memorization
(`loku.metrics.extraction`) are pure functions over (logits, labels); this module runs the model once per
batch and hands both to them, so an audit pays one pass for all of them.

Features are `{"input_ids": [...], "labels": [...]}` with -100 where no score applies (a QA prompt, the
first token of a text, which nothing predicts). Rows are batched in order of length (less padding), right
padded and masked; a causal model's logits at a row's real positions do not depend on the padding after
them.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..data.batches import collate
from ..errors import LokuError
from ..models import model_device


def pad_id(tokenizer) -> int:
    """Any id works as padding here (pads are never attended to nor scored): pad, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def text_features(tokenizer, texts: list[str], max_tokens: int | None = None) -> list[dict]:
    """Plain texts as TDEC tokenizes them (no special tokens, cut to `max_tokens`); every token but the first
    is scored. A text of fewer than 2 tokens is a LokuError naming it."""
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < 2:
            raise LokuError(f"text {i + 1} has {len(ids)} token(s), but scoring needs at least 2 (one to predict "
                            "from, one to predict): drop or lengthen it")
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def scored_tokens(features: list[dict]) -> list[int]:
    """How many tokens of each feature are scored: labels != -100 at positions 1.. (position 0 has no
    prediction)."""
    return [sum(label != -100 for label in f["labels"][1:]) for f in features]


def check_features(features: list[dict], what: str = "example") -> None:
    for i, n in enumerate(scored_tokens(features)):
        if n == 0:
            raise LokuError(f"{what} {i + 1} has no scored token (every label is -100 after the first position): "
                            "give it an answer or more text")


@torch.no_grad()
def teacher_forced(model, features: list[dict], pad_id: int, batch_size: int = 8) -> Iterator[tuple]:
    """Yields (indices, logits (b, T, V) float32, labels (b, T) long) for batches of `features`, shortest
    first; `indices` say which features the rows are. The model runs in eval mode (dropout off) and its
    mode is restored afterwards."""
    if batch_size < 1:
        raise LokuError(f"batch size must be positive, got {batch_size}")
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([features[i] for i in idx], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits  # (b, T, V)
            yield idx, logits.float(), batch["labels"].to(device)
    finally:
        model.train(was_training)


def per_feature(model, features: list[dict], pad_id: int, measure: Callable[..., dict[str, torch.Tensor]],
                batch_size: int = 8, progress: Callable[[int], None] | None = None) -> dict[str, list]:
    """`measure(logits, labels) -> {name: (b,) tensor}` over one teacher-forced pass per batch, gathered into
    {name: [value of each feature]} in the features' order; `progress` is told each batch's size."""
    out: dict[str, list] = {}
    for idx, logits, labels in teacher_forced(model, features, pad_id, batch_size):
        for name, values in measure(logits, labels).items():
            column = out.setdefault(name, [None] * len(features))
            for i, v in zip(idx, values.tolist()):
                column[i] = v
        if progress:
            progress(len(idx))
    return out
