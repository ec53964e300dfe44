"""Attacks on an unlearned model, each returning a model (or probes) to measure and leaving the input untouched.

`quantize`: round the weights to INT8 / INT4 (per channel, per group) / NF4 grids (fake quantization).
`relearn`: fine-tune a copy for k steps on part of the forget set or on related text.
`paraphrase`: probe with perturbed prefixes (text) or TOFU's paraphrased questions (QA).
"""

from .quantize import DEFAULT_QUANTIZERS, Quantizer, parse_quantizer, quantize_model

__all__ = ["DEFAULT_QUANTIZERS", "Quantizer", "parse_quantizer", "quantize_model"]
