"""Build the clinicians' report: score the caches, compare with the reads, write the files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.contracts.labels import NORMAL_INDEX
from pipeline.evaluation.clinical import analysis
from pipeline.evaluation.clinical.cases import ALL_SPLITS, Cases, load_cases, load_site_index, site_name
from pipeline.evaluation.clinical.figures import FIGURES
from pipeline.evaluation.clinical.page import render
from pipeline.evaluation.clinical.reads import load_reads
from pipeline.evaluation.clinical.statistics import BCA, CONFIDENCE_LEVEL, EXACT, Resamples
from pipeline.evaluation.clinical.subgroups import subgroups
from pipeline.evaluation.provenance import model_provenance
from pipeline.evaluation.render import write_report_files
from pipeline.evaluation.threshold import (
    decision_rule,
    grid_counts,
    model_classes,
    operating_threshold,
    rechosen,
)
from pipeline.training.checkpoints import OPERATING_THRESHOLD, load_model

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
# The threshold's entries the report keeps (the stored validation curve stays in the model).
THRESHOLD_FIELDS = (
    "value",
    "method",
    "target_sensitivity",
    "chosen_on",
    "n_positive",
    "n_negative",
    "sensitivity",
    "specificity",
    "at_half",
)


@dataclass(frozen=True)
class ReportOptions:
    """How the report is computed (all recorded in it).

    ``split``: train, val, test or ``all``; ``external``: the caches are sites that did not train
    the model, scored on every image (``split`` must be ``all``); ``threshold``: a value that
    overrides the model's own; ``target_sensitivity``: choose the threshold again on the model's
    stored validation counts, the highest reaching this sensitivity; ``simulated_reads``: the reads
    are simulated whatever the reads file says.
    """

    split: str = "test"
    external: bool = False
    threshold: float | None = None
    target_sensitivity: float | None = None
    simulated_reads: bool = False
    n_resamples: int = 2000
    seed: int = 0


def explanation(threshold: dict[str, Any]) -> str:
    """The threshold in one sentence: where it comes from and why it lies where it does."""
    value = threshold["value"]
    if threshold["method"] is None:
        return f"{value:.3f} was set for this evaluation (--threshold), not chosen on validation images."
    how = (
        "maximises sensitivity + specificity (Youden's J)"
        if threshold["method"] == "youden"
        else f"is the highest that reaches a sensitivity of {threshold['target_sensitivity']:g}"
    )
    sentence = (
        f"{value:.3f} is the threshold that {how} on {threshold['chosen_on']} "
        f"({threshold['n_positive']} with pneumonia, {threshold['n_negative']} without)"
    )
    half = threshold["at_half"]
    if value > 0.6:
        sentence += (
            f"; it lies far above 0.5 because at 0.5 the model would call pneumonia in "
            f"{1 - half['specificity']:.0%} of the normal validation images: its probabilities run high"
        )
    elif value < 0.4:
        sentence += (
            f"; it lies far below 0.5 because at 0.5 the model would miss "
            f"{1 - half['sensitivity']:.0%} of the validation pneumonias: its probabilities run low"
        )
    return sentence + "."


def choose_threshold(
    checkpoint: Path, info: dict[str, Any], options: ReportOptions, validation: Callable[[], Cases]
) -> dict[str, Any]:
    """The operating threshold of this evaluation: ``options.threshold``, else the model's own
    (chosen again for ``options.target_sensitivity``), else, for a model that stores none and an
    internal evaluation of the test or train split, one chosen on the ``validation`` cases."""
    stored = info.get(OPERATING_THRESHOLD)
    if options.threshold is not None:
        return {"value": float(options.threshold), "method": None, "source": "--threshold"}
    if stored is not None:
        if options.target_sensitivity is None:
            return {k: stored[k] for k in THRESHOLD_FIELDS} | {"source": "the model"}
        chosen = rechosen(stored, "sensitivity", options.target_sensitivity)
        if chosen is None:
            raise ValueError(f"{checkpoint}: its stored validation counts hold a single class")
        return {k: chosen[k] for k in THRESHOLD_FIELDS} | {"source": "the model's validation counts"}
    if options.external or options.split in ("val", ALL_SPLITS):
        raise ValueError(
            f"{checkpoint} stores no operating threshold (a model released by a federation stores "
            f"the one chosen on its validation images): pass --threshold <value>"
        )
    cases = validation()
    method = "youden" if options.target_sensitivity is None else "sensitivity"
    chosen = operating_threshold(
        grid_counts(cases.labels != NORMAL_INDEX, cases.pneumonia_score),
        "the validation images of the evaluated sites, as the model stores no threshold",
        method,
        options.target_sensitivity,
    )
    if chosen is None:
        raise ValueError(
            f"{checkpoint} stores no operating threshold and the validation images of the evaluated "
            "sites hold a single class: pass --threshold <value>"
        )
    return {k: chosen[k] for k in THRESHOLD_FIELDS} | {"source": "the evaluated sites' validation images"}


def _provenance_warnings(provenance: dict[str, Any], names: list[str], external: bool) -> list[str]:
    training = provenance["training"] or {}
    trained_here = sorted(set(names) & set(training.get("sites", [])))
    if external and trained_here:
        return [
            f"site(s) {', '.join(trained_here)} are named among the sites of the model's training run: "
            "they are external only if they are other hospitals of the same name"
        ]
    return []


def build_report(
    checkpoint: str | Path,
    cache_dirs: Sequence[str | Path],
    reads_csv: str | Path | None = None,
    site_names: Sequence[str] | None = None,
    options: ReportOptions = ReportOptions(),
    statement: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Cases]:
    """Every number of the report, and the scored cases (which stay at the site).

    ``statement``: the intended use, population, reference standard and whether this is a
    demonstration model (``conf/clinical``).
    """
    checkpoint, caches = Path(checkpoint), [Path(c) for c in cache_dirs]
    names = list(site_names) if site_names else [site_name(c) for c in caches]
    if len(names) != len(caches) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct site name per cache, got {names} for {len(caches)} caches")
    if options.external and options.split != ALL_SPLITS:
        raise ValueError("an external site is scored on all its images: use split 'all'")
    net, info = load_model(checkpoint)
    threshold = choose_threshold(
        checkpoint, info, options, lambda: load_cases(checkpoint, net, info, caches, names, "val")
    )
    threshold["explanation"] = explanation(threshold)
    cases = load_cases(checkpoint, net, info, caches, names, options.split)
    predicted = model_classes(cases.probabilities, threshold["value"])
    resamples = Resamples.of(cases.patient_keys, options.n_resamples, options.seed)

    reads = reads_section = None
    if reads_csv is not None:
        indexes = [load_site_index(cache, name) for cache, name in zip(caches, names)]
        reads = load_reads(reads_csv, cases, indexes, options.split)
        simulated = options.simulated_reads or any(r.simulated for r in reads.readers)
        reads_section = {
            "file": Path(reads_csv).name,
            "warnings": reads.warnings,
            "simulated": simulated,
            "declared_by": "--simulated-reads" if options.simulated_reads else "the reads file",
        }
    readers = reads.readers if reads else []
    provenance = model_provenance(checkpoint, info)
    statement = statement or {}
    report = {
        "title": "Chest X-ray model: clinical evaluation",
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "provenance": provenance,
        "statement": statement,
        "demonstration": bool(statement.get("demonstration")),
        "mode": "external" if options.external else "internal",
        "split": options.split,
        "sites": names,
        "intervals": {
            "confidence_level": CONFIDENCE_LEVEL,
            "proportions": EXACT,
            "roc_auc_and_differences": BCA,
            "unit": "patient",
            "resamples": options.n_resamples,
            "seed": options.seed,
        },
        "threshold": threshold,
        "decision_rule": decision_rule(threshold["value"]),
        "model": analysis.model_section(cases, predicted, resamples)
        | {"calibration": analysis.calibration(cases), "roc_curve": analysis.roc_points(cases)},
        "subgroups": subgroups(cases, predicted, options.n_resamples, options.seed),
        "readers": {r.name: analysis.reader_section(r, cases, resamples) for r in readers},
        "comparisons": {r.name: analysis.comparison(r, cases, predicted, resamples) for r in readers},
        "agreement": analysis.agreement(readers, len(cases)),
        "reads": reads_section,
        "warnings": _provenance_warnings(provenance, names, options.external),
    }
    return report, cases


def write_clinical_report(report: dict[str, Any], output_dir: str | Path) -> Path:
    """Write report.json, the figures (PNG) and the self-contained report.html; return the HTML path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {name: draw(report) for name, draw in FIGURES.items()}
    return write_report_files(output_dir, report, figures, render, REPORT_JSON, REPORT_HTML)
