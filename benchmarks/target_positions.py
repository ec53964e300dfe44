"""Seconds of the demo's unlearning epochs (IHL + FILA, `--ihl-retain-loss ce+kl`, the whole retain set in every
step) with the cross-entropy and IHL softmaxes over every position of the batch, as before this change, and over
the target positions only, as now (`loku.losses.token_logprobs`, `inverted_hinge_loss`). The demo's retain batch
is 20 rows of 12 to 81 tokens: 895 of its 1620 positions are tokens, the rest padding; its forget batch's targets
are the private values only. Alternating runs in one process, on one model (a leaked one saved by
`benchmarks/demo_tuning.py leak DIR`); the adapters of the two must be bit-identical (`demo_epochs.py`).

    python benchmarks/target_positions.py DIR [--seed 0 --epochs 2 --rounds 2]   # --seed: the leak's (the people)
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from demo_epochs import arguments, compare
from loku import losses
from loku.methods import hinge

RESULTS = Path(__file__).parent / "results" / "target_positions.json"


# ---- before this change (loku.losses at 5d34cc5): the softmax over every position, padding included ----
def token_logprobs_every_position(logits, labels, ignore_index=losses.IGNORE):
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    nll = F.cross_entropy(losses.upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                          reduction="none").view(labels.shape)
    return -nll, mask


def inverted_hinge_loss_every_position(logits, labels, ignore_index=losses.IGNORE):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != ignore_index
    target = labels.clamp(min=0).unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    logit_y = logits.gather(-1, target).squeeze(-1)
    top2_val, top2_idx = logits.topk(2, dim=-1)
    y_is_top = top2_idx[..., 0] == target.squeeze(-1)
    logit_other = torch.where(y_is_top, top2_val[..., 1], top2_val[..., 0])
    per_token = 1.0 + torch.exp(logit_y - lse) - torch.exp(logit_other - lse)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@contextmanager
def softmax_over_every_position():
    now = losses.token_logprobs, hinge.inverted_hinge_loss
    losses.token_logprobs, hinge.inverted_hinge_loss = token_logprobs_every_position, inverted_hinge_loss_every_position
    try:
        yield
    finally:
        losses.token_logprobs, hinge.inverted_hinge_loss = now


if __name__ == "__main__":
    compare(arguments(__doc__), softmax_over_every_position, "softmax over", ("every position", "target positions"),
            RESULTS)
