"""TOFU's official per-item log files: names, keys, writing and reading.

One log per evaluation set, each a dict from metric name to {item index (string): value}, and
`eval_log_aggregated.json` holding the four keyed by file name. These are the files TOFU's
`aggregate_eval_stat.py` and its leaderboard consume, so they keep TOFU's names exactly.

loku adds one key to each set's log, `prompt_format` (the format its texts were built in, e.g. "tofu-phi";
`loku.data.qa`): TOFU's scripts read metrics by name and pass it by, and logs made in different formats are
refused as a pair (`check_same_format`). TOFU's published logs carry none.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LokuError
from ..io import write_text

RETAIN, REAL_AUTHORS, REAL_WORLD, FORGET = (
    "eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json", "eval_log_forget.json")
LOG_FILES = (RETAIN, REAL_AUTHORS, REAL_WORLD, FORGET)  # TOFU's eval_task order
AGGREGATED = "eval_log_aggregated.json"

# Keys of one set's log, in the order TOFU writes them; sets without a forget/retain role also get
# normalized_gt_loss (TOFU's `normalize_gt`, on for every task whose name lacks "eval_log").
LOG_KEYS = ("avg_gt_loss", "gt_loss", "num_token_gt", "generated_text", "rouge1_recall", "rougeL_recall",
            "average_perturb_loss", "avg_paraphrased_loss", "truth_ratio", "paraphrased_loss", "perturb_loss",
            "num_token_paraphrased", "num_token_perturb")
NORMALIZED_KEY = "normalized_gt_loss"
# loku's additions after TOFU's keys: OpenUnlearning's extraction strength and exact memorization of the
# ground-truth answer (its `extraction_strength` / `exact_memorization`; loku.metrics.extraction).
ES_KEY, EM_KEY = "extraction_strength", "exact_memorization"
FORMAT_KEY = "prompt_format"


def has_normalized(log_file: str) -> bool:
    return "eval_log" not in log_file


def stamp_format(logs: dict[str, dict], prompt_format: str) -> dict[str, dict]:
    """Each set's log with the prompt format it was made in."""
    return {name: {**log, FORMAT_KEY: prompt_format} for name, log in logs.items()}


def log_format(logs: dict, who: str = "log") -> str | None:
    """The prompt format an aggregated log records, None if it records none (TOFU's own logs)."""
    found = {log[FORMAT_KEY] for log in logs.values() if isinstance(log, dict) and FORMAT_KEY in log}
    if len(found) > 1:
        raise LokuError(f"{who} mixes sets made in different prompt formats ({', '.join(sorted(map(str, found)))}): "
                        "evaluate all four sets in one run (loku tofu eval)")
    return found.pop() if found else None


def check_same_format(ckpt_logs: dict, retain_logs: dict) -> None:
    """Refuse a checkpoint/retain pair whose logs record different prompt formats: their losses and
    generations are not comparable."""
    mine, theirs = log_format(ckpt_logs, "checkpoint log"), log_format(retain_logs, "retain log")
    if mine is not None and theirs is not None and mine != theirs:
        raise LokuError(f"the checkpoint log was made with prompt format {mine} and the retain log with {theirs}: "
                        f"evaluate both with the same --prompt-format")


def write_logs(out_dir: str | Path, logs: dict[str, dict]) -> Path:
    """Each set's log under its own name, then eval_log_aggregated.json; each file written atomically.
    Returns the aggregated file's path."""
    out_dir = Path(out_dir)
    for name, log in logs.items():
        write_text(out_dir / name, json.dumps(log, indent=4) + "\n")
    write_text(out_dir / AGGREGATED, json.dumps(logs, indent=4) + "\n")
    return out_dir / AGGREGATED


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LokuError(f"TOFU log {path} does not exist: check the path") from None
    except json.JSONDecodeError as e:
        raise LokuError(f"TOFU log {path} line {e.lineno} is not valid JSON ({e.msg}): rerun the evaluation") from None
    if not isinstance(data, dict):
        raise LokuError(f"TOFU log {path} is not a JSON object: pass an eval_log_aggregated.json")
    return data


def read_logs(path: str | Path) -> dict[str, dict]:
    """An aggregated log (as json.load gives it) from eval_log_aggregated.json, or from a folder holding
    it, or else holding the separate per-set files."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / AGGREGATED).is_file():
            return _load(path / AGGREGATED)
        found = {name: _load(path / name) for name in LOG_FILES if (path / name).is_file()}
        if not found:
            raise LokuError(f"folder {path} holds no TOFU logs ({AGGREGATED} or {', '.join(LOG_FILES)}): "
                            "pass the --out folder of `loku tofu eval`")
        return found
    return _load(path)
