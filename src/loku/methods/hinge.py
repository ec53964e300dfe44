"""LoKU's own method: the inverted hinge loss on forget (FILA is its default LoRA initialisation)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import setting
from ..losses import held_cross_entropy, inverted_hinge_loss, kl_divergence
from .base import LossInputs, method, retain_ce


@dataclass(frozen=True)
class IHLSettings:
    retain_loss: str = setting("ce", "the retain term: ce (cross-entropy on the retain tokens, the paper's) or kl "
                               "(KL to the frozen start model over the retain tokens, as OpenUnlearning's GradDiff "
                               "retain_loss_type KL: keeps the whole next-token distribution, not only the true "
                               "token's; one more forward pass per retain batch) or ce+kl (their sum: the true "
                               "tokens pulled back as by ce, the rest of the distribution kept as by kl) or held "
                               "(cross-entropy only where a retain token fell below its probability under the start "
                               "model: the retain data is held, not fine-tuned further) or held+kl.",
                               choices=("ce", "kl", "ce+kl", "held", "held+kl"))


@method("ihl", "inverted hinge loss on forget + retain cross-entropy (LoKU)", settings=IHLSettings, needs_retain=True,
        default_init="fila", reference=lambda s: s.retain_loss != "ce", reference_on=("retain",))
def ihl(x: LossInputs, s: IHLSettings):
    retain, parts = 0.0, s.retain_loss.split("+")
    if "ce" in parts:
        retain = retain + retain_ce(x)
    if "held" in parts:
        retain = retain + held_cross_entropy(x.retain_logits, x.ref_retain_logits, x.retain_labels)
    if "kl" in parts:
        retain = retain + kl_divergence(x.ref_retain_logits, x.retain_logits, x.retain_labels, "tokens")
    return {"forget": inverted_hinge_loss(x.forget_logits, x.forget_labels), "retain": retain}
