"""The model's operating threshold: chosen on the federation's validation images, stored in the
model file, and the rule that turns probabilities into one call per image.

The coordinator never sees an image or a per-image prediction. Each site therefore counts, on
a fixed grid of thresholds, how many of its validation images with and without pneumonia the
model calls pneumonia (:func:`grid_counts`, sent in its evaluation reply); the coordinator adds
the sites' counts (:func:`pool_counts`) and chooses the threshold on the pooled curve
(:func:`operating_threshold`), which is stored with the released model
(:data:`pipeline.training.checkpoints.OPERATING_THRESHOLD`).

The grid is 0 and 401 points evenly spaced in log-odds from -10 to 10 (probabilities 0.00005 to
0.99995): 0.0125 apart around 0.5, finer towards 0 and 1, where an over-confident model's
threshold lies.

The operating rule (:func:`model_classes`): pneumonia when ``P(pneumonia) = 1 - P(normal)``
reaches the threshold, then the more probable of bacterial and viral; normal below it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.contracts.labels import NORMAL_INDEX
from pipeline.contracts.messages import NEGATIVES_CALLED, POSITIVES_CALLED

GRID = np.concatenate([[0.0], 1 / (1 + np.exp(-np.arange(-200, 201) / 20))])
HALF = int(np.argmin(np.abs(GRID - 0.5)))  # GRID[HALF] == 0.5
METHODS = ("youden", "sensitivity")
MOST_PROBABLE = "the most probable class (no operating threshold)"


def pneumonia_score(probabilities: np.ndarray) -> np.ndarray:
    """The model's probability of pneumonia (bacterial or viral) per image."""
    return 1.0 - np.asarray(probabilities)[:, NORMAL_INDEX]


def grid_counts(pneumonia: np.ndarray, score: np.ndarray) -> dict[str, list[int]]:
    """Per grid threshold, the images with pneumonia (``pneumonia`` True) and without it whose
    ``score`` reaches the threshold. Entry 0 (threshold 0) counts every image of each kind."""
    pneumonia, score = np.asarray(pneumonia, bool), np.asarray(score, float)
    called = score[None, :] >= GRID[:, None]
    return {
        POSITIVES_CALLED: called[:, pneumonia].sum(axis=1).tolist(),
        NEGATIVES_CALLED: called[:, ~pneumonia].sum(axis=1).tolist(),
    }


def pool_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, list[int]] | None:
    """The sum of several sites' :func:`grid_counts` (None without any well-formed one)."""
    pooled = np.zeros((2, len(GRID)), int)
    found = False
    for record in records:
        rows = [np.asarray(record.get(key, ()), int) for key in (POSITIVES_CALLED, NEGATIVES_CALLED)]
        if all(row.shape == (len(GRID),) for row in rows):
            pooled += np.stack(rows)
            found = True
    if not found:
        return None
    return {POSITIVES_CALLED: pooled[0].tolist(), NEGATIVES_CALLED: pooled[1].tolist()}


def _chosen(sensitivity: np.ndarray, specificity: np.ndarray, method: str, target: float | None) -> int:
    """The grid index ``method`` chooses (see :func:`operating_threshold`)."""
    if method == "youden":
        youden = sensitivity + specificity - 1
        best = np.flatnonzero(np.isclose(youden, youden.max()))
        run = best[: 1 + int(np.argmax(np.diff(np.append(best, best[-1] + 2)) > 1))]
        return int(run[len(run) // 2])
    if method == "sensitivity":
        if target is None or not 0 < target <= 1:
            raise ValueError(f"the target sensitivity must be in (0, 1], got {target}")
        return int(np.flatnonzero(sensitivity >= target)[-1])
    raise ValueError(f"unknown threshold method {method!r}: expected one of {', '.join(METHODS)}")


def operating_threshold(
    counts: Mapping[str, Sequence[int]], chosen_on: str, method: str = "youden", target: float | None = None
) -> dict[str, Any] | None:
    """The threshold chosen on pooled :func:`grid_counts`, with what it gives there, as stored in
    the model file; None when the counts hold a single class.

    ``youden``: the largest sensitivity + specificity - 1 (the middle of the first run of grid
    points that reach it); ``sensitivity``: the highest grid threshold whose sensitivity reaches
    ``target``. ``chosen_on`` says on which images, in words.
    """
    positives = np.asarray(counts[POSITIVES_CALLED], float)
    negatives = np.asarray(counts[NEGATIVES_CALLED], float)
    n_positive, n_negative = int(positives[0]), int(negatives[0])
    if n_positive == 0 or n_negative == 0:
        return None
    sensitivity, specificity = positives / n_positive, 1 - negatives / n_negative
    index = _chosen(sensitivity, specificity, method, target)
    return {
        "value": float(GRID[index]),
        "method": method,
        "target_sensitivity": target,
        "chosen_on": chosen_on,
        "n_positive": n_positive,
        "n_negative": n_negative,
        "sensitivity": float(sensitivity[index]),
        "specificity": float(specificity[index]),
        "at_half": {"sensitivity": float(sensitivity[HALF]), "specificity": float(specificity[HALF])},
        "grid": GRID.tolist(),
        POSITIVES_CALLED: positives.astype(int).tolist(),
        NEGATIVES_CALLED: negatives.astype(int).tolist(),
    }


def rechosen(threshold: Mapping[str, Any], method: str, target: float | None) -> dict[str, Any] | None:
    """A stored threshold chosen again on the same validation counts by another ``method``."""
    if not np.allclose(threshold["grid"], GRID):
        raise ValueError("the model's validation counts use another threshold grid: pass --threshold <value>")
    return operating_threshold(threshold, threshold["chosen_on"], method, target)


def model_classes(probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
    """The class of each image under the operating rule (module docstring); with no threshold,
    the most probable class."""
    probabilities = np.asarray(probabilities)
    if threshold is None:
        return probabilities.argmax(axis=1)
    pneumonia_class = 1 + probabilities[:, 1:].argmax(axis=1)
    return np.where(pneumonia_score(probabilities) >= threshold, pneumonia_class, NORMAL_INDEX)


def decision_rule(threshold: float | None) -> str:
    """The operating rule in words."""
    if threshold is None:
        return MOST_PROBABLE
    return (
        f"pneumonia when P(pneumonia) >= {threshold:.4g}, then the more probable of bacterial and "
        "viral; normal below it"
    )
