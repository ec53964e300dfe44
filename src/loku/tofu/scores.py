"""TOFU's per-sequence answer losses (`get_batch_loss`: summed token cross-entropies of the answer and its EOS,
and their count; a probability is the per-token geometric mean exp(-loss / n)): loku.metrics.perplexity's."""

from ..metrics.perplexity import sequence_losses

__all__ = ["sequence_losses"]
