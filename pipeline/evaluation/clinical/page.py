"""The clinical report's HTML page: its template, filters and metric names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup

from pipeline.contracts.labels import CLASS_NAMES
from pipeline.evaluation.clinical.analysis import PNEUMONIA_TASK
from pipeline.evaluation.clinical.statistics import BINARY_METRICS
from pipeline.evaluation.clinical.subgroups import SITE
from pipeline.evaluation.render import number, page_template

TEMPLATE = "template.html.j2"
METRIC_NAMES = {
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "roc_auc": "ROC-AUC",
}
Value = dict[str, Any] | None


def _defined(value: Value) -> bool:
    return value is not None and value["value"] is not None


def estimate(value: Value, digits: int = 3) -> str:
    """``0.214 (3 of 14; 95% CI 0.047 to 0.508)``: the value, its count and its 95% CI."""
    if value is None or value["value"] is None:
        return "– (not defined)"
    text = number(value["value"], digits)
    details = [f"{value['count']} of {value['total']}"] if value.get("total") is not None else []
    if value["ci_low"] is not None:
        details.append(f"95% CI {number(value['ci_low'], digits)} to {number(value['ci_high'], digits)}")
    return f"{text} ({'; '.join(details)})" if details else text


def cell(value: Value) -> Markup:
    """A table cell's content: the value, with its 95% CI on a second line (``0.672–0.956``;
    ``-0.306 to -0.047`` when a bound is negative, where a dash would read as a minus)."""
    if not _defined(value):
        return Markup("–")
    assert value is not None
    if value["ci_low"] is None:
        return Markup(number(value["value"]))
    between = " to " if value["ci_low"] < 0 else "–"
    return Markup('{}<br><span class="ci">{}{}{}</span>').format(
        number(value["value"]), number(value["ci_low"]), between, number(value["ci_high"])
    )


def p_value(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def render(report: dict[str, Any], figures: dict[str, str]) -> str:
    """The HTML page of ``report`` with ``figures`` (file name -> data URI)."""
    template = page_template(
        Path(__file__).parent, TEMPLATE, estimate=estimate, cell=cell, p_value=p_value, percent=percent
    )
    return template.render(
        r=report,
        figures=figures,
        task=PNEUMONIA_TASK,
        metrics=BINARY_METRICS,
        metric_names=METRIC_NAMES,
        classes=CLASS_NAMES,
        site_column=SITE,
    )
