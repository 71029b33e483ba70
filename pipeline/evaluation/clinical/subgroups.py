"""Performance by subgroup: by site, and by the coarse categories the site caches keep from the
image headers (view, sex, age band, equipment maker; :mod:`pipeline.ingestion.header`), each with
its intervals, a warning for every group too small to judge, and the largest gap between the
groups that are large enough."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.contracts.cache import SUBGROUP_COLUMNS
from pipeline.contracts.labels import NORMAL_INDEX
from pipeline.evaluation.clinical.analysis import PNEUMONIA_TASK, counts, model_tasks, task_metrics
from pipeline.evaluation.clinical.cases import Cases
from pipeline.evaluation.clinical.statistics import Resamples, proportion
from pipeline.ingestion.header import UNKNOWN

SITE = "site"
COLUMNS = (SITE, *SUBGROUP_COLUMNS)
COLUMN_NAMES = {
    SITE: "Site",
    "view": "View",
    "sex": "Sex",
    "age_band": "Age band",
    "manufacturer": "Equipment maker",
}
# A group with fewer images with pneumonia, or fewer without, is too small to judge: 10 of 10
# right still gives a sensitivity interval from 0.69 to 1.
MIN_PER_CLASS = 10
GAP_METRICS = ("sensitivity", "specificity")


def group_row(cases: Cases, predicted: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    """One group: counts, pneumonia-vs-normal metrics, three-class accuracy, whether too small."""
    resamples = Resamples.of(cases.patient_keys, n_resamples, seed)
    task = model_tasks(cases, predicted)[PNEUMONIA_TASK]
    positives = int(np.sum(cases.labels != NORMAL_INDEX))
    return counts(cases) | {
        "n_pneumonia": positives,
        "n_normal": len(cases) - positives,
        "metrics": task_metrics(task, cases.patient_keys, resamples),
        "accuracy": proportion(predicted == cases.labels, cases.patient_keys).as_dict(),
        "too_small": min(positives, len(cases) - positives) < MIN_PER_CLASS,
    }


def _gaps(groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each of GAP_METRICS, the lowest and highest value among the groups large enough to judge."""
    judged = {name: g for name, g in groups.items() if not g["too_small"] and name != UNKNOWN}
    gaps = {}
    for metric in GAP_METRICS:
        values = {n: g["metrics"][metric]["value"] for n, g in judged.items()}
        values = {n: v for n, v in values.items() if v is not None}
        if len(values) >= 2:
            low, high = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
            gaps[metric] = {
                "gap": values[high] - values[low],
                "lowest": {"group": low, "value": values[low]},
                "highest": {"group": high, "value": values[high]},
            }
    return gaps


def subgroup_table(
    cases: Cases, predicted: np.ndarray, column: str, n_resamples: int, seed: int
) -> dict[str, Any]:
    """The groups of ``column`` (``unknown`` last), their warnings and gaps; ``recorded`` False
    when no image has a known category."""
    values = cases.sites if column == SITE else cases.subgroup(column)
    names = sorted(set(values) - {UNKNOWN}) + ([UNKNOWN] if UNKNOWN in set(values) else [])
    table: dict[str, Any] = {"name": COLUMN_NAMES[column], "recorded": names != [UNKNOWN]}
    if not table["recorded"]:
        return table | {"groups": {}, "warnings": [], "gaps": {}}
    groups = {
        name: group_row(cases.subset(values == name), predicted[values == name], n_resamples, seed)
        for name in names
    }
    label = "" if column == SITE else f"{COLUMN_NAMES[column].lower()} "
    warnings = [
        f"{label}{name}: {g['n_pneumonia']} images with pneumonia and "
        f"{g['n_normal']} without, fewer than {MIN_PER_CLASS} of one kind: too few to judge"
        for name, g in groups.items()
        if g["too_small"]
    ]
    return table | {"groups": groups, "warnings": warnings, "gaps": _gaps(groups)}


def subgroups(cases: Cases, predicted: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    """Every subgroup table (see the module docstring)."""
    return {column: subgroup_table(cases, predicted, column, n_resamples, seed) for column in COLUMNS}
