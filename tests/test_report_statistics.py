"""The report's statistics against reference implementations and published worked examples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from pipeline.evaluation.clinical.statistics import (
    binary_metrics,
    bootstrap_weights,
    choose_threshold,
    kappa,
    mcnemar_exact,
    summarise,
)

pytestmark = pytest.mark.report


def sklearn_metrics(truth: np.ndarray, predicted: np.ndarray, score: np.ndarray) -> dict[str, float]:
    nan = {"zero_division": np.nan}
    return {
        "accuracy": accuracy_score(truth, predicted),
        "sensitivity": recall_score(truth, predicted, **nan),
        "specificity": recall_score(truth, predicted, pos_label=False, **nan),
        "ppv": precision_score(truth, predicted, **nan),
        "npv": precision_score(truth, predicted, pos_label=False, **nan),
        "f1": f1_score(truth, predicted, **nan),
        "mcc": matthews_corrcoef(truth, predicted),
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


def test_undefined_metrics_are_nan_and_mcc_zero_as_in_scikit_learn():
    truth = predicted = np.array([False, False, False])
    ours = binary_metrics(truth, predicted, np.array([0.1, 0.7, 0.2]), np.ones((1, 3)))
    assert np.isnan(ours["sensitivity"][0]) and np.isnan(ours["roc_auc"][0]) and np.isnan(ours["ppv"][0])
    assert ours["specificity"][0] == 1.0
    assert ours["mcc"][0] == matthews_corrcoef(truth, predicted) == 0.0


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


def test_percentile_interval_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(3)
    correct = (rng.random(150) < 0.8).astype(float)
    weights = bootstrap_weights([str(i) for i in range(150)], n_resamples=4000, seed=5)
    ours = summarise(weights @ correct / weights.sum(axis=1))
    reference = bootstrap(
        (correct,), np.mean, method="percentile", n_resamples=4000, rng=11
    ).confidence_interval
    assert ours.value == pytest.approx(correct.mean())
    assert ours.low == pytest.approx(reference.low, abs=0.015)
    assert ours.high == pytest.approx(reference.high, abs=0.015)


def test_interval_leaves_out_undefined_resamples_and_reports_none_when_undefined():
    values = np.array([0.5, np.nan, 0.4, 0.6, np.nan, 0.5])
    estimate = summarise(values)
    assert estimate.value == 0.5 and estimate.low >= 0.4 and estimate.high <= 0.6
    assert summarise(np.array([np.nan, 0.3, 0.4])).as_dict() == {
        "value": None,
        "ci_low": None,
        "ci_high": None,
    }


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    truth, _, score = random_case(2, n=200)
    threshold = choose_threshold(truth, score, "youden")

    def youden(t: float) -> float:
        called = score >= t
        return called[truth].mean() + (~called[~truth]).mean() - 1

    assert youden(threshold) == pytest.approx(max(youden(t) for t in np.unique(score)))


def test_sensitivity_threshold_is_the_highest_reaching_the_target():
    truth, _, score = random_case(4, n=200)
    threshold = choose_threshold(truth, score, "sensitivity", target=0.9)
    fpr, tpr, thresholds = roc_curve(truth, score)
    assert (score[truth] >= threshold).mean() >= 0.9
    assert threshold == max(t for t, s in zip(thresholds, tpr) if s >= 0.9 and np.isfinite(t))


def test_threshold_errors_are_clear():
    with pytest.raises(ValueError, match="single class"):
        choose_threshold(np.array([True, True]), np.array([0.2, 0.8]), "youden")
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_threshold(np.array([True, False]), np.array([0.8, 0.2]), "best")


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
