"""Evaluation metrics. Each keeps per-item values beside its aggregate.

`extraction`: memorization accuracy (MA) and extraction likelihood (EL_n) of Jang et al. 2023, the forgetting
metrics of the TDEC protocol that LoKU reports; extraction strength (ES) and exact memorization (EM) as
OpenUnlearning defines them. `membership`: membership-inference scores (LOSS, ZLib, Min-K%, Min-K%++,
reference) and their ROC AUC. `forward`: the one teacher-forced pass per batch they share."""

from .extraction import (GreedySuffixes, extraction_likelihood, extraction_metrics, extraction_strength,
                         greedy_suffixes, memorization_accuracy, memorization_metrics, ragged_metrics)

__all__ = ["GreedySuffixes", "extraction_likelihood", "extraction_metrics", "extraction_strength", "greedy_suffixes",
           "memorization_accuracy", "memorization_metrics", "ragged_metrics"]
