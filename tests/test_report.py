"""The clinicians' report end to end: the demo's federated model (its operating threshold chosen by
the federation) against the simulated sample reads, an external site, the model card of a released
model, and every page laid out and printed by a real headless browser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape
from omegaconf import OmegaConf
from scipy.stats import binomtest

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.labels import NORMAL_INDEX
from pipeline.contracts.layout import RunLayout
from pipeline.contracts.messages import NUM_EXAMPLES
from pipeline.evaluation.audit.release import ReleasePolicy, release_model
from pipeline.evaluation.clinical import ReportOptions, build_report
from pipeline.evaluation.clinical.analysis import PNEUMONIA_TASK
from pipeline.evaluation.clinical.cases import Cases, load_cases
from pipeline.evaluation.clinical.page import cell
from pipeline.evaluation.clinical.statistics import SCORE
from pipeline.evaluation.clinical.subgroups import subgroups
from pipeline.evaluation.model_card import render as render_card
from pipeline.evaluation.model_card import write_release_card
from pipeline.evaluation.provenance import training_record
from pipeline.evaluation.threshold import grid_counts, operating_threshold
from pipeline.governance.revocation import preprocess_consented
from pipeline.ingestion.header import UNKNOWN
from pipeline.ingestion.pseudonym import file_sha256
from pipeline.support.demo_sites import prepare_demo_sites
from pipeline.training.checkpoints import OPERATING_THRESHOLD, load_checkpoint, load_model, save_checkpoint
from pipeline.training.loop import build_classifier
from scripts.simulate_reads import SAMPLE_READS, simulate_reads
from tests.browser import PX_PER_MM, Browser
from tests.conftest import DEMO_IMAGE_SIZE, REPO, compose_config

pytestmark = pytest.mark.report

FIGURES = ("confusion_matrices.png", "roc.png", "calibration.png")
TABLES = ("model-metrics", "reader-metrics", "comparison-table", "difference-table", "agreement-table")
# The printable width of A4 at the stylesheet's 12 mm side margins, in CSS pixels.
A4_PRINT_WIDTH = int((210 - 2 * 12) * PX_PER_MM)
LAYOUT_PROBLEMS = """(() => {
  const problems = [], root = document.documentElement;
  if (root.scrollWidth > root.clientWidth + 1)
    problems.push(`the page is ${root.scrollWidth}px wide in a ${root.clientWidth}px window`);
  for (const table of document.querySelectorAll('table')) {
    const box = table.parentElement, right = Math.min(box.getBoundingClientRect().right, root.clientWidth);
    if (table.scrollWidth > box.clientWidth + 1)
      problems.push(`table ${table.id} is ${table.scrollWidth}px wide in ${box.clientWidth}px`);
    for (const th of table.querySelectorAll('th'))
      if (th.getBoundingClientRect().right > right + 1)
        problems.push(`${table.id}: column ${th.textContent} cut`);
  }
  for (const img of document.images)
    if (img.getBoundingClientRect().right > root.clientWidth + 1) problems.push(`figure ${img.alt} cut`);
  return problems;
})()"""


def run_script(script: str, *args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPO / "scripts" / script), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def cache_dirs(demo_sites) -> list[Path]:
    return [site.cache(DEMO_IMAGE_SIZE) for site in demo_sites.sites]


def values(node: Any) -> Iterator[dict[str, Any]]:
    """Every estimate anywhere in a report (its value None where undefined)."""
    if isinstance(node, dict):
        if "value" in node and "ci_low" in node:
            yield node
        for value in node.values():
            yield from values(value)
    elif isinstance(node, list):
        for value in node:
            yield from values(value)


@pytest.fixture(scope="module")
def report_dir(demo_run, demo_sites, tmp_path_factory) -> Path:
    """scripts/evaluate.py on the demo's federated model with the sample reads."""
    out = tmp_path_factory.mktemp("clinical")
    done = run_script(
        "evaluate.py",
        demo_run / "model.pt",
        *cache_dirs(demo_sites),
        "--reads",
        SAMPLE_READS,
        "--output-dir",
        out,
        "--bootstrap",
        "500",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "open" in done.stdout and "report.html" in done.stdout
    return out / "report"


@pytest.fixture(scope="module")
def report(report_dir) -> dict[str, Any]:
    return json.loads((report_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def external_site(tmp_path_factory):
    """A site of pneumonia images only (every normal image removed), preprocessed at 64 px."""
    site = prepare_demo_sites(tmp_path_factory.mktemp("external"), n_sites=1, max_images=40)[0]
    labels = pd.read_csv(site.labels_csv)
    for name in labels.loc[labels["label"] == "normal", "file"]:
        (site.input_dir / name).unlink()
    labels[labels["label"] != "normal"].to_csv(site.labels_csv, index=False)
    preprocess_consented(
        site, compose_config(f"data.image_size={DEMO_IMAGE_SIZE}", "preprocess.workers=1").preprocess
    )
    return site


def test_sample_reads_are_the_documented_simulation():
    committed = pd.read_csv(SAMPLE_READS)
    pd.testing.assert_frame_equal(committed, simulate_reads(seed=0), check_dtype=False)
    assert set(committed["reader"]) == {"R1", "R2", "R3"}
    assert committed.groupby("reader").size().nunique() == 1  # every reader reads every image
    assert (committed["simulated"] == "yes").all()


@pytest.mark.slow
def test_the_federation_chooses_the_threshold_on_its_pooled_validation_counts(demo_run, demo_sites):
    """The model file holds the threshold the coordinator chose from the sites' counts; the same
    choice made centrally on every site's validation images with that model agrees exactly."""
    net, info = load_model(demo_run / "model.pt")
    stored = info[OPERATING_THRESHOLD]
    validation = load_cases(
        demo_run / "model.pt", net, info, cache_dirs(demo_sites), ["s1", "s2", "s3"], "val"
    )
    pneumonia = validation.labels != NORMAL_INDEX
    central = operating_threshold(grid_counts(pneumonia, validation.pneumonia_score), stored["chosen_on"])
    assert central is not None and stored["value"] == central["value"]
    assert (stored["n_positive"], stored["n_negative"]) == (pneumonia.sum(), (~pneumonia).sum())
    assert stored["chosen_on"] == "the pooled validation images of 3 site(s)"
    rounds = [json.loads(line) for line in RunLayout(demo_run).rounds.read_text().splitlines()]
    assert rounds[-1]["operating_threshold"]["value"] == stored["value"]


@pytest.mark.slow
def test_report_numbers_of_the_demo_model(report, report_dir, demo_run, demo_sites):
    metrics = json.loads((report_dir.parent / "metrics.json").read_text())
    model = report["model"]
    assert model["n_images"] == metrics["n_images"] and model["n_patients"] == metrics["n_patients"]
    assert model["metrics"][PNEUMONIA_TASK]["roc_auc"]["value"] == pytest.approx(metrics["pneumonia_auroc"])
    # One accuracy: three classes under the operating rule, in the report and in metrics.json.
    assert model["accuracy"]["value"] == pytest.approx(metrics["accuracy"])
    assert metrics["decision_rule"] == report["decision_rule"]
    assert np.array(model["confusion_matrix"]).sum() == model["n_images"]
    stored = load_checkpoint(demo_run / "model.pt")[1][OPERATING_THRESHOLD]
    threshold = report["threshold"]
    assert threshold["source"] == "the model" and threshold["value"] == stored["value"]
    assert threshold["explanation"].startswith(f"{stored['value']:.3f} is the threshold that maximises")
    assert set(report["readers"]) == set(report["comparisons"]) == {"R1", "R2", "R3"}
    assert report["readers"]["R3"]["labels"] == ["normal", "pneumonia"]
    assert len(report["agreement"]) == 3
    assert report["reads"]["warnings"] == [
        f"{3 * (216 - model['n_images'])} read(s) of images outside the test split ignored"
    ]
    for name in FIGURES:
        assert (report_dir / name).read_bytes().startswith(b"\x89PNG")


def test_table_cells_write_an_interval_with_a_negative_bound_with_to():
    """A model-minus-reader difference of -0.147 (-0.306 to -0.047): "-0.306–-0.047" would read
    as a subtraction."""
    difference = {"value": -0.147, "ci_low": -0.306, "ci_high": -0.047, "method": "BCa bootstrap"}
    assert cell(difference) == '-0.147<br><span class="ci">-0.306 to -0.047</span>'
    assert cell(difference | {"ci_high": 0.2}) == '-0.147<br><span class="ci">-0.306 to 0.200</span>'
    positive = {"value": 0.853, "ci_low": 0.672, "ci_high": 0.956}
    assert cell(positive) == '0.853<br><span class="ci">0.672–0.956</span>'
    assert cell({"value": None, "ci_low": None, "ci_high": None}) == "–"


@pytest.mark.slow
def test_every_interval_has_width_and_says_how_it_was_made(report):
    estimates = list(values(report))
    assert all(e["ci_low"] is not None for e in estimates if e["value"] is not None)  # every value has one
    found = [e for e in estimates if e["ci_low"] is not None]
    assert len(found) > 50  # how many are defined depends on the demo's (secret) test split
    for estimate in found:
        assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"], estimate
        assert estimate["ci_high"] - estimate["ci_low"] > 0.01, estimate
        assert estimate["method"] in (
            "exact",
            "exact, effective sample size",
            "BCa bootstrap",
            "score (no bootstrap spread)",
        )
    sensitivity = report["model"]["metrics"][PNEUMONIA_TASK]["sensitivity"]
    assert (
        sensitivity["total"]
        == report["model"]["n_per_class"]["bacterial"] + report["model"]["n_per_class"]["viral"]
    )


@pytest.mark.slow
def test_summary_gives_each_pneumonia_type_and_the_main_confusions(report, report_dir):
    model = report["model"]
    matrix = np.array(model["confusion_matrix"])
    for c, name in ((1, "bacterial"), (2, "viral")):
        per_type = model["per_type_sensitivity"][name]
        assert (per_type["count"], per_type["total"]) == (matrix[c, c], matrix[c].sum())
    count, row, _ = min((-matrix[i, j], i, j) for i in range(3) for j in range(3) if i != j)
    assert model["main_confusions"][0].startswith(f"{-count} of {matrix[row].sum()}")
    page = (report_dir / "report.html").read_text()
    summary = page[page.index('id="summary"') : page.index('id="reads-warnings"')]
    assert "Bacterial pneumonias called bacterial" in summary and "; viral pneumonias called viral" in summary
    assert model["main_confusions"][0] in summary
    assert "Accuracy is three-class accuracy" in page


@pytest.mark.slow
def test_provenance_intended_use_and_the_banners(report, report_dir, demo_run):
    provenance = report["provenance"]
    assert provenance["sha256"] == file_sha256(demo_run / "model.pt")
    assert (provenance["image_size"], provenance["round"]) == (DEMO_IMAGE_SIZE, 1)
    assert sum(provenance["training"]["training_images"].values()) > 100
    assert report["statement"]["intended_use"].startswith("Research use only")
    assert report["demonstration"] and report["reads"]["simulated"]
    page = (report_dir / "report.html").read_text()
    assert 'id="demonstration-banner"' in page and 'id="simulated-reads-banner"' in page
    assert "(R1, R2, R3) are simulated, not radiologists" in page


@pytest.mark.slow
def test_calibration_bins_hold_enough_images_with_intervals(report, report_dir):
    calibration = report["model"]["calibration"]
    assert sum(b["n_images"] for b in calibration["bins"]) == report["model"]["n_images"]
    for b in calibration["bins"]:
        assert b["n_images"] >= calibration["min_images_per_bin"] == 10
        assert b["observed"]["ci_low"] < b["observed"]["ci_high"]
        assert b["lowest"] <= b["mean_predicted"] <= b["highest"]
    assert sum(calibration["histogram"]) == report["model"]["n_images"]
    page = (report_dir / "report.html").read_text()
    table = re.sub(r">\s+<", "><", page[page.index('id="calibration-table"') :])
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + len(calibration["bins"])  # the header, then one row per bin
    for b in calibration["bins"]:
        row = f"<td>{b['n_images']}</td><td>{b['mean_predicted']:.3f}</td><td>{b['observed']['count']}</td>"
        assert row in table
    # The threshold is explained where the plot draws it, and the summary points to the explanation.
    caption = page[page.index('alt="Calibration curve"') : page.index('id="calibration-table"')]
    explained = escape(report["threshold"]["explanation"])
    assert f"The dotted line is the operating threshold: {explained}" in caption
    summary = page[page.index('id="summary"') : page.index('id="summary-types"')]
    assert 'why this value: <a href="#threshold">' in summary


@pytest.mark.slow
def test_subgroups_from_the_cache_with_warnings_for_small_groups(report, demo_sites):
    tables = report["subgroups"]
    assert set(tables["site"]["groups"]) == {"site1", "site2", "site3"}
    assert sum(g["n_images"] for g in tables["site"]["groups"].values()) == report["model"]["n_images"]
    test_views = pd.concat(
        SiteCache(c).manifest().query("split == 'test'")["view"] for c in cache_dirs(demo_sites)
    )
    assert {
        k: g["n_images"] for k, g in tables["view"]["groups"].items()
    } == test_views.value_counts().to_dict()
    assert not tables["sex"]["recorded"] and not tables["age_band"]["recorded"]  # the demo headers lack them
    for table in tables.values():
        small = [name for name, g in table["groups"].items() if g["too_small"]]
        assert len(table["warnings"]) == len(small)
        for group in table["groups"].values():
            assert group["too_small"] == (min(group["n_pneumonia"], group["n_normal"]) < 10)


def test_subgroups_by_sex_and_age_band_with_gaps_and_small_groups():
    """The categories the demo's headers lack: 60 girls (sensitivity 27/30, specificity 27/30),
    30 boys (12/15, 15/15) and 20 children of unknown sex (all right); 6 of the girls' images, all
    right, are of the older age band. The gaps compare girls and boys only (unknown is no group),
    the older band is too small to judge and its intervals are not zero-width."""
    rows = []  # (sex, age band, true class, model's class, P(pneumonia))
    for sex, n_positive, n_missed, n_negative, n_false in (("F", 30, 3, 30, 3), ("M", 15, 3, 15, 0)):
        rows += [(sex, "1-4 y", 1 + i % 2, 0 if i < n_missed else 1 + i % 2, 0.8) for i in range(n_positive)]
        rows += [(sex, "1-4 y", 0, 1 if i < n_false else 0, 0.1) for i in range(n_negative)]
    rows += [("unknown", "1-4 y", 1, 1, 0.8)] * 10 + [("unknown", "1-4 y", 0, 0, 0.1)] * 10
    for i in (27, 28, 29, 57, 58, 59):  # three right pneumonias and three right normals of the girls
        rows[i] = (rows[i][0], "5-17 y", *rows[i][2:])
    sex, age, labels, predicted, score = (np.array(column) for column in zip(*rows))
    n = len(rows)
    probabilities = np.column_stack([1 - score, score / 2, score / 2])
    subgroup_columns = np.column_stack([np.full(n, "AP"), sex, age, np.full(n, UNKNOWN)])
    cases = Cases(
        np.full(n, "site1"),
        np.array([f"i{i}" for i in range(n)]),
        np.array([f"site1/p{i}" for i in range(n)]),
        labels,
        probabilities,
        subgroup_columns,
    )
    tables = subgroups(cases, predicted, n_resamples=200, seed=0)

    by_sex = tables["sex"]
    assert by_sex["recorded"] and list(by_sex["groups"]) == ["F", "M", "unknown"]  # unknown last
    girls = by_sex["groups"]["F"]
    assert (girls["n_images"], girls["n_pneumonia"], girls["n_normal"]) == (60, 30, 30)
    sensitivity = girls["metrics"]["sensitivity"]
    exact = binomtest(27, 30).proportion_ci(method="exact")
    assert (sensitivity["count"], sensitivity["total"]) == (27, 30)
    assert (sensitivity["ci_low"], sensitivity["ci_high"]) == pytest.approx((exact.low, exact.high))
    assert by_sex["warnings"] == [] and not any(g["too_small"] for g in by_sex["groups"].values())
    gaps = by_sex["gaps"]
    assert gaps["sensitivity"]["gap"] == pytest.approx(0.1)
    assert (gaps["sensitivity"]["lowest"]["group"], gaps["sensitivity"]["highest"]["group"]) == ("M", "F")
    assert (gaps["specificity"]["lowest"]["group"], gaps["specificity"]["highest"]["group"]) == ("F", "M")

    by_age = tables["age_band"]
    assert list(by_age["groups"]) == ["1-4 y", "5-17 y"] and by_age["gaps"] == {}  # one group to judge
    older = by_age["groups"]["5-17 y"]
    assert older["too_small"] and not by_age["groups"]["1-4 y"]["too_small"]
    assert by_age["warnings"] == [
        "age band 5-17 y: 3 images with pneumonia and 3 without, fewer than 10 of one kind: too few to judge"
    ]
    older_sensitivity, older_auc = older["metrics"]["sensitivity"], older["metrics"]["roc_auc"]
    assert older_sensitivity["value"] == 1 and round(older_sensitivity["ci_low"], 3) == 0.292
    assert older_auc["value"] == 1 and older_auc["ci_low"] < 0.9 and older_auc["method"] == SCORE
    assert tables["manufacturer"] == {
        "name": "Equipment maker",
        "recorded": False,
        "groups": {},
        "warnings": [],
        "gaps": {},
    }
    for estimate in (e for e in values(tables) if e["ci_low"] is not None):
        assert estimate["ci_high"] - estimate["ci_low"] > 0.01, estimate


@pytest.mark.slow
def test_report_holds_no_image_or_patient_key(report_dir, demo_sites):
    text = (report_dir / "report.json").read_text() + (report_dir / "report.html").read_text()
    for site in demo_sites.sites:
        manifest = SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
        for key in [*manifest["image_key"], *manifest["patient_key"]]:
            assert key not in text


@pytest.mark.slow
def test_external_site_is_scored_on_every_image_at_the_models_threshold(demo_run, external_site, tmp_path):
    """An all-pneumonia site that the evaluation treats as external: every image of every split is
    scored, nothing is chosen on it; sensitivity has its interval, specificity is undefined. With
    no --output-dir, the report goes under outputs/evaluations/ of the working folder, never next
    to the model."""
    cache = external_site.cache(DEMO_IMAGE_SIZE)
    manifest = SiteCache(cache).manifest()
    assert set(manifest["split"]) == {"train", "val", "test"} and (manifest["label"] != NORMAL_INDEX).all()
    reads = tmp_path / "reads.csv"
    reads.write_text("image,reader,label\n" + "".join(f"{k},R9,pneumonia\n" for k in manifest["image_key"]))
    before = sorted(p.name for p in demo_run.iterdir())
    done = run_script(
        "evaluate.py",
        demo_run / "model.pt",
        cache,
        "--external",
        "--reads",
        reads,
        "--bootstrap",
        "200",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in demo_run.iterdir()) == before
    (out,) = (tmp_path / "outputs" / "evaluations").iterdir()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["mode"] == "external" and report["split"] == "all"
    assert report["model"]["n_images"] == len(manifest)
    assert report["threshold"]["source"] == "the model"
    pneumonia = report["model"]["metrics"][PNEUMONIA_TASK]
    assert pneumonia["sensitivity"]["total"] == len(manifest)
    assert pneumonia["sensitivity"]["ci_low"] < pneumonia["sensitivity"]["ci_high"]
    assert pneumonia["specificity"]["value"] is None and pneumonia["roc_auc"]["value"] is None
    page = (out / "report" / "report.html").read_text()
    assert "External validation" in page and "external site</span>" in page
    assert "simulated-reads-banner" not in page  # these reads do not say they are simulated
    assert done.stdout.startswith("all (external): accuracy=")


def test_evaluate_takes_every_split_and_external_sites_whole(capsys):
    """scripts/evaluate.py's options: --split test (default), val, train or all; --external
    scores all splits and takes no other; --threshold is a probability, given alone."""
    from scripts.evaluate import parse_args

    fixed = ["model.pt", "cache"]
    assert parse_args(fixed).split == "test" and parse_args([*fixed, "--external"]).split == "all"
    for split in ("train", "val", "test", "all"):
        assert parse_args([*fixed, "--split", split]).split == split
    assert parse_args([*fixed, "--threshold", "0.9"]).threshold == 0.9
    for wrong, message in (
        (["--external", "--split", "test"], "--external scores every image"),
        (["--threshold", "1.5"], "1.5 is not in (0, 1]"),
        (["--threshold", "0.9", "--target-sensitivity", "0.95"], "give one"),
        (["--split", "holdout"], "invalid choice: 'holdout'"),
    ):
        with pytest.raises(SystemExit):
            parse_args([*fixed, *wrong])
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_threshold_override_and_models_without_one(demo_run, demo_sites, external_site, tmp_path):
    caches = cache_dirs(demo_sites)
    override, _ = build_report(
        demo_run / "model.pt", caches, options=ReportOptions(threshold=0.9, n_resamples=50)
    )
    assert override["threshold"]["value"] == 0.9 and override["threshold"]["source"] == "--threshold"
    target, _ = build_report(
        demo_run / "model.pt", caches, options=ReportOptions(target_sensitivity=0.95, n_resamples=50)
    )
    assert target["threshold"]["sensitivity"] >= 0.95 and target["threshold"]["method"] == "sensitivity"
    flagged, _ = build_report(
        demo_run / "model.pt",
        caches,
        SAMPLE_READS,
        options=ReportOptions(simulated_reads=True, n_resamples=50),
    )
    assert flagged["reads"]["declared_by"] == "--simulated-reads"

    state, info = load_checkpoint(demo_run / "model.pt")
    bare = tmp_path / "model.pt"  # as a model trained outside a federation: no stored threshold
    save_checkpoint(
        bare, state, OmegaConf.create({"model": info["config"], "data": {"image_size": DEMO_IMAGE_SIZE}})
    )
    external = ReportOptions(split="all", external=True, n_resamples=50)
    with pytest.raises(ValueError, match="stores no operating threshold .*pass --threshold"):
        build_report(bare, [external_site.cache(DEMO_IMAGE_SIZE)], options=external)
    internal, _ = build_report(bare, caches, options=ReportOptions(n_resamples=50))
    assert internal["threshold"]["source"] == "the evaluated sites' validation images"
    for split in ("train", "val", "all"):
        scored, _ = build_report(
            demo_run / "model.pt", caches, options=ReportOptions(split=split, n_resamples=50)
        )
        splits = ("train", "val", "test") if split == "all" else (split,)
        expected = sum(SiteCache(c).manifest()["split"].isin(splits).sum() for c in caches)
        assert scored["model"]["n_images"] == expected


@pytest.fixture(scope="module")
def released(demo_run, demo_sites, tmp_path_factory) -> Path:
    """The audit's first example on the demo model (no DP-SGD), images left out, then its release
    with its model card."""
    out = tmp_path_factory.mktemp("release")
    data = (f"data.sites_root={demo_sites.root}", f"data.image_size={DEMO_IMAGE_SIZE}")
    audit = run_script(
        "audit_privacy.py",
        f"audit.checkpoint={demo_run / 'model.pt'}",
        f"audit.output_dir={out / 'audit'}",
        "audit.membership.shadow_models=0",
        "audit.inversion.iterations=20",
        "audit.include_images=false",
        *data,
    )
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    cfg = compose_config(
        *data,
        f"audit.release.folder={out / 'released'}",
        "audit.release.max_membership_auc=1",
        "audit.release.max_tpr_at_1pct_fpr=1",
        "audit.release.max_reconstruction_ssim=1",
    )
    policy = ReleasePolicy.from_config(cfg.audit.release)  # what scripts/release_model.py runs
    release_model(demo_run / "model.pt", out / "audit" / "audit.json", policy, out / "released")
    write_release_card(demo_run / "model.pt", out / "audit" / "audit.json", policy, cfg)
    return out


@pytest.mark.slow
@pytest.mark.audit
def test_audit_names_the_model_and_can_leave_out_the_images(released, demo_run):
    audit = json.loads((released / "audit" / "audit.json").read_text())
    (model,) = audit["models"]
    assert model["name"] == "SmallCNN at 64 px, round 1" and model["round"] == 1
    assert (
        set(audit["inversion"]["results"]) == {"none"}
        and "no audited model was trained with DP-SGD" in audit["inversion"]["dp_note"]
    )
    assert not (released / "audit" / "inversion.png").exists() and audit["figures"] == [
        "membership_roc.png",
        "membership_scores.png",
    ]
    page = (released / "audit" / "audit.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and 'id="images-left-out"' in page
    note = page[page.index('id="reconstruction-note"') :]
    assert "<b>not</b> measured on the audited network" in note and "SmallCNN at 32 px" in note


@pytest.mark.slow
@pytest.mark.audit
def test_model_card_of_the_released_model(released, demo_run, demo_sites):
    card = json.loads((released / "released" / "model_card.json").read_text())
    assert card["provenance"]["sha256"] == file_sha256(released / "released" / "model.pt")
    assert card["statement"]["intended_use"].startswith("Research use only") and card["demonstration"]
    for site in demo_sites.sites:
        manifest = SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
        train = manifest[manifest["split"] == "train"]
        assert card["training_data"][site.name]["train"]["n_images"] == len(train)
        assert card["training_data"][site.name]["train"]["per_class"]["viral"] == int(
            (train["label"] == 2).sum()
        )
    assert card["privacy"] == {"secure_aggregation": False, "dp_sgd": False, "epsilon_per_site": {}}
    audit = json.loads((released / "audit" / "audit.json").read_text())
    assert card["audit"]["release_metrics"] == audit["models"][0]["release_metrics"]
    assert (
        card["audit"]["violations"] == [] and card["audit"]["policy"]["max_membership_auc"] == 1
    )  # as released
    performance = card["clinical_performance"]
    assert (
        performance["split"] == "test"
        and performance["sensitivity"]["ci_low"] < performance["sensitivity"]["ci_high"]
    )
    assert performance["threshold_explanation"].startswith(f"{performance['threshold']:.3f} is the threshold")
    assert any(line.startswith("A demonstration model") for line in card["limitations"])
    assert any(line.startswith("Tested on") for line in card["limitations"])
    page = (released / "released" / "model_card.html").read_text()
    for section in ("intended-use", "training-data", "privacy", "audit-table", "performance", "limitations"):
        assert f'id="{section}"' in page
    assert escape(performance["threshold_explanation"]) in page
    assert "DP-SGD</dt><dd>off: no formal guarantee" in page
    private = card | {
        "privacy": {
            "secure_aggregation": True,
            "dp_sgd": True,
            "epsilon_per_site": {
                "site1": {"epsilon": 1.7, "delta": 1e-5},
                "site2": {"epsilon": 1.3, "delta": 1e-5},
            },
        }
    }
    page = render_card(private, {})
    assert "SecAgg+: the coordinator saw only the sum" in page
    assert "site1 ε = 1.70 at δ = 1e-05; site2 ε = 1.30 at δ = 1e-05" in page


def test_privacy_of_a_dp_run_names_each_sites_epsilon_and_delta(tmp_path):
    """A run with SecAgg+ and DP-SGD: the model card's privacy entry gives each site's epsilon
    as last recorded (spent over every round it trained, a site that missed the model's round
    included) at its delta, and the training images of the model's round."""
    experiment = {
        "data": {"sites": ["site1", "site2"]},
        "federation": {"secure_aggregation": True},
        "privacy": {"enabled": True},
    }
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "abc", "experiment": experiment}))
    rounds = [
        {"site1": (40, 1.1), "site2": (50, 1.3)},
        {"site1": (40, 1.7)},  # site2 did not train in round 2
    ]
    RunLayout(tmp_path).rounds.write_text(
        "".join(
            json.dumps(
                {
                    "round": number,
                    "train_per_site": {
                        site: {NUM_EXAMPLES: n, "epsilon": epsilon, "delta": 1e-5}
                        for site, (n, epsilon) in sites.items()
                    },
                }
            )
            + "\n"
            for number, sites in enumerate(rounds, start=1)
        )
    )
    record = training_record(tmp_path / "model.pt", model_round=2)
    assert record is not None
    assert (record["run_id"], record["rounds"], record["training_images"]) == ("abc", 2, {"site1": 40})
    assert record["privacy"] == {
        "secure_aggregation": True,
        "dp_sgd": True,
        "epsilon_per_site": {
            "site1": {"epsilon": 1.7, "delta": 1e-5},
            "site2": {"epsilon": 1.3, "delta": 1e-5},
        },
    }
    assert training_record(tmp_path / "elsewhere" / "model.pt", model_round=2) is None


@pytest.mark.slow
def test_pages_fit_1024_px_and_print_without_cut_columns(report_dir, released, chromium, tmp_path):
    pages = {
        "report": report_dir / "report.html",
        "audit": released / "audit" / "audit.html",
        "model_card": released / "released" / "model_card.html",
    }
    shots = []
    with Browser(chromium, tmp_path / "profile") as browser:
        for name, page in pages.items():
            for width, media in ((1024, "screen"), (1280, "screen"), (A4_PRINT_WIDTH, "print")):
                browser.open(page.as_uri(), width, media)
                assert browser.evaluate(LAYOUT_PROBLEMS) == [], (name, width, media)
                if media == "screen":
                    shots.append(browser.screenshot(tmp_path / f"{name}_{width}.png"))
            pdf = browser.pdf(tmp_path / f"{name}.pdf").read_bytes()
            assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page[^s]", pdf)) >= 1
        browser.open(pages["report"].as_uri(), 1024)
        tables = browser.evaluate("[...document.querySelectorAll('table')].map(t => t.id)")
        assert set(TABLES) <= set(tables) and "subgroup-site" in tables
        assert browser.evaluate("[...document.images].map(i => i.naturalWidth > 300)") == [True] * 3
    print("screenshots:", *shots, sep="\n  ")


def test_bad_reads_file_stops_with_the_listed_problems(demo_sites, tmp_path):
    cfg = compose_config("model=small_cnn", f"data.image_size={DEMO_IMAGE_SIZE}")
    save_checkpoint(tmp_path / "model.pt", build_classifier(cfg, seed=0).net, cfg)
    bad = tmp_path / "reads.csv"
    bad.write_text(
        "site,image,reader,label\nsite1,img_0001.dcm,R1,consolidation\nsite9,img_0001.dcm,R1,normal\n"
    )
    done = run_script(
        "evaluate.py",
        tmp_path / "model.pt",
        *cache_dirs(demo_sites),
        "--reads",
        bad,
        "--output-dir",
        tmp_path / "out",
    )
    assert done.returncode != 0
    assert "2 problem(s) in the reads file" in done.stderr
    assert "line 2: unknown label 'consolidation'" in done.stderr
    assert "line 3: unknown site 'site9' (evaluated sites: site1, site2, site3)" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_is_scored_by_its_stored_threshold_or_by_the_most_probable_class(
    demo_run, demo_sites, tmp_path
):
    from pipeline.evaluation.scoring import evaluate_checkpoint

    caches = cache_dirs(demo_sites)
    stored = evaluate_checkpoint(demo_run / "model.pt", caches, tmp_path / "stored")
    plain = evaluate_checkpoint(demo_run / "model.pt", caches, tmp_path / "plain", stored_rule=False)
    assert stored["decision_rule"] != plain["decision_rule"]
    assert stored["pneumonia_auroc"] == plain["pneumonia_auroc"]  # the ranking does not depend on the rule
