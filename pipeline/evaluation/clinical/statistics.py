"""Diagnostic-accuracy statistics with patient-level bootstrap confidence intervals.

Every metric is computed from weighted confusion counts so that one call scores the
observed data (weights 1) and all bootstrap resamples at once (weights = how often each
image's patient was drawn). The tests check each formula against scikit-learn, on the
observed data and on explicitly resampled data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score, roc_curve
from statsmodels.stats.contingency_tables import mcnemar

BINARY_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "mcc", "roc_auc")
CONFIDENCE_LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile bootstrap confidence interval (None: undefined)."""

    value: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def weighted_auc(truth: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC (Mann-Whitney, ties count 1/2) for each row of ``weights`` (R, N); NaN for one class."""
    positive, negative = score[truth], score[~truth]
    wins = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    w_pos, w_neg = weights[:, truth], weights[:, ~truth]
    pairs = np.einsum("rp,pn,rn->r", w_pos, wins, w_neg)
    return _ratio(pairs, w_pos.sum(axis=1) * w_neg.sum(axis=1))


def binary_metrics(
    truth: np.ndarray, predicted: np.ndarray, score: np.ndarray | None, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric of BINARY_METRICS for each row of ``weights`` (R, N).

    ``truth`` and ``predicted`` are boolean (positive = True); ``score`` is the continuous
    score behind ``predicted`` (None: no ROC-AUC). Undefined values are NaN, except MCC,
    which is 0 when a margin is empty (as scikit-learn's ``matthews_corrcoef``).
    """
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp = weights @ (truth & predicted)
    fp = weights @ (~truth & predicted)
    fn = weights @ (truth & ~predicted)
    tn = weights @ (~truth & ~predicted)
    margins = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    mcc = _ratio(tp * tn - fp * fn, np.sqrt(margins))
    auc = (
        weighted_auc(truth, np.asarray(score, float), weights)
        if score is not None
        else np.full(len(tp), np.nan)
    )
    return {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": np.where(margins > 0, mcc, 0.0),
        "roc_auc": auc,
    }


def bootstrap_weights(patient_keys: Sequence[str] | np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Weights (1 + n_resamples, N): row 0 all ones (the observed data), then one row per
    resample of the patients with replacement; an image weighs as often as its patient was drawn."""
    patients, image_patient = np.unique(np.asarray(patient_keys), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(patients), np.full(len(patients), 1 / len(patients)), size=n_resamples)
    return np.vstack([np.ones(len(image_patient)), counts[:, image_patient]])


def summarise(values: np.ndarray) -> Estimate:
    """Row 0 of ``values`` as the estimate, the percentiles of the other rows as the 95% CI
    (resamples where the metric is undefined are left out)."""
    value = float(values[0]) if np.isfinite(values[0]) else None
    resampled = values[1:][np.isfinite(values[1:])]
    if value is None or resampled.size == 0:
        return Estimate(value, None, None)
    tail = 100 * (1 - CONFIDENCE_LEVEL) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Estimate(value, float(low), float(high))


def summarise_all(metrics: dict[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """:func:`summarise` every metric of a :func:`binary_metrics` result."""
    return {name: summarise(values).as_dict() for name, values in metrics.items()}


def choose_threshold(truth: np.ndarray, score: np.ndarray, method: str, target: float | None = None) -> float:
    """The score threshold (positive when score >= threshold) chosen on validation data.

    ``youden``: maximises sensitivity + specificity - 1 (Youden's J).
    ``sensitivity``: the highest threshold whose sensitivity reaches ``target``.
    """
    truth = np.asarray(truth, bool)
    if truth.all() or not truth.any():
        raise ValueError("the validation images hold a single class: cannot choose a threshold on them")
    fpr, tpr, thresholds = roc_curve(truth, score)
    finite = np.isfinite(thresholds)  # roc_curve starts with +inf (nothing positive)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if method == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])
    if method == "sensitivity":
        if target is None or not 0 < target <= 1:
            raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
        return float(thresholds[np.argmax(tpr >= target)])
    raise ValueError(f"unknown threshold method {method!r}: expected 'youden' or 'sensitivity'")


def mcnemar_exact(first_correct: np.ndarray, second_correct: np.ndarray) -> dict[str, float | int]:
    """McNemar's exact (binomial) test on paired correctness of two readers of the same cases."""
    first_correct, second_correct = np.asarray(first_correct, bool), np.asarray(second_correct, bool)
    table = np.array(
        [
            [np.sum(first_correct & second_correct), np.sum(first_correct & ~second_correct)],
            [np.sum(~first_correct & second_correct), np.sum(~first_correct & ~second_correct)],
        ]
    )
    result = mcnemar(table, exact=True)
    return {
        "both_correct": int(table[0, 0]),
        "only_first_correct": int(table[0, 1]),
        "only_second_correct": int(table[1, 0]),
        "both_wrong": int(table[1, 1]),
        "p_value": float(result.pvalue),
    }


def kappa(first: np.ndarray, second: np.ndarray) -> float | None:
    """Cohen's kappa of two label vectors (None when undefined, e.g. both constant and equal)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)  # "a single label was found": kappa undefined
        value = cohen_kappa_score(first, second, replace_undefined_by=np.nan)
    return float(value) if np.isfinite(value) else None
