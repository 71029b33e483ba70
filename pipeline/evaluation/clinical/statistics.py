"""Diagnostic-accuracy statistics and their 95% confidence intervals.

Two kinds of interval, neither of which can collapse to zero width on a small group:

* **Proportions** (sensitivity, specificity, PPV, NPV, accuracy): the exact Clopper-Pearson
  interval. Where patients have several images, the images of one patient are not independent:
  the interval then uses Korn and Graubard's effective sample size (1998), the number of images
  divided by the design effect estimated from the patients (never more than the number of
  images). 3 of 3 gives 0.292 to 1.000, 12 of 13 gives 0.640 to 0.998.
* **ROC-AUC and paired model-minus-reader differences**: the bias-corrected and accelerated
  (BCa) bootstrap over patients (Efron 1987; acceleration from the patient jackknife). When
  every resample gives the same value (a small group the model gets entirely right, say), the
  bootstrap has no spread to offer and a score interval is used instead: Newcombe's for the
  ROC-AUC (2006, method 5) and for a difference of paired proportions (1998, method 10).

Metrics are computed from weighted confusion counts so that one call scores the observed data
(weights 1) and every bootstrap or jackknife resample at once (weights: how often each image's
patient was drawn). The tests check each formula against scikit-learn, scipy, statsmodels and
published worked examples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr, ndtri
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv")
BINARY_METRICS = (*PROPORTIONS, "roc_auc")
CONFIDENCE_LEVEL = 0.95
Z = float(ndtri(1 - (1 - CONFIDENCE_LEVEL) / 2))
EXACT = "exact"
EXACT_CLUSTERED = "exact, effective sample size"
BCA = "BCa bootstrap"
SCORE = "score (no bootstrap spread)"


@dataclass(frozen=True)
class Estimate:
    """A point estimate, its 95% confidence interval (None: undefined) and how the interval
    was made; ``count``/``total`` for a proportion (``total`` images, ``count`` of them right)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    method: str | None = None
    count: int | None = None
    total: int | None = None

    def as_dict(self) -> dict[str, float | int | str | None]:
        fields: dict[str, float | int | str | None] = {
            "value": self.value,
            "ci_low": self.low,
            "ci_high": self.high,
            "method": self.method,
        }
        if self.total is not None:
            fields |= {"count": self.count, "total": self.total}
        return fields


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


def weighted_fraction(right: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted fraction of ``right`` images for each row of ``weights`` (R, N); NaN for none."""
    return _ratio(weights @ np.asarray(right, float), weights.sum(axis=1))


def binary_metrics(
    truth: np.ndarray, predicted: np.ndarray, score: np.ndarray | None, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric of BINARY_METRICS for each row of ``weights`` (R, N).

    ``truth`` and ``predicted`` are boolean (positive = True); ``score`` is the continuous
    score behind ``predicted`` (None: no ROC-AUC). Undefined values are NaN.
    """
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp = weights @ (truth & predicted)
    fp = weights @ (~truth & predicted)
    fn = weights @ (truth & ~predicted)
    tn = weights @ (~truth & ~predicted)
    auc = (
        weighted_auc(truth, np.asarray(score, float), weights)
        if score is not None
        else np.full(len(tp), np.nan)
    )
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "roc_auc": auc,
    }


def proportion(right: np.ndarray, patients: Sequence[str] | np.ndarray) -> Estimate:
    """The fraction of ``right`` images with its exact interval, clustered by ``patients``
    (one key per image; see the module docstring)."""
    right = np.asarray(right, bool)
    total, count = len(right), int(right.sum())
    if total == 0:
        return Estimate(None)
    value = count / total
    effective, method = float(total), EXACT
    _, patient = np.unique(np.asarray(patients), return_inverse=True)
    clusters = int(patient.max()) + 1
    if 1 < clusters < total and 0 < count < total:
        per_patient = np.bincount(patient, weights=right)
        images = np.bincount(patient)
        variance = clusters / (clusters - 1) * np.sum((per_patient - value * images) ** 2) / total**2
        effective = min(float(total), value * (1 - value) / variance) if variance > 0 else float(total)
        method = EXACT_CLUSTERED if effective < total else EXACT
    low, high = proportion_confint(value * effective, effective, alpha=1 - CONFIDENCE_LEVEL, method="beta")
    return Estimate(value, float(low), float(high), method, count, total)


def proportions(truth: np.ndarray, predicted: np.ndarray, patients: np.ndarray) -> dict[str, Estimate]:
    """Sensitivity, specificity, PPV and NPV with their exact intervals."""
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    right = truth == predicted
    groups = {
        "sensitivity": truth,
        "specificity": ~truth,
        "ppv": predicted,
        "npv": ~predicted,
    }
    return {name: proportion(right[mask], patients[mask]) for name, mask in groups.items()}


@dataclass(frozen=True)
class Resamples:
    """Bootstrap weights (1 + R, N: row 0 all ones, the observed data) and jackknife weights
    (P, N: row p leaves out patient p) of the same images."""

    bootstrap: np.ndarray
    jackknife: np.ndarray

    @classmethod
    def of(cls, patient_keys: Sequence[str] | np.ndarray, n_resamples: int, seed: int) -> "Resamples":
        patients = np.asarray(patient_keys)
        _, patient = np.unique(patients, return_inverse=True)
        jackknife = (patient[None, :] != np.arange(patient.max() + 1)[:, None]).astype(float)
        return cls(bootstrap_weights(patients, n_resamples, seed), jackknife)

    def subset(self, images: np.ndarray) -> "Resamples":
        """The same resamples restricted to ``images`` (a mask or indices); a jackknife row
        survives only if its patient has an image among them."""
        jackknife = self.jackknife[:, images]
        return Resamples(self.bootstrap[:, images], jackknife[(jackknife == 0).any(axis=1)])


def bootstrap_weights(patient_keys: Sequence[str] | np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Weights (1 + n_resamples, N): row 0 all ones (the observed data), then one row per
    resample of the patients with replacement; an image weighs as often as its patient was drawn."""
    patients, image_patient = np.unique(np.asarray(patient_keys), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(patients), np.full(len(patients), 1 / len(patients)), size=n_resamples)
    return np.vstack([np.ones(len(image_patient)), counts[:, image_patient]])


def bca(values: np.ndarray, jackknife: np.ndarray, fallback: Callable[[float], Estimate]) -> Estimate:
    """Row 0 of ``values`` as the estimate, the BCa interval of the other rows (resamples where
    the statistic is undefined are left out); ``fallback(estimate)`` when the resamples have no
    spread. ``jackknife``: the statistic with each patient left out."""
    value = float(values[0]) if np.isfinite(values[0]) else None
    resampled = values[1:][np.isfinite(values[1:])]
    if value is None or resampled.size == 0:
        return Estimate(value)
    if resampled.min() == resampled.max():
        return fallback(value)
    below = (np.count_nonzero(resampled < value) + np.count_nonzero(resampled <= value)) / (
        2 * resampled.size
    )
    bias = float(ndtri(below))
    jackknife = jackknife[np.isfinite(jackknife)]
    spread = jackknife.mean() - jackknife
    acceleration = float(np.sum(spread**3) / (6 * np.sum(spread**2) ** 1.5)) if np.any(spread != 0) else 0.0
    tails = np.array([-Z, Z])
    levels = ndtr(bias + (bias + tails) / (1 - acceleration * (bias + tails)))
    if not np.all(np.isfinite(levels)):  # the estimate lies outside every resample
        levels = ndtr(tails)
    low, high = np.percentile(resampled, 100 * levels)
    if high <= low:
        return fallback(value)
    return Estimate(value, float(low), float(high), BCA)


def auc_score_interval(auc: float, n_positive: int, n_negative: int) -> Estimate:
    """Newcombe's (2006, method 5) score interval of an ROC-AUC: the values ``theta`` with
    ``(auc - theta)**2 <= z**2 V(theta)``, ``V`` Hanley and McNeil's variance at ``theta``."""
    half = (n_positive + n_negative) / 2

    def excess(theta: float) -> float:
        spread = (2 * half - 1) - (3 * half - 3) / ((2 - theta) * (1 + theta))
        return (auc - theta) ** 2 - Z**2 * theta * (1 - theta) * spread / (n_positive * n_negative)

    inside = 1e-9  # excess < 0 strictly between 0 and 1 at the estimate, and just inside a bound
    low = brentq(excess, 0.0, min(auc, 1 - inside)) if auc > 0 else 0.0
    high = brentq(excess, max(auc, inside), 1.0) if auc < 1 else 1.0
    return Estimate(auc, float(low), float(high), SCORE)


def wilson(count: float, total: float) -> tuple[float, float]:
    low, high = proportion_confint(count, total, alpha=1 - CONFIDENCE_LEVEL, method="wilson")
    return float(low), float(high)


def paired_difference_interval(first: np.ndarray, second: np.ndarray) -> Estimate:
    """Newcombe's (1998, method 10) score interval of ``mean(first) - mean(second)`` for two
    paired boolean vectors (e.g. the model's and a reader's right calls on the same images)."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    n = len(first)
    a, b = np.sum(first & second), np.sum(first & ~second)
    c, d = np.sum(~first & second), np.sum(~first & ~second)
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b, n), wilson(a + c, n)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / np.sqrt(margins) if margins > 0 else 0.0
    difference = p1 - p2
    low = difference - np.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = difference + np.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return Estimate(float(difference), float(low), float(high), SCORE)


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
