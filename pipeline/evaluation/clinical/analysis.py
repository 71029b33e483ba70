"""Every number of the clinicians' report, as JSON-ready dicts of aggregates only.

The model's pneumonia call is ``P(pneumonia) >= threshold`` (the threshold chosen on the
validation split); its class is then the more probable of bacterial and viral, and
normal below the threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_curve

from pipeline.contracts.labels import CLASS_NAMES, NORMAL_INDEX
from pipeline.evaluation.clinical.cases import Cases
from pipeline.evaluation.clinical.reads import PNEUMONIA, ReaderReads
from pipeline.evaluation.clinical.statistics import (
    binary_metrics,
    choose_threshold,
    kappa,
    mcnemar_exact,
    summarise,
    summarise_all,
)

PNEUMONIA_TASK = "pneumonia vs normal"
CALIBRATION_BINS = 10
# A task: (truth, predicted, score or None) of one binary question.
Task = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def operating_threshold(validation: Cases, method: str, target: float | None) -> dict[str, Any]:
    """Choose the pneumonia threshold on the validation cases; record how and what it gives there."""
    truth = validation.labels != NORMAL_INDEX
    value = choose_threshold(truth, validation.pneumonia_score, method, target)
    called = validation.pneumonia_score >= value
    return {
        "value": value,
        "method": method,
        "target_sensitivity": target,
        "chosen_on": "val",
        "n_images": len(validation),
        "n_patients": len(set(validation.patient_keys)),
        "sensitivity": float(called[truth].mean()),
        "specificity": float((~called[~truth]).mean()),
    }


def model_classes(cases: Cases, threshold: float) -> np.ndarray:
    """The model's class per image at ``threshold`` (see the module docstring)."""
    pneumonia_class = 1 + cases.probabilities[:, 1:].argmax(axis=1)
    return np.where(cases.pneumonia_score >= threshold, pneumonia_class, NORMAL_INDEX)


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


def performance(tasks: dict[str, Task], weights: np.ndarray) -> dict[str, Any]:
    """Every metric of every task with its patient-bootstrap CI."""
    return {name: summarise_all(binary_metrics(*task, weights)) for name, task in tasks.items()}


def counts(cases: Cases) -> dict[str, Any]:
    return {
        "n_images": len(cases),
        "n_patients": len(set(cases.patient_keys)),
        "n_per_class": {name: int(np.sum(cases.labels == c)) for c, name in enumerate(CLASS_NAMES)},
    }


def model_section(cases: Cases, predicted: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    """The model on ``cases``: counts, metrics, three-class accuracy and confusion matrix."""
    correct = (predicted == cases.labels).astype(float)
    return counts(cases) | {
        "metrics": performance(model_tasks(cases, predicted), weights),
        "three_class_accuracy": summarise((weights @ correct) / weights.sum(axis=1)).as_dict(),
        "confusion_matrix": confusion_matrix(
            cases.labels, predicted, labels=range(len(CLASS_NAMES))
        ).tolist(),
    }


def reader_vocabulary(reader: ReaderReads) -> list[str]:
    return list(CLASS_NAMES) if reader.three_class else [CLASS_NAMES[NORMAL_INDEX], PNEUMONIA]


def reader_section(reader: ReaderReads, cases: Cases, weights: np.ndarray) -> dict[str, Any]:
    """One reader on the images they read: metrics with CIs and confusion matrix."""
    read_cases = cases.subset(reader.cases)
    vocabulary = reader_vocabulary(reader)
    read = reader.class_indices if reader.three_class else reader.says_pneumonia.astype(int)
    matrix = np.zeros((len(CLASS_NAMES), len(vocabulary)), int)
    np.add.at(matrix, (read_cases.labels, read), 1)
    return counts(read_cases) | {
        "labels": vocabulary,
        "metrics": performance(reader_tasks(reader, read_cases.labels), weights[:, reader.cases]),
        "confusion_matrix": matrix.tolist(),
    }


def comparison(
    reader: ReaderReads, cases: Cases, predicted: np.ndarray, weights: np.ndarray
) -> dict[str, Any]:
    """The model against one reader on the images the reader read (paired)."""
    labels, model = cases.labels[reader.cases], predicted[reader.cases]
    w = weights[:, reader.cases]
    truth = labels != NORMAL_INDEX
    model_metrics = binary_metrics(truth, model != NORMAL_INDEX, None, w)
    reader_metrics = binary_metrics(truth, reader.says_pneumonia, None, w)
    result = {
        "n_images": len(labels),
        "mcnemar_pneumonia": mcnemar_exact((model != NORMAL_INDEX) == truth, reader.says_pneumonia == truth),
        "sensitivity_difference": summarise(
            model_metrics["sensitivity"] - reader_metrics["sensitivity"]
        ).as_dict(),
        "specificity_difference": summarise(
            model_metrics["specificity"] - reader_metrics["specificity"]
        ).as_dict(),
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
    """Reliability of P(pneumonia): observed fraction per bin of predicted probability, Brier score."""
    truth = cases.labels != NORMAL_INDEX
    observed, predicted = calibration_curve(truth, cases.pneumonia_score, n_bins=CALIBRATION_BINS)
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    per_bin = np.histogram(cases.pneumonia_score, bins=edges)[0]
    return {
        "bins": CALIBRATION_BINS,
        "mean_predicted": predicted.tolist(),
        "observed_fraction": observed.tolist(),
        "images_per_bin": per_bin.tolist(),
        "brier_score": float(brier_score_loss(truth, cases.pneumonia_score)),
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
