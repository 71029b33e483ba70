"""The clinical report's HTML page: its template, filters and metric names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup

from pipeline.contracts.labels import CLASS_NAMES
from pipeline.evaluation.clinical.analysis import PNEUMONIA_TASK
from pipeline.evaluation.clinical.statistics import BINARY_METRICS
from pipeline.evaluation.render import number, page_template

TEMPLATE = "template.html.j2"
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "mcc": "MCC",
    "roc_auc": "ROC-AUC",
}


def estimate(value: dict[str, float | None] | None, digits: int = 3) -> str:
    """``0.912 (0.853 to 0.960)``: the value and its 95% CI."""
    if value is None or value["value"] is None:
        return "–"
    if value["ci_low"] is None:
        return number(value["value"], digits)
    low, high = number(value["ci_low"], digits), number(value["ci_high"], digits)
    return f"{number(value['value'], digits)} ({low} to {high})"


def cell(value: dict[str, float | None] | None) -> Markup:
    """A table cell's content: the value, with its 95% CI on a second line."""
    if value is None or value["value"] is None or value["ci_low"] is None:
        return Markup(estimate(value))
    return Markup('{}<br><span class="ci">{} to {}</span>').format(
        number(value["value"]), number(value["ci_low"]), number(value["ci_high"])
    )


def p_value(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def render(report: dict[str, Any], figures: dict[str, str]) -> str:
    """The HTML page of ``report`` with ``figures`` (file name -> data URI)."""
    template = page_template(Path(__file__).parent, TEMPLATE, estimate=estimate, cell=cell, p_value=p_value)
    return template.render(
        r=report,
        figures=figures,
        task=PNEUMONIA_TASK,
        metrics=BINARY_METRICS,
        metric_names=METRIC_NAMES,
        classes=CLASS_NAMES,
    )
