"""Site preprocessing end to end on demo hospitals built from the embedded sample."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

import pipeline.ingestion.preprocess as preprocess_module
from pipeline.contracts.cache import SPLITS, SiteCache
from pipeline.contracts.files import csv_bytes, neutralise_cell, restore_cell
from pipeline.contracts.labels import LabelsError
from pipeline.contracts.layout import WorkDir, configured_sites
from pipeline.governance.revocation import preprocess_consented
from pipeline.ingestion.splits import assign_splits
from pipeline.support.demo_sites import load_sample, plan_sites, prepare_demo_sites
from tests.conftest import DICOM_DIR, compose_config, DEMO_IMAGE_SIZE

SIIM_CHEST = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MANIFEST_COLUMNS = {
    "image_key",
    "patient_key",
    "label",
    "split",
    "preprocessing_version",
    "image_size",
    "source_rows",
    "source_cols",
    "pixel_spacing_mm",
    "bits_stored",
    "view",
    "sex",
    "age_band",
    "manufacturer",
}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


SMALL_SIZE = 32  # the image size of the small site's tests


def preprocess_config(*overrides: str):
    return compose_config(f"data.image_size={SMALL_SIZE}", "preprocess.workers=1", *overrides).preprocess


@pytest.fixture
def small_site(tmp_path):
    """One demo site of about 24 images, not yet preprocessed."""
    return prepare_demo_sites(tmp_path / "sites", n_sites=3, max_images=24)[0]


# --- the shared demo sites ---------------------------------------------------------------


def test_sites_get_disjoint_patients_and_different_class_mixes():
    sample = load_sample().set_index("file")
    plans = plan_sites(sample.reset_index(), n_sites=3, seed=0, skew=1.0, max_images=None)
    patients = [{sample.at[i.source, "patient_id"] for i in plan} for plan in plans]
    assert all(not (a & b) for i, a in enumerate(patients) for b in patients[i + 1 :])
    assert sum(len(plan) for plan in plans) == len(sample)
    majority = [pd.Series([i.label for i in plan]).value_counts().idxmax() for plan in plans]
    assert majority == ["normal", "bacterial", "viral"]


def test_every_split_nonempty_and_no_patient_in_two_splits(demo_sites):
    for site in demo_sites.sites:
        manifest = SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
        assert set(manifest.columns) == MANIFEST_COLUMNS
        assert set(manifest["split"]) == set(SPLITS)
        assert (manifest.groupby("patient_key")["split"].nunique() == 1).all()
        assert set(manifest["label"]) == {0, 1, 2}
        train = SiteCache(site.cache(DEMO_IMAGE_SIZE)).load_split("train")
        assert train.images.shape[1:] == (1, 64, 64)
        assert 0.0 <= train.images.min() and train.images.max() <= 1.0


def test_no_patient_key_shared_between_sites(demo_sites):
    keys = [set(SiteCache(s.cache(DEMO_IMAGE_SIZE)).manifest()["patient_key"]) for s in demo_sites.sites]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_no_planted_identifier_in_any_cache_file(demo_sites, planted_identifiers):
    assert len(planted_identifiers) > 500
    # Printable runs of every cache file, one per line: a value can only hide inside a run.
    runs = b"\n".join(
        run
        for site in demo_sites.sites
        for path in sorted(site.cache(DEMO_IMAGE_SIZE).rglob("*"))
        if path.is_file()
        for run in re.findall(rb"[ -~]{6,}", path.read_bytes())
    )
    leaked = [value for value in planted_identifiers if value.encode() in runs]
    assert not leaked


def test_source_index_and_report_stay_outside_the_cache(demo_sites):
    site = demo_sites.sites[0]
    assert {p.name for p in site.cache(DEMO_IMAGE_SIZE).iterdir()} == {"manifest.csv", "arrays"}
    report = pd.read_csv(site.work_dir / "report.csv")
    assert len(report) == len(list(site.input_dir.glob("*.dcm")))
    assert set(report["status"]) == {"accepted"}


# --- a small site changed by each test ---------------------------------------------------


def test_rerun_skips_unchanged_files_and_reproduces_the_cache(small_site):
    cfg = preprocess_config()
    sources = tree_hashes(small_site.input_dir)
    first = preprocess_consented(small_site, cfg)
    cache = tree_hashes(small_site.cache(SMALL_SIZE))
    assert first.processed == first.files and first.reused == 0
    second = preprocess_consented(small_site, cfg)
    assert second.processed == 0 and second.reused == second.files
    assert tree_hashes(small_site.cache(SMALL_SIZE)) == cache
    assert tree_hashes(small_site.input_dir) == sources
    assert pd.read_csv(small_site.work_dir / "report.csv")["reused"].all()


def test_interrupted_run_resumes_where_it_stopped(small_site, monkeypatch, capsys):
    cfg = preprocess_config()
    real = preprocess_module.process_file
    done = []

    def interrupted(task, **kwargs):
        if len(done) == 5:
            raise KeyboardInterrupt
        done.append(task[0])
        return real(task, **kwargs)

    monkeypatch.setattr(preprocess_module, "process_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess_consented(small_site, cfg)
    assert "file/s" in capsys.readouterr().err  # the progress bar shows the rate
    journal = small_site.private_dir / "progress.jsonl"
    assert len(journal.read_text().splitlines()) == 5
    monkeypatch.setattr(preprocess_module, "process_file", real)
    resumed = preprocess_consented(small_site, cfg)
    assert resumed.reused == 5 and resumed.processed == resumed.files - 5
    assert not journal.exists()
    fresh = tree_hashes(small_site.cache(SMALL_SIZE))
    shutil.rmtree(small_site.work_dir)
    preprocess_consented(small_site, cfg)
    assert tree_hashes(small_site.cache(SMALL_SIZE)) == fresh


def test_torn_cache_array_is_rebuilt(small_site):
    cfg = preprocess_config()
    preprocess_consented(small_site, cfg)
    manifest = SiteCache(small_site.cache(SMALL_SIZE)).manifest()
    torn = SiteCache(small_site.cache(SMALL_SIZE)).array_path(manifest["image_key"].iloc[0])
    torn.write_bytes(torn.read_bytes()[:50])
    summary = preprocess_consented(small_site, cfg)
    assert summary.processed == 1
    assert np.load(torn).shape == (32, 32)


def test_png_and_nifti_inputs_beside_dicom(small_site):
    import nibabel
    from PIL import Image

    png = sorted((DICOM_DIR.parent / "demo" / "kermany").glob("*.png"))[0]
    shutil.copy(png, small_site.input_dir / "chest.png")
    pixels = np.asarray(Image.open(png).convert("L"), np.int16)
    nibabel.save(
        nibabel.Nifti1Image(pixels[::-1, ::-1].T[:, None, :], np.eye(4)),
        small_site.input_dir / "chest.nii.gz",
    )
    labels = pd.read_csv(small_site.labels_csv)
    extra = pd.DataFrame(
        {
            "file": ["chest.png", "chest.nii.gz"],
            "label": ["normal", "normal"],
            "patient_id": ["png-patient", "nifti-patient"],
        }
    )
    pd.concat([labels, extra]).to_csv(small_site.labels_csv, index=False)
    preprocess_consented(small_site, preprocess_config())
    report = pd.read_csv(small_site.work_dir / "report.csv", keep_default_na=False).set_index("file")
    assert set(report["status"]) == {"accepted"}
    index = pd.read_csv(small_site.private_dir / "source_index.csv", keep_default_na=False).set_index("file")
    arrays = SiteCache(small_site.cache(SMALL_SIZE))
    as_png, as_nifti = (
        np.load(arrays.array_path(index.at[f, "image_key"])) for f in ("chest.png", "chest.nii.gz")
    )
    np.testing.assert_allclose(as_png, as_nifti, atol=1e-5)  # same anatomy, same orientation


def test_fresh_run_with_two_workers_gives_the_same_cache(small_site, tmp_path):
    preprocess_consented(small_site, preprocess_config())
    cache = tree_hashes(small_site.cache(SMALL_SIZE))
    shutil.rmtree(small_site.work_dir)
    summary = preprocess_consented(small_site, preprocess_config("preprocess.workers=2"))
    assert summary.processed == summary.files
    assert tree_hashes(small_site.cache(SMALL_SIZE)) == cache


def test_changed_file_is_reprocessed_and_its_old_array_removed(small_site):
    cfg = preprocess_config()
    preprocess_consented(small_site, cfg)
    before = SiteCache(small_site.cache(SMALL_SIZE)).manifest()
    target = small_site.input_dir / "img_0001.dcm"
    ds = pydicom.dcmread(target)
    pixels = ds.pixel_array.copy()
    pixels[:10] = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(target)
    summary = preprocess_consented(small_site, cfg)
    assert summary.processed == 1 and summary.reused == summary.files - 1
    after = SiteCache(small_site.cache(SMALL_SIZE)).manifest()
    assert len(after) == len(before)
    gone, new = (
        set(before["image_key"]) - set(after["image_key"]),
        set(after["image_key"]) - set(before["image_key"]),
    )
    assert len(gone) == 1 and len(new) == 1
    assert {p.stem for p in (small_site.cache(SMALL_SIZE) / "arrays").glob("*.npy")} == set(after["image_key"])


def test_each_image_size_has_its_own_cache_under_the_same_site(small_site):
    preprocess_consented(small_site, preprocess_config())
    first = tree_hashes(small_site.cache(SMALL_SIZE))
    summary = preprocess_consented(small_site, preprocess_config("data.image_size=40"))
    assert summary.processed == summary.files
    manifest = SiteCache(small_site.cache(40)).manifest()
    assert set(manifest["preprocessing_version"]) == {"v3-40px"}
    array = np.load(SiteCache(small_site.cache(40)).array_path(manifest["image_key"].iloc[0]))
    assert array.shape == (40, 40)
    assert tree_hashes(small_site.cache(SMALL_SIZE)) == first  # the first size's cache is untouched
    assert small_site.work.caches() == [small_site.cache(SMALL_SIZE), small_site.cache(40)]
    # the same patients under the same secret: one pseudonym per patient across sizes
    first_keys = set(SiteCache(small_site.cache(SMALL_SIZE)).manifest()["patient_key"])
    assert set(manifest["patient_key"]) == first_keys


def test_report_lists_every_problem_with_its_reason(small_site):
    shutil.copy(DICOM_DIR / "RG3_J2KR.dcm", small_site.input_dir / "extra_tibia.dcm")
    shutil.copy(DICOM_DIR / SIIM_CHEST, small_site.input_dir / "extra_chest.dcm")
    shutil.copy(DICOM_DIR / SIIM_CHEST, small_site.input_dir / "unlabelled_chest.dcm")
    (small_site.input_dir / "junk.dcm").write_bytes(b"\0garbage" * 100)
    (small_site.input_dir / "notes.txt").write_text("scanner notes")
    labels = pd.read_csv(small_site.labels_csv)
    extra = pd.DataFrame(
        {
            "file": ["extra_tibia.dcm", "extra_chest.dcm", "junk.dcm", "gone.dcm"],
            "label": ["normal", "viral", "normal", "normal"],
        }
    )
    pd.concat([labels, extra]).to_csv(small_site.labels_csv, index=False)

    summary = preprocess_consented(small_site, preprocess_config())
    report = pd.read_csv(small_site.work_dir / "report.csv", keep_default_na=False).set_index("file")
    assert report.at["extra_tibia.dcm", "status"] == "rejected"
    assert "BodyPartExamined 'EXTREMITY'" in report.at["extra_tibia.dcm", "reason"]
    assert report.at["junk.dcm", "reason"].startswith("not a DICOM file")
    assert report.at["unlabelled_chest.dcm", "reason"] == "no label in labels.csv"
    assert report.at["notes.txt", "status"] == "skipped"
    assert report.at["gone.dcm", "status"] == "missing"
    assert report.at["extra_chest.dcm", "status"] == "accepted"
    assert len(report) == len(labels) + 6
    assert summary.status == {"accepted": len(labels) + 1, "rejected": 3, "skipped": 1, "missing": 1}
    assert summary.rejections["no label in labels.csv"] == 1


def test_duplicate_content_is_accepted_once(small_site):
    shutil.copy(small_site.input_dir / "img_0002.dcm", small_site.input_dir / "img_0002_copy.dcm")
    labels = pd.read_csv(small_site.labels_csv)
    row = labels[labels["file"] == "img_0002.dcm"].assign(file="img_0002_copy.dcm")
    pd.concat([labels, row]).to_csv(small_site.labels_csv, index=False)
    preprocess_consented(small_site, preprocess_config())
    report = pd.read_csv(small_site.work_dir / "report.csv", keep_default_na=False).set_index("file")
    assert report.at["img_0002_copy.dcm", "reason"] == "same content as img_0002.dcm"
    assert len(SiteCache(small_site.cache(SMALL_SIZE)).manifest()) == len(labels)
    rerun = preprocess_consented(small_site, preprocess_config())
    assert rerun.processed == 0 and rerun.rejections == {"same content as img_0002.dcm": 1}


def test_prepare_demo_is_idempotent_and_keeps_the_secret(small_site):
    root = small_site.input_dir.parents[1]
    secret = small_site.secret_file.read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in small_site.input_dir.iterdir()}
    prepare_demo_sites(root, n_sites=3, max_images=24)
    assert small_site.secret_file.read_bytes() == secret
    assert {p: p.stat().st_mtime_ns for p in small_site.input_dir.iterdir()} == stamps
    names = sorted(p.name for p in small_site.input_dir.iterdir())
    assert all(re.fullmatch(r"img_\d{4}\.dcm", n) for n in names)


def test_splits_are_by_patient_stratified_and_seeded():
    labels = {f"p{i:03d}": i % 3 for i in range(60)}
    first = assign_splits(labels, 0.15, 0.2, seed=1)
    assert first == assign_splits(dict(reversed(labels.items())), 0.15, 0.2, seed=1)
    assert first != assign_splits(labels, 0.15, 0.2, seed=2)
    for label in range(3):
        counts = pd.Series([first[p] for p, lab in labels.items() if lab == label]).value_counts()
        assert counts.to_dict() == {"train": 13, "test": 4, "val": 3}
    tiny = assign_splits({"a": 0, "b": 0, "c": 1}, 0.15, 0.2, seed=0)
    assert set(tiny.values()) == set(SPLITS)


# --- hostile inputs around the images ----------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"file,label\nimg_0001.dcm,normal\ncaf\xe9.dcm,viral\n", "line 3: byte 0xe9 is not UTF-8"),
        (
            b"file,label\nimg_0001.dcm,normal\nimg_0002.dcm,viral,extra\n",
            "line 3: 3 fields, the header has 2",
        ),
        (b"file,label\nimg_0001.dcm\n", "line 2: 1 fields, the header has 2"),
        (b"name,label\nimg_0001.dcm,normal\n", "line 1: header lacks column(s) file"),
        (
            b"file,label\nimg_0001.dcm,normal\n\nimg_0001.dcm,viral\n",
            "line 4: the file of line 2 is listed again",
        ),
        (b"", "line 1: the file is empty"),
    ],
    ids=["not-utf8", "extra-field", "missing-field", "no-file-column", "duplicate", "empty"],
)
def test_unusable_labels_csv_is_one_clear_error(small_site, content, message):
    small_site.labels_csv.write_bytes(content)
    with pytest.raises(LabelsError) as raised:
        preprocess_consented(small_site, preprocess_config())
    text = str(raised.value)
    assert text.startswith(f"{small_site.labels_csv} {message}"), text
    assert "\n" not in text and "img_0001" not in text  # one line, no source file name


def test_spreadsheet_cells_are_neutralised_and_read_back():
    table = pd.DataFrame(
        {
            "text": ["=1+1", "+A1", "-2.5", "@SUM(A1)", "\tx", "'quoted", "plain"],
            "number": [-1.5, 2.0, -3.0, 0.0, 1.0, 2.0, 3.0],
        }
    )
    lines = csv_bytes(table).decode().splitlines()
    assert [line.rsplit(",", 1)[0] for line in lines[1:]] == [
        "'=1+1",
        "'+A1",
        "-2.5",
        "'@SUM(A1)",
        "'\tx",
        "''quoted",
        "plain",
    ]
    assert [line.rsplit(",", 1)[1] for line in lines[1:3]] == ["-1.5", "2.0"]  # numbers stay numbers
    assert [restore_cell(neutralise_cell(v)) for v in table["text"]] == table["text"].tolist()


def test_logs_name_no_source_file(small_site, caplog):
    secret_name = "Smithers_Waylon_MRN424242.dcm"
    shutil.copy(small_site.input_dir / "img_0002.dcm", small_site.input_dir / secret_name)  # a duplicate
    labels = pd.read_csv(small_site.labels_csv)
    extra = pd.DataFrame({"file": [secret_name, "Burns_Montgomery_MRN1.dcm"], "label": ["normal", "viral"]})
    pd.concat([labels, extra]).to_csv(small_site.labels_csv, index=False)
    with caplog.at_level("INFO", logger="fedrad"):
        summary = preprocess_consented(small_site, preprocess_config())
    logged = caplog.text
    assert "1 files listed in" in logged and "same content as another file (see report.csv)" in logged
    assert "Smithers" not in logged and "Burns" not in logged and "MRN" not in logged
    assert summary.rejections == {f"same content as {secret_name}": 1}  # the site-side summary keeps names
    report = pd.read_csv(small_site.work_dir / "report.csv", keep_default_na=False).set_index("file")
    assert report.at["Burns_Montgomery_MRN1.dcm", "status"] == "missing"


def test_logs_quote_no_header_value(small_site, caplog):
    """A hostile header can hold any text, a patient's name included: logs never quote it."""
    path = small_site.input_dir / "img_0002.dcm"
    ds = pydicom.dcmread(path)
    ds.BodyPartExamined = "SMITHERS_WAYLON"
    ds.save_as(path)
    with caplog.at_level("INFO", logger="fedrad"):
        preprocess_consented(small_site, preprocess_config())
    assert "SMITHERS" not in caplog.text and "BodyPartExamined <value> not in" in caplog.text
    report = pd.read_csv(small_site.work_dir / "report.csv", keep_default_na=False).set_index("file")
    assert "SMITHERS_WAYLON" in report.at["img_0002.dcm", "reason"]  # the site-only report keeps it


def crash_on_marked_file(task, **kwargs):
    """process_file, except that the worker process dies on ``crash.dcm``."""
    if task[0] == "crash.dcm":
        os._exit(1)
    return REAL_PROCESS_FILE(task, **kwargs)


REAL_PROCESS_FILE = preprocess_module.process_file


def test_a_dying_worker_rejects_its_file_and_the_site_goes_on(small_site, monkeypatch):
    shutil.copy(small_site.input_dir / "img_0003.dcm", small_site.input_dir / "crash.dcm")
    labels = pd.read_csv(small_site.labels_csv)
    pd.concat([labels, pd.DataFrame({"file": ["crash.dcm"], "label": ["normal"]})]).to_csv(
        small_site.labels_csv, index=False
    )
    monkeypatch.setattr(preprocess_module, "process_file", crash_on_marked_file)
    summary = preprocess_consented(small_site, preprocess_config("preprocess.workers=2"))
    report = pd.read_csv(small_site.work_dir / "report.csv", keep_default_na=False).set_index("file")
    assert report.at["crash.dcm", "reason"].startswith("the worker process died while processing this file")
    assert summary.status == {"accepted": len(labels), "rejected": 1}


def test_any_error_while_processing_rejects_only_that_file(small_site, monkeypatch):
    real = preprocess_module.dicom_to_unit_square

    def failing(pixels, dataset, size):
        if dataset is not None and dataset.SOPInstanceUID == target:
            raise MemoryError("no room")
        return real(pixels, dataset, size)

    target = pydicom.dcmread(small_site.input_dir / "img_0004.dcm").SOPInstanceUID
    monkeypatch.setattr(preprocess_module, "dicom_to_unit_square", failing)
    summary = preprocess_consented(small_site, preprocess_config())
    report = pd.read_csv(small_site.work_dir / "report.csv", keep_default_na=False).set_index("file")
    assert report.at["img_0004.dcm", "reason"] == "processing failed (MemoryError: no room)"
    assert summary.status == {"accepted": len(report) - 1, "rejected": 1}


def test_the_sites_input_folder_is_the_configured_one(small_site):
    """data.input_subdir: a site's images need not sit in a dicom/ folder."""
    scans = small_site.input_dir.parent / "scans"
    small_site.input_dir.rename(scans)
    cfg = compose_config(
        f"data.sites_root={scans.parent.parent}",
        f"data.sites=[{small_site.name}]",
        "data.input_subdir=scans",
        f"data.image_size={SMALL_SIZE}",
        "preprocess.workers=1",
    )
    [site] = configured_sites(cfg)
    assert site.input_dir == scans and site.work_dir == small_site.work_dir
    summary = preprocess_consented(site, cfg.preprocess)
    assert summary.files > 0 and summary.processed == summary.files


def test_a_whole_site_can_be_one_split_and_val_can_be_empty():
    labels = {f"patient{i}": i % 3 for i in range(30)}
    assert set(assign_splits(labels, 0.0, 1.0, seed=0).values()) == {"test"}  # an external site
    without_val = assign_splits(labels, 0.0, 0.2, seed=0)
    assert "val" not in without_val.values() and "test" in without_val.values()
    with pytest.raises(ValueError, match="sum of at most 1"):
        assign_splits(labels, 0.5, 0.6, seed=0)


def test_a_work_folder_anywhere_carries_the_site_files_name(small_site, tmp_path):
    """A hospital's work folder need not sit in a folder named after the site: the name its
    site file gives is recorded at preprocessing and used in its lines and replies."""
    site = dataclasses.replace(small_site, name="hospital_a", work_dir=tmp_path / "var" / "fedrad")
    preprocess_consented(site, preprocess_config())
    assert WorkDir(site.work_dir).site_name == "hospital_a"
    assert WorkDir.of_cache(site.cache(SMALL_SIZE)).site_name == "hospital_a"
