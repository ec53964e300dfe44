"""Evaluation metrics. Each keeps per-item values beside its aggregate.

`extraction`: memorization accuracy (MA) and extraction likelihood (EL_n) of Jang et al. 2023, the forgetting
metrics of the TDEC protocol that LoKU reports."""

from .extraction import (GreedySuffixes, extraction_likelihood, extraction_metrics, greedy_suffixes,
                         memorization_accuracy, memorization_metrics)

__all__ = ["GreedySuffixes", "extraction_likelihood", "extraction_metrics", "greedy_suffixes",
           "memorization_accuracy", "memorization_metrics"]
