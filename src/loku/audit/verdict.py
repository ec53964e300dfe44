"""Is the forget set indistinguishable from never-seen text? Margins, bootstrap intervals, verdicts.

For a per-example metric (MA, EL_n, ES, EM) the margin is mean(forget) - mean(unseen); for a membership
attack it is AUC(forget vs unseen) - 0.5. The interval is a percentile bootstrap (scipy.stats.bootstrap,
forget and unseen resampled independently, seeded). The verdict:
- "indistinguishable from never-seen": the interval reaches the never-seen level (0 margin), within `tolerance`;
- "above never-seen": the whole interval lies above it: the model still knows the forget set better;
- "below never-seen": the whole interval lies below it: the forget set now looks *less* familiar than text the
  model never saw, which gives it away too (an over-unlearned model is as detectable as a remembering one).
The percentile method, not BCa: BCa is undefined where every resample gives the same value (an AUC of 1.0,
an EL of 0 on every example), which is common here.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap, mannwhitneyu

INDISTINGUISHABLE = "indistinguishable from never-seen"
ABOVE = "above never-seen"
BELOW = "below never-seen"


def _mean_difference(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _auc(a, b, axis=-1):
    """ROC AUC of a (members) against b as the Mann-Whitney U of a over |a| |b|: equal to scikit-learn's
    roc_auc_score (tested), and vectorized over bootstrap resamples."""
    return mannwhitneyu(a, b, axis=axis).statistic / (np.shape(a)[axis] * np.shape(b)[axis])


def _interval(statistic, forget, unseen, n_resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    forget, unseen = np.asarray(forget, dtype=float), np.asarray(unseen, dtype=float)
    if len(forget) < 2 or len(unseen) < 2 or (np.ptp(forget) == 0 and np.ptp(unseen) == 0):
        value = float(statistic(forget, unseen))   # nothing to resample: the interval is the value
        return value, value
    res = bootstrap((forget, unseen), statistic, n_resamples=n_resamples, confidence_level=confidence,
                    method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def verdict(low: float, high: float, tolerance: float = 0.0) -> str:
    """From a margin's interval (never-seen level at 0)."""
    if low > tolerance:
        return ABOVE
    if high < -tolerance:
        return BELOW
    return INDISTINGUISHABLE


def compare_means(forget, unseen, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                  tolerance: float = 0.0) -> dict:
    """{"forget", "unseen", "margin", "interval", "verdict"} for one per-example metric."""
    f, u = float(np.mean(forget)), float(np.mean(unseen))
    low, high = _interval(_mean_difference, forget, unseen, n_resamples, confidence, seed)
    return {"forget": f, "unseen": u, "margin": f - u, "interval": [low, high],
            "verdict": verdict(low, high, tolerance)}


def compare_auc(forget_scores, unseen_scores, *, n_resamples: int = 1000, confidence: float = 0.95,
                seed: int = 0, tolerance: float = 0.0) -> dict:
    """{"auc", "margin", "interval" (of the AUC), "verdict"} for one membership attack (forget = members)."""
    from ..metrics.membership import auc

    value = auc(forget_scores, unseen_scores)
    low, high = _interval(_auc, forget_scores, unseen_scores, n_resamples, confidence, seed)
    return {"auc": value, "margin": value - 0.5, "interval": [low, high],
            "verdict": verdict(low - 0.5, high - 0.5, tolerance)}


MIN_GAP = 0.01  # recovery is undefined when unlearning moved a metric by less than this


def recovery(attacked: float | None, unlearned: float | None, original: float | None) -> float | None:
    """(attacked - unlearned) / (original - unlearned): 0 = the attack brought nothing back, 1 = all of what
    unlearning removed; None when a value is missing or unlearning moved the metric by less than MIN_GAP."""
    if attacked is None or unlearned is None or original is None:
        return None
    gap = original - unlearned
    return None if abs(gap) < MIN_GAP else (attacked - unlearned) / gap
