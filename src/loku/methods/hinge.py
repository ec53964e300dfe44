"""LoKU's own method: the inverted hinge loss on forget (FILA is its default LoRA initialisation)."""

from __future__ import annotations

from ..losses import inverted_hinge_loss
from .base import LossInputs, method, retain_ce


@method("ihl", "inverted hinge loss on forget + retain cross-entropy (LoKU)", needs_retain=True, default_init="fila")
def ihl(x: LossInputs, s: None):
    return {"forget": inverted_hinge_loss(x.forget_logits, x.forget_labels), "retain": retain_ce(x)}
