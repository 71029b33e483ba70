"""The operating threshold: counts on a fixed grid at each site, pooled by the coordinator, and
the threshold chosen on them; the rule that turns probabilities into one class per image."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from pipeline.contracts.messages import NEGATIVES_CALLED, POSITIVES_CALLED
from pipeline.evaluation.threshold import (
    GRID,
    HALF,
    grid_counts,
    model_classes,
    operating_threshold,
    pool_counts,
)

pytestmark = pytest.mark.report


def site(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pneumonia = rng.random(n) < 0.6
    score = 1 / (1 + np.exp(-(2.5 * pneumonia - 1 + rng.normal(0, 1.2, n))))
    return pneumonia, score


def test_pooled_counts_are_the_counts_of_the_pooled_images():
    sites = [site(seed, n) for seed, n in ((0, 30), (1, 12), (2, 45))]
    pooled = pool_counts([grid_counts(*s) for s in sites])
    together = grid_counts(np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites]))
    assert pooled == together
    assert pooled[POSITIVES_CALLED][0] == sum(s[0].sum() for s in sites)  # threshold 0: every image
    assert pool_counts([{POSITIVES_CALLED: [1, 2], NEGATIVES_CALLED: [3, 4]}]) is None  # another grid


def test_youden_on_the_grid_maximises_sensitivity_plus_specificity():
    pneumonia, score = site(3, 200)
    chosen = operating_threshold(grid_counts(pneumonia, score), "test")
    assert chosen is not None

    def youden(t: float) -> float:
        called = score >= t
        return called[pneumonia].mean() + (~called[~pneumonia]).mean() - 1

    assert youden(chosen["value"]) == pytest.approx(max(youden(t) for t in GRID))
    assert chosen["sensitivity"] == pytest.approx((score[pneumonia] >= chosen["value"]).mean())
    assert chosen["specificity"] == pytest.approx((score[~pneumonia] < chosen["value"]).mean())
    # The grid loses little: the best threshold of all, on the exact ROC curve, is barely better.
    fpr, tpr, _ = roc_curve(pneumonia, score)
    assert max(tpr - fpr) - youden(chosen["value"]) < 0.03
    assert GRID[HALF] == 0.5 and chosen["at_half"]["sensitivity"] == (score[pneumonia] >= 0.5).mean()


def test_target_sensitivity_and_a_single_class():
    pneumonia, score = site(4, 200)
    counts = grid_counts(pneumonia, score)
    chosen = operating_threshold(counts, "test", "sensitivity", 0.9)
    assert chosen is not None and chosen["sensitivity"] >= 0.9
    higher = GRID[GRID > chosen["value"]]
    assert (score[pneumonia] >= higher[0]).mean() < 0.9  # the next grid threshold misses the target
    assert operating_threshold(grid_counts(np.ones(5, bool), np.linspace(0, 1, 5)), "test") is None
    with pytest.raises(ValueError, match="unknown threshold method"):
        operating_threshold(counts, "test", "best")


def test_operating_rule():
    probabilities = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.95, 0.01, 0.04]])
    np.testing.assert_array_equal(model_classes(probabilities, 0.5), [1, 0, 0])
    np.testing.assert_array_equal(model_classes(probabilities, 0.04), [1, 2, 2])  # the more probable type
    np.testing.assert_array_equal(model_classes(probabilities, None), [1, 0, 0])  # most probable class
