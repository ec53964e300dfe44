"""The TDEC protocol (Jang et al. 2023; LoKU Table 1): make a model forget sequences it can emit verbatim,
stop once it extracts them no better than text it never saw, and check what the model still can do."""

from .data import TDEC_FILES, Sequences, load_sequences, read_texts, retain_examples, text_file, tokenize_sequences
from .measure import ExtractionMeter, measure_sequences
from .report import markdown_table, plot_epochs, table_row
from .run import TdecConfig, method_label, run_tdec, tdec_markdown, utility_report
from .stop import StopWhenForgotten
from .thresholds import (PRESETS, Thresholds, compute_thresholds, heldout_thresholds, preset_for, read_thresholds,
                         resolve_thresholds)

__all__ = ["PRESETS", "TDEC_FILES", "ExtractionMeter", "Sequences", "StopWhenForgotten", "TdecConfig", "Thresholds",
           "compute_thresholds", "heldout_thresholds", "load_sequences", "markdown_table", "measure_sequences",
           "method_label", "plot_epochs", "preset_for", "read_texts", "read_thresholds", "resolve_thresholds",
           "retain_examples", "run_tdec", "table_row", "tdec_markdown", "text_file", "tokenize_sequences",
           "utility_report"]
