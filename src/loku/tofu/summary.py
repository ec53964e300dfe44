"""Forget Quality and Model Utility from two aggregated TOFU logs, as TOFU's `aggregate_eval_stat.py`.

Per set, from the per-item values of the log:
- Prob.: mean of exp(-avg_gt_loss) for retain and forget; for real authors and world facts the answer's
  share among itself and its perturbations, p / (p + sum p_perturbed), each p = exp(-per-token loss).
- ROUGE: mean rougeL_recall.
- Truth Ratio: with r = exp(mean(average_perturb_loss) - avg_paraphrased_loss) per item, i.e. the base
  answer's probability over the geometric mean of the perturbed ones: forget mean(min(r, 1/r));
  every other set mean(max(0, 1 - 1/r)).
Model Utility is the harmonic mean of the 9 non-forget numbers; Forget Quality the p-value of the
two-sample KS test between the forget-set r of the checkpoint and of the retain model.
ES Forget and EM Forget: the mean extraction strength and exact memorization of the forget answers, where
the log has them (loku's logs do; TOFU's own do not), as OpenUnlearning's `configs/eval/tofu.yaml` reports
them on the forget set only.
(TOFU's utils.py has an older variant averaging perturbed probabilities arithmetically; the
aggregate script, OpenUnlearning and the leaderboard use the geometric form kept here.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config_base import Config, setting
from ..errors import LokuError
from .logs import EM_KEY, ES_KEY, FORGET, LOG_FILES, REAL_AUTHORS, REAL_WORLD, RETAIN, check_same_format

SET_NAMES = {REAL_AUTHORS: "Real Authors", REAL_WORLD: "Real World", RETAIN: "Retain", FORGET: "Forget"}
METRICS = ("ROUGE", "Prob.", "Truth Ratio")
NEEDED = ("avg_gt_loss", "rougeL_recall", "avg_paraphrased_loss", "average_perturb_loss")


def _require(logs, who: str, files=LOG_FILES, keys=NEEDED) -> None:
    if not isinstance(logs, dict):
        raise LokuError(f"{who} log is not a JSON object: pass an eval_log_aggregated.json")
    for f in files:
        if f not in logs:
            raise LokuError(f"{who} log has no {f!r}: evaluate all four TOFU sets (loku tofu eval) "
                            "and pass eval_log_aggregated.json")
        for k in keys:
            if not isinstance(logs[f].get(k) if isinstance(logs[f], dict) else None, dict):
                raise LokuError(f"{who} log {f} has no {k!r} values: pass a TOFU per-item log "
                                "(loku tofu eval writes them)")


def _values(task_log: dict, key: str, order: list[str], where: str) -> np.ndarray:
    """The metric's per-item values, aligned on `order` (TOFU relies on dict order; we check)."""
    values = task_log[key]
    if sorted(values, key=_index) != order:
        raise LokuError(f"{where}: {key!r} covers items {_span(values)} but avg_gt_loss covers {_span(order)}: "
                        "rerun the evaluation; the file was edited or cut")
    return np.asarray([values[i] for i in order], dtype=float)


def _index(key: str):
    return (0, int(key)) if str(key).lstrip("-").isdigit() else (1, str(key))


def _span(keys) -> str:
    keys = sorted(keys, key=_index)
    return f"{len(keys)} ({keys[0]}..{keys[-1]})" if keys else "0"


def per_item(task_log: dict, where: str = "log") -> dict[str, np.ndarray]:
    """Per-item arrays of one set: index order, probability, normalized probability, ROUGE-L recall and
    r = P(base answer) / geometric-mean P(perturbed) (TOFU aggregate's `curr_stat_1`)."""
    order = sorted(task_log["avg_gt_loss"], key=_index)
    gt = _values(task_log, "avg_gt_loss", order, where)
    para = _values(task_log, "avg_paraphrased_loss", order, where)
    lengths = {len(v) for v in task_log["average_perturb_loss"].values()}
    if len(lengths) != 1:
        raise LokuError(f"{where}: items have different numbers of perturbed answers {sorted(lengths)}: "
                        "rerun the evaluation on an unmodified TOFU split")
    perturb = _values(task_log, "average_perturb_loss", order, where)              # (N, P)
    p_true, p_false = np.exp(-gt), np.exp(-perturb)                                # (N,), (N, P)
    return {
        "index": np.asarray(order),
        "prob": p_true,
        "normalized_prob": p_true / (p_true + p_false.sum(-1)),
        "rougeL_recall": _values(task_log, "rougeL_recall", order, where),
        "stat": np.exp(perturb.mean(-1) - para),
    }


def model_utility(logs: dict) -> dict[str, float]:
    """The 12 set numbers (TOFU names, TOFU order) and "Model Utility", from one aggregated log."""
    from scipy.stats import hmean

    _require(logs, "checkpoint")
    out: dict[str, float] = {}
    for f in (REAL_AUTHORS, REAL_WORLD, RETAIN, FORGET):
        items, name = per_item(logs[f], f), SET_NAMES[f]
        prob = items["prob"] if "eval_log" in f else items["normalized_prob"]
        r = items["stat"]
        truth = np.minimum(r, 1 / r) if "forget" in f else np.maximum(0, 1 - 1 / r)
        out[f"ROUGE {name}"] = float(items["rougeL_recall"].mean())
        out[f"Prob. {name}"] = float(prob.mean())
        out[f"Truth Ratio {name}"] = float(truth.mean())
    out["Model Utility"] = float(hmean([v for k, v in out.items() if "Forget" not in k]))
    return out


def forget_memorization(logs: dict) -> dict[str, float]:
    """"ES Forget" and "EM Forget", the means of the forget log's per-item values; {} for a log without them."""
    log = logs[FORGET]
    order = sorted(log["avg_gt_loss"], key=_index)
    return {name: float(_values(log, key, order, FORGET).mean())
            for key, name in ((ES_KEY, "ES Forget"), (EM_KEY, "EM Forget")) if isinstance(log.get(key), dict)}


def forget_quality(ckpt_logs: dict, retain_logs: dict) -> dict[str, float]:
    """KS test between the forget-set truth ratios of the checkpoint and of the retain model: its p-value
    is Forget Quality (high = indistinguishable from never having trained on the forget set). Logs that
    record different prompt formats are refused."""
    from scipy.stats import ks_2samp

    _require(ckpt_logs, "checkpoint", (FORGET,))
    _require(retain_logs, "retain", (FORGET,))
    check_same_format(ckpt_logs, retain_logs)
    ckpt, retain = per_item(ckpt_logs[FORGET], "checkpoint"), per_item(retain_logs[FORGET], "retain")
    if list(ckpt["index"]) != list(retain["index"]):
        raise LokuError(f"forget items differ: checkpoint log has {_span(ckpt['index'])}, retain log "
                        f"{_span(retain['index'])}: evaluate both on the same forget split and --limit")
    test = ks_2samp(ckpt["stat"], retain["stat"])
    return {"Forget Quality": float(test.pvalue), "KS Test PVal Forget": float(test.pvalue),
            "KS Test Forget": float(test.statistic)}


def aggregate(ckpt_log: dict, retain_log: dict) -> dict[str, float]:
    """TOFU's summary of a checkpoint: the 12 set numbers, Model Utility and Forget Quality (against
    the retain model's log), and ES/EM Forget where the log has them, from two aggregated logs as json.load
    gives them."""
    _require(ckpt_log, "checkpoint")
    _require(retain_log, "retain", (FORGET,))
    return {**model_utility(ckpt_log), **forget_quality(ckpt_log, retain_log), **forget_memorization(ckpt_log)}


@dataclass
class AggregateConfig(Config):
    """Options of `loku tofu aggregate`."""

    ckpt: str = setting("", "The checkpoint's eval_log_aggregated.json (or its folder).", positional=True)
    retain: str = setting("", "The retain model's eval_log_aggregated.json (or its folder).", positional=True)
    as_json: bool = setting(False, "Print JSON instead of a table.", aliases=("--json",))

    def check(self):
        if not self.ckpt or not self.retain:
            raise LokuError("aggregate needs two logs: loku tofu aggregate CKPT/eval_log_aggregated.json "
                            "RETAIN/eval_log_aggregated.json")
