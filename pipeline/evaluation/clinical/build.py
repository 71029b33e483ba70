"""Build the clinicians' report: score the caches, compare with the reads, write the files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.evaluation.clinical import analysis
from pipeline.evaluation.clinical.cases import Cases, load_cases, load_site_index, site_name
from pipeline.evaluation.clinical.figures import FIGURES
from pipeline.evaluation.clinical.page import render
from pipeline.evaluation.clinical.reads import load_reads
from pipeline.evaluation.clinical.statistics import CONFIDENCE_LEVEL, bootstrap_weights
from pipeline.evaluation.render import write_report_files
from pipeline.training.checkpoints import load_model

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"


@dataclass(frozen=True)
class ReportOptions:
    """How the report is computed (all recorded in it)."""

    split: str = "test"
    threshold_method: str = "youden"
    target_sensitivity: float | None = None
    n_resamples: int = 2000
    seed: int = 0


def build_report(
    checkpoint: str | Path,
    cache_dirs: Sequence[str | Path],
    reads_csv: str | Path | None = None,
    site_names: Sequence[str] | None = None,
    options: ReportOptions = ReportOptions(),
) -> tuple[dict[str, Any], Cases]:
    """Every number of the report, and the scored cases (which stay at the site)."""
    checkpoint, caches = Path(checkpoint), [Path(c) for c in cache_dirs]
    names = list(site_names) if site_names else [site_name(c) for c in caches]
    if len(names) != len(caches) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct site name per cache, got {names} for {len(caches)} caches")
    net, info = load_model(checkpoint)
    cases = load_cases(checkpoint, net, info, caches, names, options.split)
    validation = load_cases(checkpoint, net, info, caches, names, "val")
    threshold = analysis.operating_threshold(validation, options.threshold_method, options.target_sensitivity)
    predicted = analysis.model_classes(cases, threshold["value"])
    weights = bootstrap_weights(cases.patient_keys, options.n_resamples, options.seed)

    sites = {}
    for name in names:
        mask = cases.sites == name
        site = cases.subset(mask)
        if len(site):
            site_weights = bootstrap_weights(site.patient_keys, options.n_resamples, options.seed)
            sites[name] = analysis.model_section(site, predicted[mask], site_weights)

    reads = reads_section = None
    if reads_csv is not None:
        indexes = [load_site_index(cache, name) for cache, name in zip(caches, names)]
        reads = load_reads(reads_csv, cases, indexes, options.split)
        reads_section = {"file": Path(reads_csv).name, "warnings": reads.warnings}
    readers = reads.readers if reads else []
    report = {
        "title": "Chest X-ray model: clinical evaluation",
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "checkpoint": {
            "file": checkpoint.name,
            "model": info["config"]["net"].get("_target_"),
            "image_size": info.get("image_size"),
            "round": info.get("round"),
        },
        "split": options.split,
        "bootstrap": {
            "unit": "patient",
            "resamples": options.n_resamples,
            "seed": options.seed,
            "confidence_level": CONFIDENCE_LEVEL,
            "interval": "percentile",
        },
        "threshold": threshold,
        "model": analysis.model_section(cases, predicted, weights)
        | {"calibration": analysis.calibration(cases), "roc_curve": analysis.roc_points(cases)},
        "sites": sites,
        "readers": {r.name: analysis.reader_section(r, cases, weights) for r in readers},
        "comparisons": {r.name: analysis.comparison(r, cases, predicted, weights) for r in readers},
        "agreement": analysis.agreement(readers, len(cases)),
        "reads": reads_section,
    }
    return report, cases


def write_clinical_report(report: dict[str, Any], output_dir: str | Path) -> Path:
    """Write report.json, the figures (PNG) and the self-contained report.html; return the HTML path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {name: draw(report) for name, draw in FIGURES.items()}
    return write_report_files(output_dir, report, figures, render, REPORT_JSON, REPORT_HTML)
