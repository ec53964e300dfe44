"""Per-sequence answer losses, the quantity every TOFU probability and truth ratio is built from.

TOFU (`get_batch_loss`) sums the token cross-entropies of the labelled tokens (the answer and the EOS
after it) and divides by their count for the `avg_*` values, so a probability is the per-token geometric
mean exp(-loss / n), not the probability of the whole answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batches import collate


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()   # not inference_mode: ZeRO-3 keeps weights gathered here, and training reuses them
def sequence_losses(model, features: list[dict], pad_id: int, batch_size: int = 8) -> tuple[list[float], list[int]]:
    """(summed loss, labelled-token count) of each feature (`input_ids`, `labels` with -100 off the answer).

    Slow equivalent, the test's reference: for each feature alone, `logits = model(ids[None]).logits[0]`
    and `F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")`. Batches are
    right-padded (masked) and sorted by length so little compute goes to padding.
    """
    device = model_device(model)
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    sums, counts = [0.0] * len(features), [0] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in idx], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"]                                                                     # (B, T)
        target = labels[:, 1:]                                                                       # (B, T-1)
        keep = target != -100                                                                        # (B, T-1)
        # cross-entropy only where a label is, in float32 whatever the model's dtype: (N, V) -> (N,)
        token_loss = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
        per_seq = torch.zeros(len(idx), device=device).index_put_(
            (keep.nonzero()[:, 0],), token_loss, accumulate=True)                                    # (B,)
        n_tokens = (labels != -100).sum(-1)  # TOFU counts unshifted labels: the same, as position 0 is prompt
        for j, i in enumerate(idx):
            sums[i], counts[i] = float(per_seq[j]), int(n_tokens[j])
    return sums, counts
