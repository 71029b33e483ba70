"""Every number of the clinicians' report, as JSON-ready dicts of aggregates only.

The model's class per image follows its operating rule
(:func:`pipeline.evaluation.threshold.model_classes`). Accuracy is three-class accuracy under
that rule, the one accuracy of the evaluation (``metrics.json`` and the console use the same);
each binary question (pneumonia vs normal, one class vs the others) is reported by
sensitivity, specificity, PPV, NPV and ROC-AUC. Intervals: :mod:`.statistics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_curve

from pipeline.contracts.labels import CLASS_NAMES, NORMAL_INDEX
from pipeline.evaluation.clinical.cases import Cases
from pipeline.evaluation.clinical.reads import PNEUMONIA, ReaderReads
from pipeline.evaluation.clinical.statistics import (
    Estimate,
    Resamples,
    auc_score_interval,
    bca,
    binary_metrics,
    kappa,
    mcnemar_exact,
    paired_difference_interval,
    proportion,
    proportions,
    weighted_fraction,
)

PNEUMONIA_TASK = "pneumonia vs normal"
MIN_BIN_IMAGES = 10  # calibration: every bin holds at least this many images
MAX_BINS = 10
HISTOGRAM_BINS = 20  # the images' probabilities under the calibration plot
MAIN_CONFUSIONS = 3
# A task: (truth, predicted, score or None) of one binary question.
Task = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def model_tasks(cases: Cases, predicted: np.ndarray) -> dict[str, Task]:
    """Pneumonia vs normal, then each class against the others."""
    tasks: dict[str, Task] = {
        PNEUMONIA_TASK: (cases.labels != NORMAL_INDEX, predicted != NORMAL_INDEX, cases.pneumonia_score)
    }
    for c, name in enumerate(CLASS_NAMES):
        tasks[name] = (cases.labels == c, predicted == c, cases.probabilities[:, c])
    return tasks


def reader_tasks(reader: ReaderReads, labels: np.ndarray) -> dict[str, Task]:
    """A reader's tasks on the images they read (``labels``: the true classes of those images)."""
    tasks = {PNEUMONIA_TASK: (labels != NORMAL_INDEX, reader.says_pneumonia, reader.pneumonia_score)}
    if reader.three_class:
        read = reader.class_indices
        tasks |= {name: (labels == c, read == c, None) for c, name in enumerate(CLASS_NAMES)}
    return tasks


def roc_auc(truth: np.ndarray, score: np.ndarray, resamples: Resamples) -> Estimate:
    """ROC-AUC with its BCa patient-bootstrap interval (a score interval when it has no spread)."""
    truth = np.asarray(truth, bool)
    values = binary_metrics(truth, truth, score, resamples.bootstrap)["roc_auc"]
    jackknife = binary_metrics(truth, truth, score, resamples.jackknife)["roc_auc"]
    return bca(values, jackknife, lambda auc: auc_score_interval(auc, int(truth.sum()), int((~truth).sum())))


def task_metrics(task: Task, patients: np.ndarray, resamples: Resamples) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV (exact) and the ROC-AUC (bootstrap) of one task."""
    truth, predicted, score = task
    metrics = {name: e.as_dict() for name, e in proportions(truth, predicted, patients).items()}
    auc = roc_auc(truth, score, resamples) if score is not None else Estimate(None)
    return metrics | {"roc_auc": auc.as_dict()}


def performance(tasks: dict[str, Task], patients: np.ndarray, resamples: Resamples) -> dict[str, Any]:
    return {name: task_metrics(task, patients, resamples) for name, task in tasks.items()}


def counts(cases: Cases) -> dict[str, Any]:
    return {
        "n_images": len(cases),
        "n_patients": len(set(cases.patient_keys)),
        "n_per_class": {name: int(np.sum(cases.labels == c)) for c, name in enumerate(CLASS_NAMES)},
    }


def main_confusions(matrix: np.ndarray, columns: list[str]) -> list[str]:
    """The largest off-diagonal cells of a confusion matrix (rows: true class), in words."""
    cells = [
        (int(matrix[i, j]), i, j)
        for i in range(matrix.shape[0])
        for j in range(matrix.shape[1])
        if columns[j] != CLASS_NAMES[i] and matrix[i, j] > 0
    ]
    words = []
    for count, i, j in sorted(cells, key=lambda cell: (-cell[0], cell[1], cell[2]))[:MAIN_CONFUSIONS]:
        kind = "normal images" if i == NORMAL_INDEX else f"{CLASS_NAMES[i]} pneumonias"
        words.append(f"{count} of {int(matrix[i].sum())} {kind} were called {columns[j]}")
    return words


def model_section(cases: Cases, predicted: np.ndarray, resamples: Resamples) -> dict[str, Any]:
    """The model on ``cases``: counts, metrics, three-class accuracy, each type's sensitivity,
    the confusion matrix and its main confusions in words."""
    matrix = confusion_matrix(cases.labels, predicted, labels=range(len(CLASS_NAMES)))
    return counts(cases) | {
        "metrics": performance(model_tasks(cases, predicted), cases.patient_keys, resamples),
        "accuracy": proportion(predicted == cases.labels, cases.patient_keys).as_dict(),
        "per_type_sensitivity": {
            name: proportion(
                predicted[cases.labels == c] == c, cases.patient_keys[cases.labels == c]
            ).as_dict()
            for c, name in enumerate(CLASS_NAMES)
        },
        "confusion_matrix": matrix.tolist(),
        "main_confusions": main_confusions(matrix, list(CLASS_NAMES)),
    }


def reader_vocabulary(reader: ReaderReads) -> list[str]:
    return list(CLASS_NAMES) if reader.three_class else [CLASS_NAMES[NORMAL_INDEX], PNEUMONIA]


def reader_section(reader: ReaderReads, cases: Cases, resamples: Resamples) -> dict[str, Any]:
    """One reader on the images they read: metrics with CIs and confusion matrix."""
    read_cases = cases.subset(reader.cases)
    vocabulary = reader_vocabulary(reader)
    read = reader.class_indices if reader.three_class else reader.says_pneumonia.astype(int)
    matrix = np.zeros((len(CLASS_NAMES), len(vocabulary)), int)
    np.add.at(matrix, (read_cases.labels, read), 1)
    tasks = reader_tasks(reader, read_cases.labels)
    accuracy = (
        proportion(reader.class_indices == read_cases.labels, read_cases.patient_keys).as_dict()
        if reader.three_class
        else None
    )
    return counts(read_cases) | {
        "simulated": reader.simulated,
        "labels": vocabulary,
        "metrics": performance(tasks, read_cases.patient_keys, resamples.subset(reader.cases)),
        "accuracy": accuracy,
        "confusion_matrix": matrix.tolist(),
        "main_confusions": main_confusions(matrix, vocabulary),
    }


def paired_difference(
    model_right: np.ndarray, reader_right: np.ndarray, among: np.ndarray, resamples: Resamples
) -> Estimate:
    """Model-minus-reader fraction right among the images ``among`` (e.g. those with pneumonia:
    the sensitivity difference), with its BCa interval (Newcombe's when it has no spread)."""
    model, reader, own = model_right[among], reader_right[among], resamples.subset(among)

    def difference(weights: np.ndarray) -> np.ndarray:
        return weighted_fraction(model, weights) - weighted_fraction(reader, weights)

    return bca(
        difference(own.bootstrap),
        difference(own.jackknife),
        lambda _: paired_difference_interval(model, reader),
    )


def comparison(
    reader: ReaderReads, cases: Cases, predicted: np.ndarray, resamples: Resamples
) -> dict[str, Any]:
    """The model against one reader on the images the reader read (paired)."""
    labels, model = cases.labels[reader.cases], predicted[reader.cases]
    own = resamples.subset(reader.cases)
    truth = labels != NORMAL_INDEX
    model_right = (model != NORMAL_INDEX) == truth
    reader_right = reader.says_pneumonia == truth
    result = {
        "n_images": len(labels),
        "mcnemar_pneumonia": mcnemar_exact(model_right, reader_right),
        "sensitivity_difference": paired_difference(model_right, reader_right, truth, own).as_dict(),
        "specificity_difference": paired_difference(model_right, reader_right, ~truth, own).as_dict(),
        "kappa_pneumonia": kappa(model != NORMAL_INDEX, reader.says_pneumonia),
        "mcnemar_three_class": None,
        "kappa_three_class": None,
    }
    if reader.three_class:
        result["mcnemar_three_class"] = mcnemar_exact(model == labels, reader.class_indices == labels)
        result["kappa_three_class"] = kappa(model, reader.class_indices)
    return result


def agreement(readers: list[ReaderReads], n_cases: int) -> list[dict[str, Any]]:
    """Cohen's kappa between every two readers on the images both read."""
    rows = []
    for i, first in enumerate(readers):
        for second in readers[i + 1 :]:
            a, b = _on_common(first, n_cases), _on_common(second, n_cases)
            both = (a >= 0) & (b >= 0)
            first_p, second_p = first.says_pneumonia[a[both]], second.says_pneumonia[b[both]]
            three = first.three_class and second.three_class
            rows.append(
                {
                    "first": first.name,
                    "second": second.name,
                    "n_images": int(both.sum()),
                    "kappa_pneumonia": kappa(first_p, second_p) if both.any() else None,
                    "kappa_three_class": kappa(first.class_indices[a[both]], second.class_indices[b[both]])
                    if three and both.any()
                    else None,
                }
            )
    return rows


def _on_common(reader: ReaderReads, n_cases: int) -> np.ndarray:
    """Position of each case in the reader's reads, -1 where unread."""
    position = np.full(n_cases, -1)
    position[reader.cases] = np.arange(len(reader.cases))
    return position


def calibration(cases: Cases) -> dict[str, Any]:
    """Reliability of P(pneumonia): images sorted by it and cut into bins of at least
    MIN_BIN_IMAGES images each (at most MAX_BINS); per bin the mean probability and the observed
    fraction with pneumonia with its exact interval; the images per twentieth of probability;
    and the Brier score."""
    truth = cases.labels != NORMAL_INDEX
    order = np.argsort(cases.pneumonia_score, kind="stable")
    n_bins = max(1, min(MAX_BINS, len(cases) // MIN_BIN_IMAGES))
    bins = []
    for members in np.array_split(order, n_bins):
        observed = proportion(truth[members], cases.patient_keys[members])
        bins.append(
            {
                "n_images": len(members),
                "mean_predicted": float(cases.pneumonia_score[members].mean()),
                "lowest": float(cases.pneumonia_score[members].min()),
                "highest": float(cases.pneumonia_score[members].max()),
                "observed": observed.as_dict(),
            }
        )
    return {
        "min_images_per_bin": MIN_BIN_IMAGES,
        "bins": bins,
        "histogram": np.histogram(cases.pneumonia_score, bins=HISTOGRAM_BINS, range=(0, 1))[0].tolist(),
        "brier_score": float(brier_score_loss(truth, cases.pneumonia_score, labels=[False, True])),
    }


def roc_points(cases: Cases) -> dict[str, list[float]] | None:
    """The model's pneumonia-vs-normal ROC curve (None with a single class)."""
    truth = cases.labels != NORMAL_INDEX
    if truth.all() or not truth.any():
        return None
    fpr, tpr, thresholds = roc_curve(truth, cases.pneumonia_score)
    return {
        "false_positive_rate": fpr.tolist(),
        "true_positive_rate": tpr.tolist(),
        "threshold": [float(t) if np.isfinite(t) else None for t in thresholds],
    }
