"""TOFU evaluation exactly as TOFU defines it: per-item logs in TOFU's official format, and Forget Quality
and Model Utility aggregated from them.

    logs = evaluate_tofu(model, tokenizer, "~/loku-data", "runs/ckpt-eval", forget="forget10")
    summary = aggregate(read_logs("runs/ckpt-eval"), read_logs("runs/retain-eval"))
"""

from .summary import aggregate, forget_quality, model_utility, per_item
from .evaluate import TASKS, TOFU_DS_SIZE, TOFU_MAX_LENGTH, evaluate_set, evaluate_tofu, load_sets
from .logs import AGGREGATED, LOG_FILES, LOG_KEYS, read_logs, write_logs
from .finetune import TofuFinetuneConfig, finetune_tofu
from .run import TofuUnlearnConfig, run_tofu

__all__ = ["aggregate", "forget_quality", "model_utility", "per_item", "evaluate_tofu", "evaluate_set",
           "load_sets", "read_logs", "write_logs", "TASKS", "LOG_FILES", "LOG_KEYS", "AGGREGATED",
           "TOFU_DS_SIZE", "TOFU_MAX_LENGTH", "TofuFinetuneConfig", "finetune_tofu", "TofuUnlearnConfig", "run_tofu"]
