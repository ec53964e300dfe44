"""Attacks on an unlearned model, each returning a model (or probes) to measure and leaving the input untouched.

`quantize`: round the weights to INT8 / INT4 (per channel, per group) / NF4 grids (fake quantization).
`relearn`: fine-tune a copy for k steps on part of the forget set or on related text.
`paraphrase`: probe with perturbed prefixes (text) or TOFU's paraphrased questions (QA).
"""

from .paraphrase import QA_KIND, TEXT_KINDS, prefix_probes, question_probes
from .quantize import DEFAULT_QUANTIZERS, Quantizer, parse_quantizer, quantize_model
from .relearn import DEFAULT_STEPS, RelearnSettings, relearn, relearning_curve, split_forget

__all__ = ["DEFAULT_QUANTIZERS", "DEFAULT_STEPS", "QA_KIND", "Quantizer", "RelearnSettings", "TEXT_KINDS",
           "parse_quantizer", "prefix_probes", "quantize_model", "question_probes", "relearn", "relearning_curve",
           "split_forget"]
