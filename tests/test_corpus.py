"""Bad-input corpus: one test per case, each built from the real files in ``data/dicom``.

Every case puts one bad entry into a small site of valid radiographs (three demo CR/DX
files, the JPEG baseline SIIM chest and the JPEG 2000 MONOCHROME1 chest) and checks that
the bad entry's report row gives a clear reason, that every valid file is still accepted,
and that no source file changed. Run them with ``pytest -m corpus``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.demo_sites import prepare_demo_sites
from pipeline.preprocess import preprocess_site
from pipeline.sites import SitePaths
from tests.conftest import DICOM_DIR, compose_config

pytestmark = pytest.mark.corpus

SIIM_CHEST = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
J2K_CHEST = "RG1_J2KI.dcm"
Writer = Callable[[Path], None]


def source_state(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: sha256 of regular files, the kind of anything else."""
    state = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink() and not path.exists():
            state[name] = f"link -> {os.readlink(path)}"
        elif path.is_file():
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif not path.is_dir():
            state[name] = f"special {os.stat(path).st_mode:o}"
    return state


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def edited(source: Path, edit: Callable[[Dataset], object]) -> Writer:
    """A writer of the real file ``source`` with ``edit`` applied to its dataset."""

    def write(path: Path) -> None:
        ds = pydicom.dcmread(source)
        edit(ds)
        path.write_bytes(dicom_bytes(ds))

    return write


def raw(data: bytes) -> Writer:
    return lambda path: path.write_bytes(data)


@pytest.fixture
def site(tmp_path) -> SitePaths:
    """Three demo radiographs plus the two real chest files, all labelled."""
    site = prepare_demo_sites(tmp_path / "sites", n_sites=1, max_images=3)[0]
    for name in (SIIM_CHEST, J2K_CHEST):
        shutil.copy(DICOM_DIR / name, site.input_dir / name)
    labels = pd.read_csv(site.labels_csv)
    extra = pd.DataFrame({"file": [SIIM_CHEST, J2K_CHEST], "label": ["normal", "viral"]})
    pd.concat([labels, extra]).to_csv(site.labels_csv, index=False)
    return site


def run_case(site: SitePaths, bad: str, write: Writer, *, reason: str, status: str = "rejected",
             label: str | None = "normal", overrides: tuple[str, ...] = ()) -> pd.DataFrame:
    """Add the entry ``bad`` (labelled unless ``label`` is None), preprocess, check, return the report."""
    valid = sorted(pd.read_csv(site.labels_csv)["file"])
    write(site.input_dir / bad)
    if label is not None:
        labels = pd.read_csv(site.labels_csv)
        pd.concat([labels, pd.DataFrame({"file": [bad], "label": [label]})]).to_csv(site.labels_csv, index=False)
    before = source_state(site.input_dir)
    cfg = compose_config("data.image_size=32", "preprocess.workers=1", *overrides).preprocess
    preprocess_site(site, cfg)
    assert source_state(site.input_dir) == before, "a source file was modified"
    report = pd.read_csv(site.work_dir / "report.csv", keep_default_na=False).set_index("file")
    assert report.loc[valid, "status"].eq("accepted").all(), report.loc[valid]
    assert report.at[bad, "status"] == status, report.loc[bad]
    assert reason in report.at[bad, "reason"], report.at[bad, "reason"]
    return report


def test_truncated_file(site):
    data = (DICOM_DIR / SIIM_CHEST).read_bytes()
    run_case(site, "truncated.dcm", raw(data[: len(data) // 2]), reason="truncated file")


def test_truncated_uncompressed_pixel_data(site):
    data = (site.input_dir / "img_0001.dcm").read_bytes()
    run_case(site, "short.dcm", raw(data[:-1000]), reason="pixel data not decodable")


def test_non_dicom_file_named_dcm(site):
    run_case(site, "notes.dcm", raw(b"scanner maintenance log, not an image\n" * 20),
             reason="not a DICOM file")


def test_dicomdir(site, tmp_path):
    fileset = FileSet()
    fileset.add(DICOM_DIR / J2K_CHEST)
    fileset.write(tmp_path / "export")
    index = (tmp_path / "export" / "DICOMDIR").read_bytes()
    run_case(site, "DICOMDIR", raw(index), reason="DICOMDIR", status="skipped", label=None)


def test_dicomdir_with_a_dcm_name(site, tmp_path):
    fileset = FileSet()
    fileset.add(DICOM_DIR / J2K_CHEST)
    fileset.write(tmp_path / "export")
    run_case(site, "index.dcm", raw((tmp_path / "export" / "DICOMDIR").read_bytes()), reason="DICOMDIR")


def test_structured_report_without_pixels(site):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientID = "SR-PATIENT"
    ds.ValueType = "CONTAINER"
    run_case(site, "report.dcm", raw(dicom_bytes(ds)), reason="no pixel data (Basic Text SR Storage, Modality SR)")


def test_missing_pixel_data(site):
    run_case(site, "no_pixels.dcm", edited(DICOM_DIR / SIIM_CHEST, lambda ds: delattr(ds, "PixelData")),
             reason="missing PixelData")


def test_rgb_secondary_capture(site):
    def to_rgb(ds: Dataset) -> None:
        gray = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = generate_uid()
        ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
        ds.PixelData = np.repeat(gray[..., None], 3, axis=-1).tobytes()

    run_case(site, "screenshot.dcm", edited(DICOM_DIR / SIIM_CHEST, to_rgb), reason="PhotometricInterpretation 'RGB' not in")


def test_ct_instead_of_radiograph(site):
    run_case(site, "ct.dcm", edited(DICOM_DIR / SIIM_CHEST, lambda ds: setattr(ds, "Modality", "CT")),
             reason="Modality 'CT' not in ['CR', 'DX']")


def test_non_chest_radiograph(site):
    run_case(site, "tibia.dcm", raw((DICOM_DIR / "RG3_J2KR.dcm").read_bytes()),
             reason="BodyPartExamined 'EXTREMITY' not in ['CHEST']")


def stacked_frames(ds: Dataset) -> None:
    frame = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = np.stack([frame, frame[::-1]]).tobytes()


def test_multi_frame_object(site):
    run_case(site, "cine.dcm", edited(site.input_dir / "img_0001.dcm", stacked_frames),
             reason="multi-frame object (2 frames): not a single radiograph")


def test_multi_frame_object_first_frame_policy(site):
    report = run_case(site, "cine.dcm", edited(site.input_dir / "img_0001.dcm", stacked_frames),
                      reason="", status="accepted", overrides=("preprocess.acceptance.multiframe=first_frame",))
    assert report.at["cine.dcm", "reason"] == ""


def test_zero_rows(site):
    run_case(site, "empty.dcm", edited(DICOM_DIR / SIIM_CHEST, lambda ds: setattr(ds, "Rows", 0)),
             reason="empty image (Rows 0, Columns 1024)")


def test_unsupported_transfer_syntax(site):
    def mpeg2(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level

    run_case(site, "video.dcm", edited(DICOM_DIR / SIIM_CHEST, mpeg2),
             reason="unsupported transfer syntax MPEG2 Main Profile / Main Level")


def test_labels_naming_absent_files_and_files_without_label(site):
    def unlabelled_copy_and_a_label_for_nothing(path: Path) -> None:
        shutil.copy(site.input_dir / "img_0002.dcm", path)
        labels = pd.read_csv(site.labels_csv)
        pd.concat([labels, pd.DataFrame({"file": ["gone.dcm"], "label": ["viral"]})]).to_csv(
            site.labels_csv, index=False)

    report = run_case(site, "unlabelled.dcm", unlabelled_copy_and_a_label_for_nothing,
                      reason="no label in labels.csv", label=None)
    assert report.at["gone.dcm", "status"] == "missing"
    assert report.at["gone.dcm", "reason"] == "listed in labels.csv but not found"


def test_duplicate_sop_instance_uid(site):
    # Fake_MONOHR1.dcm is the SIIM file re-exported with another photometric interpretation:
    # different bytes, same SOPInstanceUID.
    reason = f"duplicate SOPInstanceUID: same instance as {SIIM_CHEST}"
    run_case(site, "Fake_MONOHR1.dcm", raw((DICOM_DIR / "Fake_MONOHR1.dcm").read_bytes()), reason=reason)
    rerun = preprocess_site(site, compose_config("data.image_size=32", "preprocess.workers=1").preprocess)
    assert rerun.rejections[reason] == 1  # decided again on the rerun, not remembered


def test_very_large_image_is_rejected_before_decoding(site):
    def huge(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 60000  # 3600 MP; decoding would need gigabytes

    run_case(site, "huge.dcm", edited(DICOM_DIR / SIIM_CHEST, huge),
             reason="image 60000x60000 = 3600.0 MP exceeds max_pixels 50.0 MP (checked before decoding)")


def test_unreadable_entry_broken_symlink(site):
    # Tests run as root, so chmod 000 cannot make a file unreadable; a link to nothing can't be read by anyone.
    run_case(site, "dangling.dcm", lambda path: path.symlink_to(path.parent / "nowhere.dcm"),
             reason="unreadable: broken symbolic link")


def test_unreadable_entry_fifo(site):
    # Opening a FIFO would block forever; it is reported without being opened.
    run_case(site, "pipe.dcm", os.mkfifo, reason="unreadable: not a regular file (FIFO)")


def test_missing_patient_id(site):
    run_case(site, "anonymous.dcm", edited(DICOM_DIR / SIIM_CHEST, lambda ds: delattr(ds, "PatientID")),
             reason="PatientID missing")


def test_missing_view_position(site):
    run_case(site, "no_view.dcm", edited(DICOM_DIR / SIIM_CHEST, lambda ds: delattr(ds, "ViewPosition")),
             reason="ViewPosition missing")


def test_lateral_view(site):
    run_case(site, "lateral.dcm", edited(DICOM_DIR / SIIM_CHEST, lambda ds: setattr(ds, "ViewPosition", "LL")),
             reason="ViewPosition 'LL' not in ['PA', 'AP']")


def test_too_small_image(site):
    def chest(ds: Dataset) -> None:
        ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"

    run_case(site, "tiny.dcm", edited(DICOM_DIR / "pydicom_wheel_CR" / "CR1_6154.dcm", chest),
             reason="image 16x16 smaller than 64x64")
