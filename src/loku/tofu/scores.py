"""Per-sequence answer losses, the quantity every TOFU probability and truth ratio is built from.

TOFU (`get_batch_loss`) sums the token cross-entropies of the labelled tokens (the answer and the EOS
after it) and divides by their count for the `avg_*` values, so a probability is the per-token geometric
mean exp(-loss / n), not the probability of the whole answer. `sequence_losses` (loku.metrics.perplexity)
computes exactly those sums and counts.
"""

from ..metrics.perplexity import sequence_losses

__all__ = ["sequence_losses"]
