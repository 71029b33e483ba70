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
# The calibration plot writes a bin's image count over its point when the previous count is at
# least this far to the left (in probability; the plot is about 440 px wide).
MIN_LABEL_GAP = 0.03


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
        (f"Reader {name}" + (" (simulated)" if r["simulated"] else ""), r["confusion_matrix"], r["labels"])
        for name, r in report["readers"].items()
    ]
    fig = Figure(figsize=(3.6 * len(panels), 3.6))
    for ax, (title, matrix, columns) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        _matrix(ax, np.asarray(matrix), columns, title)
    return png_bytes(fig)


def _point(ax: Axes, metrics: dict[str, Any], label: str, **style: Any) -> None:
    """An operating point (1 - specificity, sensitivity), where both are defined."""
    sensitivity, specificity = metrics["sensitivity"]["value"], metrics["specificity"]["value"]
    if sensitivity is not None and specificity is not None:
        ax.plot(1 - specificity, sensitivity, label=label, **style)


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
    _point(
        ax,
        metrics,
        f"model at threshold {report['threshold']['value']:.3f}",
        marker="o",
        ms=10,
        c="C0",
        mfc="white",
        mew=2,
        ls="none",
    )
    markers = "s^Dv<>pP*X"
    for i, (name, reader) in enumerate(report["readers"].items()):
        label = f"reader {name}" + (" (simulated)" if reader["simulated"] else "")
        style = {"marker": markers[i % len(markers)], "ms": 9, "c": f"C{i + 1}", "ls": "none"}
        _point(ax, reader["metrics"][PNEUMONIA_TASK], label, **style)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title="Pneumonia vs normal",
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
    )
    if curve is None:
        ax.text(0.5, 0.5, "no ROC curve:\nthe images hold one class", ha="center", va="center", color="grey")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return png_bytes(fig)


def calibration(report: dict[str, Any]) -> bytes:
    """Observed pneumonia fraction per bin of images (each bin at least ``min_images_per_bin``)
    against the mean predicted probability, with the exact 95% interval and the bin's image
    count (where it does not print over its neighbour's); the operating threshold as a vertical
    line; the images' probabilities below."""
    data = report["model"]["calibration"]
    threshold = report["threshold"]["value"]
    fig = Figure(figsize=(5.5, 5.4))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfectly calibrated")
    bins = data["bins"]
    x = np.array([b["mean_predicted"] for b in bins])
    y = np.array([b["observed"]["value"] for b in bins])
    low = np.array([b["observed"]["ci_low"] for b in bins])
    high = np.array([b["observed"]["ci_high"] for b in bins])
    top.errorbar(x, y, yerr=[y - low, high - y], fmt="o", capsize=3, label="model (95% interval)")
    labelled = -1.0
    for b, px, top_of_bar in zip(bins, x, high):
        if px - labelled >= MIN_LABEL_GAP:  # closer counts would overprint: the page's table has them
            top.text(
                px, top_of_bar + 0.02, f"n={b['n_images']}", rotation=90, ha="center", va="bottom", fontsize=7
            )
            labelled = px
    top.axvline(threshold, c="C3", lw=1, ls=":", label=f"operating threshold {threshold:.3f}")
    top.set(
        title=f"Calibration (Brier score {data['brier_score']:.3f})",
        ylabel="observed fraction with pneumonia",
        xlim=(0, 1),
        ylim=(-0.02, 1.2),
        yticks=np.linspace(0, 1, 6),
    )
    top.legend(loc="best", fontsize=8)
    edges = np.linspace(0, 1, len(data["histogram"]) + 1)
    bottom.bar(edges[:-1], data["histogram"], width=np.diff(edges), align="edge", edgecolor="white")
    bottom.axvline(threshold, c="C3", lw=1, ls=":")
    bottom.set(xlabel="predicted probability of pneumonia", ylabel="images", xlim=(0, 1))
    return png_bytes(fig)


FIGURES = {"confusion_matrices.png": confusion_matrices, "roc.png": roc, "calibration.png": calibration}
