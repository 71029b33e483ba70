"""Write the audit: ``audit.json`` (every number), the figures (PNG) and a self-contained ``audit.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.evaluation.clinical.figures import png_bytes
from pipeline.evaluation.render import page_template, write_report_files

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"
TEMPLATE = "audit.html.j2"
INVERSION_PNG = "inversion.png"
ATTACK_NAMES = {"loss": "loss threshold", "lira": "LiRA (offline)"}


def _attacks(model: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, model["membership"][name]) for name in ATTACK_NAMES if name in model["membership"]]


def roc_figure(audit: dict[str, Any]) -> bytes:
    """Membership attacks' ROC curves on log-log axes (as in LiRA), one line per model and attack."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    floor = min(m["membership"]["loss"]["fpr_resolution"] for m in audit["models"]) / 2
    for i, model in enumerate(audit["models"]):
        for style, (name, attack) in zip(("-", "--"), _attacks(model)):
            fpr = np.maximum(attack["roc"]["fpr"], floor)
            tpr = np.maximum(attack["roc"]["tpr"], floor)
            ax.plot(
                fpr,
                tpr,
                style,
                c=f"C{i}",
                lw=1.8,
                label=f"{model['name']}, {ATTACK_NAMES[name]} (AUC {attack['auc']:.2f})",
            )
    ax.plot([floor, 1], [floor, 1], ls=":", c="grey", lw=0.8, label="chance")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(floor, 1),
        ylim=(floor, 1.05),
        title="Membership inference",
        xlabel="false positive rate (non-members called members)",
        ylabel="true positive rate (members found)",
    )
    ax.legend(loc="lower right", fontsize=7)
    return png_bytes(fig)


def score_figure(audit: dict[str, Any]) -> bytes:
    """Histograms of each attack's scores for members and non-members."""
    panels = [(model, name, attack) for model in audit["models"] for name, attack in _attacks(model)]
    fig = Figure(figsize=(3.6 * len(panels), 3.2))
    for ax, (model, name, attack) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        members, others = np.asarray(attack["scores"]["members"]), np.asarray(attack["scores"]["non_members"])
        edges = np.histogram_bin_edges(np.concatenate([members, others]), bins=20)
        ax.hist(members, bins=edges, alpha=0.6, density=True, label=f"members ({len(members)})")
        ax.hist(others, bins=edges, alpha=0.6, density=True, label=f"non-members ({len(others)})")
        ax.set(title=f"{model['name']}: {ATTACK_NAMES[name]}", xlabel="attack score (higher: member)")
        ax.legend(fontsize=7)
    return png_bytes(fig)


def inversion_figure(images: dict[str, np.ndarray]) -> bytes:
    """Original images (rows) beside their reconstructions from each update."""
    columns = list(images)
    rows = len(images[columns[0]])
    fig = Figure(figsize=(2.2 * len(columns), 2.3 * rows))
    axes = np.asarray(fig.subplots(rows, len(columns))).reshape(rows, len(columns))
    for j, title in enumerate(columns):
        for i in range(rows):
            axes[i, j].imshow(images[title][i, 0], cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_axis_off()
        axes[0, j].set_title(title, fontsize=9)
    return png_bytes(fig)


def render(audit: dict[str, Any], figures: dict[str, str]) -> str:
    """The HTML page of ``audit`` with ``figures`` (file name -> data URI)."""
    template = page_template(Path(__file__).parent, TEMPLATE, percent=_percent)
    return template.render(a=audit, figures=figures, attack_names=ATTACK_NAMES)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def write_audit_report(audit: dict[str, Any], images: dict[str, np.ndarray], output_dir: str | Path) -> Path:
    """Write audit.json, the PNG figures and audit.html into ``output_dir``; return the HTML path.

    ``images`` maps column titles (original, each protection) to images (N, 1, H, W) in [0, 1];
    they are drawn only if ``audit["images_included"]`` (a report to be shared leaves out the
    training image and its reconstructions).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "membership_roc.png": roc_figure(audit),
        "membership_scores.png": score_figure(audit),
    }
    if audit["images_included"]:
        figures[INVERSION_PNG] = inversion_figure(images)
    else:
        (output_dir / INVERSION_PNG).unlink(missing_ok=True)  # an earlier run's, with the images
    return write_report_files(output_dir, audit, figures, render, AUDIT_JSON, AUDIT_HTML)
