"""MUSE's numbers of a model against a retrained model: PrivLeak needs the retrained model's AUC."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import Config, setting
from ..errors import LokuError
from .conventions import get_convention
from .privleak import privleak

COLUMNS = {"verbmem_f": "VerbMem forget (lower)", "knowmem_f": "KnowMem forget (lower)",
           "knowmem_r": "KnowMem retain (higher)", "privleak": "PrivLeak (near 0)"}


def check_comparable(model: dict, retrain: dict, what: str = "retrained model") -> None:
    """Two evaluations compare only under the same corpus, convention, k, limit and decoding lengths."""
    a, b = model.get("scoring", {}), retrain.get("scoring", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            raise LokuError(f"the {what}'s evaluation used {key}={b.get(key)!r}, this one {a.get(key)!r}: "
                            f"evaluate both with the same --{key.replace('_', '-')}")
    for metric, n in model.get("items", {}).items():
        theirs = retrain.get("items", {}).get(metric)
        if theirs is not None and theirs != n:
            raise LokuError(f"{metric}: the {what} was scored on {theirs} items, this model on {n}: evaluate "
                            "both on the same MUSE files and --limit")


def against_retrain(model: dict, retrain: dict | None) -> dict:
    """The model's metrics, PrivLeak taken against `retrain`'s AUC when given (else the model's own,
    computed with the convention's default AUC_retrain)."""
    metrics = dict(model["metrics"])
    if retrain is None or "auc" not in model:
        return metrics
    if "auc" not in retrain:
        raise LokuError("the retrained model's evaluation has no PrivLeak AUC: evaluate it with privleak in "
                        "--metrics")
    check_comparable(model, retrain)
    metrics["privleak"] = privleak(model["auc"], retrain["auc"], get_convention(model["convention"]).eps)
    return metrics


def aggregate(model: dict, retrain: dict) -> dict:
    """`loku muse aggregate`: the model's and the retrained model's numbers, PrivLeak of the model against
    the retrained model's AUC (0 for the retrained model itself)."""
    check_comparable(model, retrain)
    retrain_metrics = against_retrain(retrain, retrain)
    return {"model": against_retrain(model, retrain), "retrain": retrain_metrics,
            "auc": model.get("auc"), "auc_retrain": retrain.get("auc"), "convention": model["convention"],
            "corpus": model["corpus"]}


def _fmt(x) -> str:
    return "" if x is None else f"{x:.2f}"


def markdown_table(rows: dict[str, dict]) -> str:
    """One row per model (label -> metrics), MUSE's four columns (x 100, PrivLeak in %)."""
    cols = [c for c in COLUMNS if any(c in r for r in rows.values())]
    lines = ["| model | " + " | ".join(COLUMNS[c] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for label, r in rows.items()]
    return "\n".join(lines)


@dataclass
class MuseAggregateConfig(Config):
    """Options of `loku muse aggregate`."""

    model_eval: str = setting("", "The model's muse.json (or its folder) from `loku muse eval`.", positional=True)
    retrain_eval: str = setting("", "The retrained model's muse.json (or its folder).", positional=True)
    as_json: bool = setting(False, "Print JSON instead of a table.", aliases=("--json",))

    def check(self):
        if not self.model_eval or not self.retrain_eval:
            raise LokuError("aggregate needs two evaluations: loku muse aggregate MODEL_EVAL RETRAIN_EVAL")
