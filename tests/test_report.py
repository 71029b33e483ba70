"""The clinicians' report end to end: the demo's model against the simulated sample reads,
rendered in a real headless browser."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.contracts.cache import SiteCache
from pipeline.evaluation.clinical.analysis import PNEUMONIA_TASK
from pipeline.training.checkpoints import save_checkpoint
from pipeline.training.loop import build_classifier
from scripts.simulate_reads import SAMPLE_READS, simulate_reads
from tests.conftest import DEMO_IMAGE_SIZE, compose_config

pytestmark = pytest.mark.report

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
FIGURES = ("confusion_matrices.png", "roc.png", "calibration.png")
TABLES = ("model-metrics", "reader-metrics", "comparison-table", "agreement-table", "site-table")


def evaluate(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "scripts/evaluate.py", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def cache_dirs(demo_sites) -> list[Path]:
    return [site.cache(DEMO_IMAGE_SIZE) for site in demo_sites.sites]


@pytest.fixture(scope="module")
def report_dir(demo_run, demo_sites, tmp_path_factory) -> Path:
    """scripts/evaluate.py on the demo's federated model with the sample reads."""
    out = tmp_path_factory.mktemp("clinical")
    done = evaluate(
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


def test_sample_reads_are_the_documented_simulation():
    committed = pd.read_csv(SAMPLE_READS)
    pd.testing.assert_frame_equal(committed, simulate_reads(seed=0), check_dtype=False)
    assert set(committed["reader"]) == {"R1", "R2", "R3"}
    assert committed.groupby("reader").size().nunique() == 1  # every reader reads every image


@pytest.mark.slow
def test_report_numbers_of_the_demo_model(report_dir, demo_sites):
    report = json.loads((report_dir / "report.json").read_text())
    metrics = json.loads((report_dir.parent / "metrics.json").read_text())
    model = report["model"]
    assert model["n_images"] == metrics["n_images"] and model["n_patients"] == metrics["n_patients"]
    assert model["metrics"][PNEUMONIA_TASK]["roc_auc"]["value"] == pytest.approx(metrics["pneumonia_auroc"])
    assert np.array(model["confusion_matrix"]).sum() == model["n_images"]
    assert sum(s["n_images"] for s in report["sites"].values()) == model["n_images"]
    assert set(report["sites"]) == {"site1", "site2", "site3"}
    assert report["threshold"]["chosen_on"] == "val" and report["threshold"]["method"] == "youden"
    assert set(report["readers"]) == set(report["comparisons"]) == {"R1", "R2", "R3"}
    assert report["readers"]["R3"]["labels"] == ["normal", "pneumonia"]
    assert len(report["agreement"]) == 3
    for reader in report["readers"].values():
        assert reader["n_images"] == model["n_images"]
        sensitivity = reader["metrics"][PNEUMONIA_TASK]["sensitivity"]
        assert sensitivity["ci_low"] <= sensitivity["value"] <= sensitivity["ci_high"]
    assert report["reads"]["warnings"] == [
        f"{3 * (216 - model['n_images'])} read(s) of images outside the test split ignored"
    ]
    for name in FIGURES:
        assert (report_dir / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_report_holds_no_image_or_patient_key(report_dir, demo_sites):
    text = (report_dir / "report.json").read_text() + (report_dir / "report.html").read_text()
    for site in demo_sites.sites:
        manifest = SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
        for key in [*manifest["image_key"], *manifest["patient_key"]]:
            assert key not in text


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(report_dir, chromium, tmp_path):
    page = (report_dir / "report.html").as_uri()
    browser = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', dom.stdout)
    assert [alt for alt, _ in images] == ["Confusion matrices", "ROC curve", "Calibration curve"]
    for _, data in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 300
    for table in TABLES:
        assert f'<table id="{table}">' in dom.stdout
    assert "Operating threshold" in dom.stdout and "Youden" in dom.stdout
    assert "http" not in dom.stdout.split("<body>")[0]  # nothing fetched: opens offline
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [*browser, "--window-size=1200,4000", f"--screenshot={shot}", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and Image.open(shot).size == (1200, 4000)


def test_bad_reads_file_stops_with_the_listed_problems(demo_sites, tmp_path):
    cfg = compose_config("model=small_cnn", f"data.image_size={DEMO_IMAGE_SIZE}")
    save_checkpoint(tmp_path / "model.pt", build_classifier(cfg, seed=0).net, cfg)
    bad = tmp_path / "reads.csv"
    bad.write_text(
        "site,image,reader,label\nsite1,img_0001.dcm,R1,consolidation\nsite9,img_0001.dcm,R1,normal\n"
    )
    done = evaluate(
        tmp_path / "model.pt", *cache_dirs(demo_sites), "--reads", bad, "--output-dir", tmp_path / "out"
    )
    assert done.returncode != 0
    assert "2 problem(s) in the reads file" in done.stderr
    assert "line 2: unknown label 'consolidation'" in done.stderr
    assert "line 3: unknown site 'site9' (evaluated sites: site1, site2, site3)" in done.stderr
    assert not (tmp_path / "out").exists()
