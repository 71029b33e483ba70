"""The report's figures as PNG bytes (matplotlib without pyplot: no display needed)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.contracts.labels import CLASS_NAMES
from pipeline.evaluation.clinical.analysis import PNEUMONIA_TASK

DPI = 110


def png_bytes(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _matrix(ax: Axes, matrix: np.ndarray, columns: list[str], title: str) -> None:
    """Counts with the row-normalised fraction, true class down, call across."""
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{count}\n{fraction[i, j]:.0%}",
            ha="center",
            va="center",
            fontsize=9,
            color="white" if fraction[i, j] > 0.6 else "black",
        )
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set(title=title, xlabel="called", ylabel="true class")


def confusion_matrices(report: dict[str, Any]) -> bytes:
    """The model's confusion matrix, then each reader's."""
    panels = [("Model", report["model"]["confusion_matrix"], list(CLASS_NAMES))]
    panels += [
        (f"Reader {name}", r["confusion_matrix"], r["labels"]) for name, r in report["readers"].items()
    ]
    fig = Figure(figsize=(3.6 * len(panels), 3.6))
    for ax, (title, matrix, columns) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        _matrix(ax, np.asarray(matrix), columns, title)
    return png_bytes(fig)


def roc(report: dict[str, Any]) -> bytes:
    """The model's pneumonia-vs-normal ROC curve with its operating point and each reader's."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    curve = report["model"]["roc_curve"]
    metrics = report["model"]["metrics"][PNEUMONIA_TASK]
    if curve is not None:
        auc = metrics["roc_auc"]["value"]
        ax.plot(
            curve["false_positive_rate"],
            curve["true_positive_rate"],
            lw=2,
            label=f"model (ROC-AUC {auc:.3f})",
        )
    ax.plot(
        1 - metrics["specificity"]["value"],
        metrics["sensitivity"]["value"],
        "o",
        ms=10,
        c="C0",
        mfc="white",
        mew=2,
        label=f"model at threshold {report['threshold']['value']:.3f}",
    )
    markers = "s^Dv<>pP*X"
    for i, (name, reader) in enumerate(report["readers"].items()):
        point = reader["metrics"][PNEUMONIA_TASK]
        ax.plot(
            1 - point["specificity"]["value"],
            point["sensitivity"]["value"],
            markers[i % len(markers)],
            ms=9,
            c=f"C{i + 1}",
            label=f"reader {name}",
        )
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title="Pneumonia vs normal",
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
    )
    ax.legend(loc="lower right", fontsize=8)
    return png_bytes(fig)


def calibration(report: dict[str, Any]) -> bytes:
    """Observed pneumonia fraction against the model's predicted probability, with bin counts."""
    data = report["model"]["calibration"]
    fig = Figure(figsize=(5.5, 5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfectly calibrated")
    top.plot(data["mean_predicted"], data["observed_fraction"], "o-", label="model")
    top.set(
        title=f"Calibration (Brier score {data['brier_score']:.3f})",
        ylabel="observed fraction with pneumonia",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
    )
    top.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, data["bins"] + 1)
    bottom.bar(edges[:-1], data["images_per_bin"], width=np.diff(edges), align="edge", edgecolor="white")
    bottom.set(xlabel="predicted probability of pneumonia", ylabel="images")
    return png_bytes(fig)


FIGURES = {"confusion_matrices.png": confusion_matrices, "roc.png": roc, "calibration.png": calibration}
