"""WMDP (Li et al. 2024) with MMLU as the utility, through lm-evaluation-harness's own `wmdp_*` and `mmlu`
tasks, from the hub or from local copies of the hub datasets.

    result = evaluate_wmdp(model, tokenizer, WmdpEvalConfig(data_dir="DATA"))   # DATA/wmdp, DATA/mmlu
    result["tasks"]["wmdp_bio"]["acc"]
"""

from .evaluate import WmdpEvalConfig, eval_wmdp, evaluate_wmdp
from .tasks import TASKS, local_tasks, task_sources

__all__ = ["WmdpEvalConfig", "eval_wmdp", "evaluate_wmdp", "TASKS", "local_tasks", "task_sources"]
