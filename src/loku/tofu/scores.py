"""Per-answer values of one teacher-forced pass: the losses every TOFU probability and truth ratio is built
from, and extraction strength / exact memorization (OpenUnlearning's ES and EM) of the same logits.

TOFU (`get_batch_loss`) sums the token cross-entropies of the labelled tokens (the answer and the EOS
after it) and divides by their count for the `avg_*` values, so a probability is the per-token geometric
mean exp(-loss / n), not the probability of the whole answer.
"""

from __future__ import annotations

from ..losses import sequence_logprob
from ..metrics.extraction import memorization_from_logits
from ..metrics.forward import per_feature


def _measure(logits, labels):
    return {"loss": -sequence_logprob(logits, labels),
            "tokens": (labels != -100).sum(-1),  # TOFU counts unshifted labels: the same, position 0 is prompt
            **memorization_from_logits(logits, labels)}


def answer_scores(model, features: list[dict], pad_id: int, batch_size: int = 8) -> dict[str, list]:
    """Of each feature (`input_ids`, `labels` with -100 off the answer): "loss" (summed cross-entropy of the
    labelled tokens), "tokens" (their count), "es" and "em" (loku.metrics.extraction).

    Slow equivalent of the loss, the test's reference: for each feature alone,
    `F.cross_entropy(model(ids[None]).logits[0, :-1], labels[1:], ignore_index=-100, reduction="sum")`."""
    return per_feature(model, features, pad_id, _measure, batch_size)
