"""Score a trained model on held-out images: metrics.json, confusion matrix and ROC plots.

Each image gets one class, by the model's operating rule (:func:`pipeline.evaluation.threshold.
model_classes`: its stored pneumonia threshold, then the more probable type; the most probable
class for a model that stores no threshold). Accuracy, per-class sensitivity and specificity,
MCC and the confusion matrix are of those classes, as in the clinical report.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: renders to files, no display needed
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    matthews_corrcoef,
    roc_auc_score,
    roc_curve,
)

from pipeline.contracts.cache import load_splits
from pipeline.contracts.labels import CLASS_NAMES, NORMAL_INDEX
from pipeline.contracts.layout import RunLayout
from pipeline.evaluation.threshold import decision_rule, model_classes
from pipeline.training.checkpoints import OPERATING_THRESHOLD, load_model
from pipeline.training.loop import predict_probabilities

CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"


def _auroc(truth: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC, or None when ``truth`` holds a single class (undefined)."""
    return float(roc_auc_score(truth, score)) if len(np.unique(truth)) == 2 else None


def classification_metrics(
    probabilities: np.ndarray,
    labels: np.ndarray,
    patient_keys: Sequence[str],
    threshold: float | None = None,
) -> dict[str, Any]:
    """Accuracy, macro one-vs-rest ROC-AUC (over the classes present), MCC, pneumonia-vs-normal
    ROC-AUC, per-class sensitivity / specificity / ROC-AUC, confusion matrix and counts, the
    classes by the operating rule at ``threshold`` (None: the most probable class)."""
    classes = range(len(CLASS_NAMES))
    predicted = model_classes(probabilities, threshold)
    matrix = confusion_matrix(labels, predicted, labels=list(classes))
    per_class = {}
    for c in classes:
        tp = matrix[c, c]
        fn = matrix[c].sum() - tp
        fp = matrix[:, c].sum() - tp
        tn = matrix.sum() - tp - fn - fp
        per_class[CLASS_NAMES[c]] = {
            "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
            "specificity": float(tn / (tn + fp)) if tn + fp else None,
            "auroc": _auroc(labels == c, probabilities[:, c]),
            "n": int(matrix[c].sum()),
        }
    class_aurocs = [m["auroc"] for m in per_class.values() if m["auroc"] is not None]
    return {
        "decision_rule": decision_rule(threshold),
        "accuracy": float(accuracy_score(labels, predicted)),
        "auroc": float(np.mean(class_aurocs)) if class_aurocs else None,
        "mcc": float(matthews_corrcoef(labels, predicted)),
        "pneumonia_auroc": _auroc(labels != NORMAL_INDEX, 1.0 - probabilities[:, NORMAL_INDEX]),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_axes": "rows: true class, columns: predicted class",
        "class_names": list(CLASS_NAMES),
        "n_images": int(len(labels)),
        "n_patients": len(set(patient_keys)),
    }


def plot_confusion_matrix(matrix: np.ndarray, path: Path) -> None:
    """Save the confusion matrix (counts) as a PNG."""
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(CLASS_NAMES)).plot(
        ax=ax, colorbar=False, cmap="Blues"
    )
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_roc(probabilities: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Save ROC curves: pneumonia vs normal (left), each class one-vs-rest (right)."""
    fig = Figure(figsize=(9, 4))
    left, right = fig.subplots(1, 2)
    curves = [(left, "pneumonia vs normal", labels != NORMAL_INDEX, 1.0 - probabilities[:, NORMAL_INDEX])]
    curves += [(right, name, labels == c, probabilities[:, c]) for c, name in enumerate(CLASS_NAMES)]
    for ax, name, truth, score in curves:
        auc = _auroc(truth, score)
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    for ax, title in ((left, "Pneumonia vs normal"), (right, "One vs rest")):
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(title=title, xlabel="False positive rate", ylabel="True positive rate")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(
    probabilities: np.ndarray,
    labels: np.ndarray,
    patient_keys: Sequence[str],
    output_dir: Path,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Compute the metrics of ``probabilities`` (classes at ``threshold``, see
    :func:`classification_metrics`); write metrics.json and both plots."""
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(probabilities, labels, patient_keys, threshold)
    (RunLayout(output_dir).metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(np.array(metrics["confusion_matrix"]), output_dir / CONFUSION_PNG)
    plot_roc(probabilities, labels, output_dir / ROC_PNG)
    return metrics


def evaluate_checkpoint(
    checkpoint: str | Path,
    cache_dirs: Sequence[str | Path],
    output_dir: str | Path,
    split: str = "test",
    stored_rule: bool = True,
) -> dict[str, Any]:
    """Score the ``model.pt`` at ``checkpoint`` on ``split`` of the caches, by its operating
    threshold when it stores one (``stored_rule``; else by the most probable class, e.g. to
    compare with models that store none); write the report."""
    net, info = load_model(checkpoint)
    data = load_splits(list(cache_dirs), split)
    check_image_size(checkpoint, info, data.images)
    probabilities = predict_probabilities(net, data.images)
    threshold = stored_threshold(info) if stored_rule else None
    return write_report(probabilities, data.labels, data.patient_keys, Path(output_dir), threshold)


def stored_threshold(info: dict[str, Any]) -> float | None:
    """The operating threshold a model file stores (None: it stores none)."""
    stored = info.get(OPERATING_THRESHOLD)
    return None if stored is None else float(stored["value"])


def check_image_size(checkpoint: str | Path, info: dict[str, Any], images: np.ndarray) -> None:
    """Raise a clear error when ``images`` (N, 1, H, W) are not the size the model was trained on."""
    size = info.get("image_size")
    if size is not None and images.shape[-2:] != (size, size):
        raise ValueError(
            f"{checkpoint} was trained on {size}x{size} images but the caches hold "
            f"{images.shape[-2:]}: preprocess them at data.image_size={size}"
        )


def summary_line(metrics: dict[str, Any]) -> str:
    """One line of the headline metrics, for logs."""
    keys = ("accuracy", "auroc", "mcc", "pneumonia_auroc")
    values = "  ".join(f"{k}={_format(metrics[k])}" for k in keys)
    return (
        f"{values}  images={metrics['n_images']}  patients={metrics['n_patients']}  "
        f"(classes: {metrics['decision_rule']})"
    )


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
