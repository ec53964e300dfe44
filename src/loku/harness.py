"""Run EleutherAI's lm-evaluation-harness on a model already in memory (e.g. right after unlearning).

loku's own `metrics.utility` reproduces Jang et al.'s prompts so numbers compare with the LoKU paper;
lm-evaluation-harness uses its own (different) prompts and reports length-normalised accuracy too, so its
numbers compare with the wider literature instead. It is an optional dependency, imported only here, and
it downloads its task data from the Hugging Face hub.
"""

from __future__ import annotations

from typing import Sequence

from .errors import LokuError

# loku task name -> lm-evaluation-harness task name (same data, the harness's own prompts)
HARNESS_TASKS = {"piqa": "piqa", "hellaswag": "hellaswag", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
                 "copa": "copa", "winogrande": "winogrande", "mathqa": "mathqa", "pubmedqa": "pubmedqa",
                 "lambada": "lambada_openai", "wikitext": "wikitext"}


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise LokuError("lm-evaluation-harness is not installed: pip install lm-eval "
                        f"(needed only for loku.harness; {e})") from e
    return lm_eval, HFLM


def harness_evaluate(model, tokenizer, tasks: Sequence[str] = ("piqa", "arc_easy"), limit: int | None = None,
                     batch_size: int = 8, num_fewshot: int = 0, max_length: int | None = None,
                     include_path: str | None = None, log_samples: bool = False) -> dict:
    """Evaluate `model` with lm-evaluation-harness's `HFLM` wrapper, without saving it to disk.

    `tasks` may be loku names (mapped through HARNESS_TASKS) or any harness task name. Returns
    {"tasks": {name: {metric: value}}, "raw": the harness's full result dict}. A PEFT model should be
    passed merged (`merge_and_unload()` on a copy) or as its base model, since HFLM expects a
    transformers model. `include_path` is a folder of the user's own harness task YAMLs (e.g. local data
    files); `log_samples` keeps the harness's per-item records in raw["samples"]."""
    lm_eval, HFLM = _lm_eval()
    names = [HARNESS_TASKS.get(t, t) for t in tasks]
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        from lm_eval.tasks import TaskManager

        raw = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=TaskManager(include_path=include_path),
                                      log_samples=log_samples)
    finally:
        model.train(was_training)
    results = {task: {k.split(",")[0]: v for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not k.startswith("alias")}
               for task, metrics in (raw or {}).get("results", {}).items()}
    return {"tasks": results, "raw": raw}
