"""The model card written when a model is released (``scripts/release_model.py``): what the model
is and is for, the data it was trained on (per site: image counts and class mix only), its
privacy (secure aggregation, each site's epsilon and delta), the audit's figures, its clinical
performance with intervals, and its known limitations. ``model_card.json`` and a self-contained
``model_card.html`` in the look of the clinical report."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.contracts.cache import SPLITS, SiteCache
from pipeline.contracts.labels import CLASS_NAMES
from pipeline.contracts.layout import SitePaths
from pipeline.evaluation.audit.release import ReleasePolicy, audited_entry, check_release
from pipeline.evaluation.clinical.analysis import PNEUMONIA_TASK
from pipeline.evaluation.clinical.build import ReportOptions, build_report
from pipeline.evaluation.clinical.page import estimate
from pipeline.evaluation.provenance import model_provenance, statement
from pipeline.evaluation.render import page_template, write_report_files
from pipeline.training.checkpoints import load_checkpoint

MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_HTML = "model_card.html"
TEMPLATE = "model_card.html.j2"
SMALL_TEST = 100  # fewer test images than this: the intervals are wide


def training_data(sites: Sequence[SitePaths], image_size: int) -> dict[str, dict[str, Any]]:
    """Per site and split: images, patients and images per class, from the site's cache."""
    data = {}
    for site in sites:
        manifest = SiteCache(site.cache(image_size)).manifest()
        data[site.name] = {
            split: {
                "n_images": int(len(rows)),
                "n_patients": int(rows["patient_key"].nunique()),
                "per_class": {name: int((rows["label"] == c).sum()) for c, name in enumerate(CLASS_NAMES)},
            }
            for split, rows in ((s, manifest[manifest["split"] == s]) for s in SPLITS)
        }
    return data


def clinical_performance(report: dict[str, Any]) -> dict[str, Any]:
    """The headline of a clinical report: pneumonia vs normal, each type, accuracy, the threshold."""
    model = report["model"]
    metrics = model["metrics"][PNEUMONIA_TASK]
    return {
        "sites": report["sites"],
        "split": report["split"],
        "mode": report["mode"],
        "n_images": model["n_images"],
        "n_patients": model["n_patients"],
        "threshold": report["threshold"]["value"],
        "threshold_explanation": report["threshold"]["explanation"],
        "sensitivity": metrics["sensitivity"],
        "specificity": metrics["specificity"],
        "roc_auc": metrics["roc_auc"],
        "per_type_sensitivity": model["per_type_sensitivity"],
        "accuracy": model["accuracy"],
        "main_confusions": model["main_confusions"],
    }


def measured_limitations(report: dict[str, Any]) -> list[str]:
    """Limitations the evaluation itself shows: a small test set, groups too small to judge,
    subgroups the headers do not record, a demonstration model."""
    found = []
    if report["demonstration"]:
        found.append("A demonstration model: trained on a small public sample; not for use on patients.")
    n_images = report["model"]["n_images"]
    if n_images < SMALL_TEST:
        found.append(
            f"Tested on {n_images} images only: its intervals are wide (see the clinical performance)."
        )
    for table in report["subgroups"].values():
        if not table["recorded"]:
            found.append(f"{table['name']}: not recorded in the images' headers, so not assessed.")
        elif table["warnings"]:
            small = [name for name, group in table["groups"].items() if group["too_small"]]
            found.append(f"{table['name']}: too few images to judge {', '.join(small)}.")
    return found


def model_card(
    provenance: dict[str, Any],
    statement: dict[str, Any],
    training: dict[str, dict[str, Any]],
    audit_entry: dict[str, Any],
    policy: ReleasePolicy,
    report: dict[str, Any],
) -> dict[str, Any]:
    """Every entry of the model card (aggregates and settings only); the audit's figures are
    judged by ``policy``, the one the model is released under."""
    return {
        "title": "Model card",
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "provenance": provenance,
        "statement": statement,
        "demonstration": bool(statement.get("demonstration")),
        "training_data": training,
        "privacy": (provenance["training"] or {}).get("privacy"),
        "audit": {
            "release_metrics": audit_entry["release_metrics"],
            "violations": check_release(audit_entry, policy),
            "policy": vars(policy),
        },
        "clinical_performance": clinical_performance(report),
        "limitations": measured_limitations(report) + list(statement.get("limitations") or []),
    }


def render(card: dict[str, Any], figures: dict[str, str]) -> str:
    """The HTML page of ``card``."""
    return page_template(Path(__file__).parent, TEMPLATE, estimate=estimate).render(c=card)


def write_model_card(card: dict[str, Any], output_dir: str | Path) -> Path:
    """Write model_card.json and model_card.html into ``output_dir``; return the HTML path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return write_report_files(output_dir, card, {}, render, MODEL_CARD_JSON, MODEL_CARD_HTML)


def write_release_card(model: Path, audit_json: Path, policy: ReleasePolicy, cfg: DictConfig) -> Path:
    """The model card of a released ``model`` (its audit in ``audit_json``), scored on the test
    patients of ``cfg.data.sites`` (the machine that releases a model holds them, as for the
    audit), written next to the released copy in ``audit.release.folder``."""
    _, info = load_checkpoint(model)
    sites = SitePaths.of_data(cfg.data)
    image_size = int(info.get("image_size") or cfg.data.image_size)
    caches = [site.cache(image_size) for site in sites]
    said = statement(model, cfg.clinical)
    report, _ = build_report(
        model, caches, site_names=[s.name for s in sites], options=ReportOptions(), statement=said
    )
    card = model_card(
        model_provenance(model, info),
        said,
        training_data(sites, image_size),
        audited_entry(model, audit_json),
        policy,
        report,
    )
    return write_model_card(card, Path(cfg.audit.release.folder))
