"""The report's statistics against reference implementations and published worked examples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap
from sklearn.metrics import precision_score, recall_score, roc_auc_score
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from pipeline.evaluation.clinical.statistics import (
    BCA,
    EXACT,
    EXACT_CLUSTERED,
    SCORE,
    Resamples,
    auc_score_interval,
    bca,
    binary_metrics,
    bootstrap_weights,
    kappa,
    mcnemar_exact,
    paired_difference_interval,
    proportion,
    weighted_fraction,
)

pytestmark = pytest.mark.report


def sklearn_metrics(truth: np.ndarray, predicted: np.ndarray, score: np.ndarray) -> dict[str, float]:
    nan = {"zero_division": np.nan}
    return {
        "sensitivity": recall_score(truth, predicted, **nan),
        "specificity": recall_score(truth, predicted, pos_label=False, **nan),
        "ppv": precision_score(truth, predicted, **nan),
        "npv": precision_score(truth, predicted, pos_label=False, **nan),
        "roc_auc": roc_auc_score(truth, score),
    }


def random_case(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.4
    score = np.round(np.clip(truth * 0.3 + rng.random(n) * 0.7, 0, 1), 1)  # rounded: ties included
    return truth, score >= 0.5, score


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed):
    truth, predicted, score = random_case(seed)
    ours = binary_metrics(truth, predicted, score, np.ones((1, len(truth))))
    for name, expected in sklearn_metrics(truth, predicted, score).items():
        np.testing.assert_allclose(ours[name][0], expected, rtol=1e-12, err_msg=name)


def test_resampled_metrics_match_scikit_learn_on_the_resampled_images():
    truth, predicted, score = random_case(7)
    patients = [f"p{i // 2}" for i in range(len(truth))]  # two images per patient
    weights = bootstrap_weights(patients, n_resamples=20, seed=1)
    ours = binary_metrics(truth, predicted, score, weights)
    for row in range(1, 21):
        drawn = np.repeat(np.arange(len(truth)), weights[row].astype(int))
        expected = sklearn_metrics(truth[drawn], predicted[drawn], score[drawn])
        for name, value in expected.items():
            np.testing.assert_allclose(ours[name][row], value, rtol=1e-12, err_msg=f"{name} resample {row}")


def test_undefined_metrics_are_nan():
    truth = predicted = np.array([False, False, False])
    ours = binary_metrics(truth, predicted, np.array([0.1, 0.7, 0.2]), np.ones((1, 3)))
    assert np.isnan(ours["sensitivity"][0]) and np.isnan(ours["roc_auc"][0]) and np.isnan(ours["ppv"][0])
    assert ours["specificity"][0] == 1.0


def test_auc_of_hanley_and_mcneil_worked_example():
    """Hanley & McNeil, Radiology 1982;143:29-36, Table 1: CT ratings 1-5 of 58 normal and
    51 abnormal patients; area under the ROC curve 0.893."""
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    rating = np.repeat(np.tile(np.arange(1, 6), 2), normal + abnormal)
    truth = np.repeat([False, True], [sum(normal), sum(abnormal)])
    auc = binary_metrics(truth, rating >= 3, rating, np.ones((1, len(truth))))["roc_auc"][0]
    assert round(auc, 3) == 0.893


def test_bootstrap_resamples_whole_patients():
    patients = ["a", "a", "a", "b", "c", "c"]
    weights = bootstrap_weights(patients, n_resamples=200, seed=0)
    assert weights.shape == (201, 6) and (weights[0] == 1).all()
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 4] == weights[:, 5]).all()
    patient_draws = weights[:, [0, 3, 4]]
    assert (patient_draws[1:].sum(axis=1) == 3).all()  # three patients drawn per resample
    np.testing.assert_array_equal(weights, bootstrap_weights(patients, n_resamples=200, seed=0))


@pytest.mark.parametrize(
    ("right", "total", "low", "high"), [(3, 3, 0.292, 1.0), (0, 3, 0.0, 0.708), (12, 13, 0.640, 0.998)]
)
def test_proportions_get_the_exact_interval_that_never_collapses(right, total, low, high):
    """The issue's cases: 3 of 3 normals showed "1.000 (1.000 to 1.000)" under the bootstrap."""
    estimate = proportion(np.arange(total) < right, [f"p{i}" for i in range(total)])
    exact = binomtest(right, total).proportion_ci(method="exact")
    assert (estimate.count, estimate.total, estimate.method) == (right, total, EXACT)
    assert estimate.low == pytest.approx(exact.low) and estimate.high == pytest.approx(exact.high)
    assert round(estimate.low, 3) == low and round(estimate.high, 3) == high
    assert estimate.high - estimate.low > 0.25


def test_images_of_one_patient_count_as_fewer_independent_images():
    """Two images per patient, always both right or both wrong: the cluster variance (with its
    usual k / (k - 1) factor for k patients) makes the effective sample size k - 1 = 14 images,
    and the interval is the exact one of 14 images at the same fraction (Korn and Graubard)."""
    right = np.repeat(np.arange(15) < 11, 2)  # 22 of 30 images, 11 of 15 patients
    patients = np.repeat([f"p{i}" for i in range(15)], 2)
    clustered = proportion(right, patients)
    low, high = proportion_confint(22 / 30 * 14, 14, method="beta")
    assert clustered.value == pytest.approx(22 / 30) and clustered.method == EXACT_CLUSTERED
    assert clustered.low == pytest.approx(low) and clustered.high == pytest.approx(high)
    independent = proportion(right, [f"i{i}" for i in range(30)])
    assert independent.high - independent.low < clustered.high - clustered.low


def test_bca_interval_agrees_with_scipy():
    """One value per patient: our patient bootstrap and jackknife are scipy's, so the BCa intervals
    agree up to the resampling noise; on the mean of skewed values, where BCa's bias correction
    and acceleration move the interval away from the percentile one."""
    values = np.random.default_rng(11).exponential(size=60)
    resamples = Resamples.of([str(i) for i in range(60)], n_resamples=8000, seed=5)
    ours = bca(
        weighted_fraction(values, resamples.bootstrap),
        weighted_fraction(values, resamples.jackknife),
        lambda value: pytest.fail("the bootstrap has spread"),
    )
    reference = bootstrap((values,), np.mean, method="BCa", n_resamples=8000, rng=7).confidence_interval
    percentile = bootstrap(
        (values,), np.mean, method="percentile", n_resamples=8000, rng=7
    ).confidence_interval
    assert ours.method == BCA and ours.value == pytest.approx(values.mean())
    assert ours.low == pytest.approx(reference.low, abs=0.02)
    assert ours.high == pytest.approx(reference.high, abs=0.02)
    assert reference.high - percentile.high > 0.02  # the correction is larger than the tolerance


def test_bootstrap_without_spread_falls_back_to_a_score_interval():
    """3 pneumonias all scored above 3 normals: every resample has ROC-AUC 1. Newcombe's score
    interval is not degenerate; its lower bound is 0.5, where perfect separation of 3 by 3
    happens by chance with probability 1/20 (the exact test's 5%)."""
    truth = np.array([True, True, True, False, False, False])
    score = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    resamples = Resamples.of(list("abcdef"), n_resamples=300, seed=0)
    values = binary_metrics(truth, truth, score, resamples.bootstrap)["roc_auc"]
    assert np.nanmin(values) == np.nanmax(values) == 1.0
    estimate = bca(values, values[:6], lambda auc: auc_score_interval(auc, 3, 3))
    assert estimate.method == SCORE and estimate.value == 1.0 and estimate.high == 1.0
    assert estimate.low == pytest.approx(0.5, abs=0.01)
    hanley = auc_score_interval(0.893, 51, 58)  # Hanley & McNeil's worked example
    assert hanley.low < 0.893 < hanley.high and 0.08 < hanley.high - hanley.low < 0.2


def test_paired_difference_of_two_perfect_readers_is_not_zero_width():
    """Model and reader both right on 3 of 3 pneumonias: the difference is 0, every bootstrap
    resample agrees, and Newcombe's paired interval (method 10) gives -0.562 to 0.562."""
    right = np.ones(3, bool)
    resamples = Resamples.of(["a", "b", "c"], n_resamples=300, seed=0)
    difference = weighted_fraction(right, resamples.bootstrap) - weighted_fraction(right, resamples.bootstrap)
    estimate = bca(difference, difference[:3], lambda _: paired_difference_interval(right, right))
    assert estimate.value == 0.0 and estimate.method == SCORE
    assert estimate.low == pytest.approx(-0.562, abs=1e-3) and estimate.high == pytest.approx(0.562, abs=1e-3)


def test_newcombe_paired_interval_without_correlation_is_the_independent_one():
    """Method 10 of Newcombe (1998, paired) corrects his independent-samples interval (method 10
    of his other 1998 paper) by the correlation phi of the pairs; with ad = bc, phi is 0 and the
    two coincide. statsmodels implements the independent one."""
    first = np.repeat([True, True, False, False], [6, 2, 3, 1])  # a=6, b=2, c=3, d=1: ad = bc
    second = np.repeat([True, False, True, False], [6, 2, 3, 1])
    estimate = paired_difference_interval(first, second)
    low, high = confint_proportions_2indep(8, 12, 9, 12, method="newcomb", compare="diff")
    assert estimate.value == pytest.approx(8 / 12 - 9 / 12)
    assert estimate.low == pytest.approx(low) and estimate.high == pytest.approx(high)
    correlated = paired_difference_interval(
        np.repeat([1, 1, 0, 0], [12, 9, 2, 21]) > 0, np.repeat([1, 0, 1, 0], [12, 9, 2, 21]) > 0
    )
    independent = confint_proportions_2indep(21, 44, 14, 44, method="newcomb", compare="diff")
    assert correlated.high - correlated.low < independent[1] - independent[0]  # pairing narrows it


def test_jackknife_leaves_out_whole_patients():
    resamples = Resamples.of(["a", "a", "b", "c", "c"], n_resamples=10, seed=0)
    np.testing.assert_array_equal(resamples.jackknife, [[0, 0, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 0, 0]])
    subset = resamples.subset(np.array([True, True, False, False, False]))
    np.testing.assert_array_equal(subset.jackknife, [[0, 0]])  # only patient a has images left


def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs():
    rng = np.random.default_rng(0)
    model, reader = rng.random(80) < 0.75, rng.random(80) < 0.6
    result = mcnemar_exact(model, reader)
    b, c = result["only_first_correct"], result["only_second_correct"]
    assert b + c + result["both_correct"] + result["both_wrong"] == 80
    assert b == np.sum(model & ~reader) and c == np.sum(~model & reader)
    assert result["p_value"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue)


def test_kappa_of_the_textbook_worked_example():
    """Two raters, 50 cases: 20 both yes, 5 yes/no, 10 no/yes, 15 both no:
    p_o = 0.7, p_e = 0.5, kappa = 0.4 (Cohen 1960, as in most textbooks)."""
    first = np.repeat([1, 1, 0, 0], [20, 5, 10, 15])
    second = np.repeat([1, 0, 1, 0], [20, 5, 10, 15])
    assert kappa(first, second) == pytest.approx(0.4)
    assert kappa(np.zeros(4), np.zeros(4)) is None
