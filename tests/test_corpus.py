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
import resource
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import uid
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.files import read_csv
from pipeline.contracts.layout import SitePaths
from pipeline.governance.revocation import preprocess_consented
from pipeline.support.demo_sites import prepare_demo_sites
from tests.conftest import DICOM_DIR, compose_config, DEMO_IMAGE_SIZE

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


def run_case(
    site: SitePaths,
    bad: str,
    write: Writer,
    *,
    reason: str,
    status: str = "rejected",
    label: str | None = "normal",
    overrides: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Add the entry ``bad`` (labelled unless ``label`` is None), preprocess, check, return the report."""
    valid = sorted(pd.read_csv(site.labels_csv)["file"])
    write(site.input_dir / bad)
    if label is not None:
        labels = pd.read_csv(site.labels_csv)
        pd.concat([labels, pd.DataFrame({"file": [bad], "label": [label]})]).to_csv(
            site.labels_csv, index=False
        )
    before = source_state(site.input_dir)
    cfg = compose_config("data.image_size=32", "preprocess.workers=1", *overrides).preprocess
    preprocess_consented(site, cfg)
    assert source_state(site.input_dir) == before, "a source file was modified"
    report = read_csv(site.work_dir / "report.csv", keep_default_na=False).set_index("file")
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
    run_case(
        site, "notes.dcm", raw(b"scanner maintenance log, not an image\n" * 20), reason="not a DICOM file"
    )


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
    run_case(
        site, "report.dcm", raw(dicom_bytes(ds)), reason="no pixel data (Basic Text SR Storage, Modality SR)"
    )


def test_missing_pixel_data(site):
    run_case(
        site,
        "no_pixels.dcm",
        edited(DICOM_DIR / SIIM_CHEST, lambda ds: delattr(ds, "PixelData")),
        reason="missing PixelData",
    )


def test_rgb_secondary_capture(site):
    def to_rgb(ds: Dataset) -> None:
        gray = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = generate_uid()
        ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
        ds.PixelData = np.repeat(gray[..., None], 3, axis=-1).tobytes()

    run_case(
        site,
        "screenshot.dcm",
        edited(DICOM_DIR / SIIM_CHEST, to_rgb),
        reason="PhotometricInterpretation 'RGB' not in",
    )


def test_ct_instead_of_radiograph(site):
    run_case(
        site,
        "ct.dcm",
        edited(DICOM_DIR / SIIM_CHEST, lambda ds: setattr(ds, "Modality", "CT")),
        reason="Modality 'CT' not in ['CR', 'DX']",
    )


def test_non_chest_radiograph(site):
    run_case(
        site,
        "tibia.dcm",
        raw((DICOM_DIR / "RG3_J2KR.dcm").read_bytes()),
        reason="BodyPartExamined 'EXTREMITY' not in ['CHEST']",
    )


def stacked_frames(ds: Dataset) -> None:
    frame = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = np.stack([frame, frame[::-1]]).tobytes()


def test_multi_frame_object(site):
    run_case(
        site,
        "cine.dcm",
        edited(site.input_dir / "img_0001.dcm", stacked_frames),
        reason="multi-frame object (2 frames): not a single radiograph",
    )


def test_multi_frame_object_first_frame_policy(site):
    report = run_case(
        site,
        "cine.dcm",
        edited(site.input_dir / "img_0001.dcm", stacked_frames),
        reason="",
        status="accepted",
        overrides=("preprocess.acceptance.multiframe=first_frame",),
    )
    assert report.at["cine.dcm", "reason"] == ""


def test_zero_rows(site):
    run_case(
        site,
        "empty.dcm",
        edited(DICOM_DIR / SIIM_CHEST, lambda ds: setattr(ds, "Rows", 0)),
        reason="empty image (Rows 0, Columns 1024)",
    )


def test_unsupported_transfer_syntax(site):
    def mpeg2(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level

    run_case(
        site,
        "video.dcm",
        edited(DICOM_DIR / SIIM_CHEST, mpeg2),
        reason="unsupported transfer syntax MPEG2 Main Profile / Main Level",
    )


def test_labels_naming_absent_files_and_files_without_label(site):
    def unlabelled_copy_and_a_label_for_nothing(path: Path) -> None:
        shutil.copy(site.input_dir / "img_0002.dcm", path)
        labels = pd.read_csv(site.labels_csv)
        pd.concat([labels, pd.DataFrame({"file": ["gone.dcm"], "label": ["viral"]})]).to_csv(
            site.labels_csv, index=False
        )

    report = run_case(
        site,
        "unlabelled.dcm",
        unlabelled_copy_and_a_label_for_nothing,
        reason="no label in labels.csv",
        label=None,
    )
    assert report.at["gone.dcm", "status"] == "missing"
    assert report.at["gone.dcm", "reason"] == "listed in labels.csv but not found"


def test_duplicate_sop_instance_uid(site):
    # Fake_MONOHR1.dcm is the SIIM file re-exported with another photometric interpretation:
    # different bytes, same SOPInstanceUID.
    reason = f"duplicate SOPInstanceUID: same instance as {SIIM_CHEST}"
    run_case(site, "Fake_MONOHR1.dcm", raw((DICOM_DIR / "Fake_MONOHR1.dcm").read_bytes()), reason=reason)
    rerun = preprocess_consented(
        site, compose_config("data.image_size=32", "preprocess.workers=1").preprocess
    )
    assert rerun.rejections[reason] == 1  # decided again on the rerun, not remembered


def test_very_large_image_is_rejected_before_decoding(site):
    def huge(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 60000  # 3600 MP; decoding would need gigabytes

    run_case(
        site,
        "huge.dcm",
        edited(DICOM_DIR / SIIM_CHEST, huge),
        reason="image 60000x60000 = 3600.0 MP exceeds max_pixels 50.0 MP (checked before decoding)",
    )


def test_unreadable_entry_broken_symlink(site):
    # Tests run as root, so chmod 000 cannot make a file unreadable; a link to nothing can't be read by anyone.
    run_case(
        site,
        "dangling.dcm",
        lambda path: path.symlink_to(path.parent / "nowhere.dcm"),
        reason="unreadable: broken symbolic link",
    )


def test_unreadable_entry_fifo(site):
    # Opening a FIFO would block forever; it is reported without being opened.
    run_case(site, "pipe.dcm", os.mkfifo, reason="unreadable: not a regular file (FIFO)")


def test_missing_patient_id(site):
    run_case(
        site,
        "anonymous.dcm",
        edited(DICOM_DIR / SIIM_CHEST, lambda ds: delattr(ds, "PatientID")),
        reason="PatientID missing",
    )


def test_missing_view_position(site):
    run_case(
        site,
        "no_view.dcm",
        edited(DICOM_DIR / SIIM_CHEST, lambda ds: delattr(ds, "ViewPosition")),
        reason="ViewPosition missing",
    )


def test_lateral_view(site):
    run_case(
        site,
        "lateral.dcm",
        edited(DICOM_DIR / SIIM_CHEST, lambda ds: setattr(ds, "ViewPosition", "LL")),
        reason="ViewPosition 'LL' not in ['PA', 'AP']",
    )


def test_too_small_image(site):
    def chest(ds: Dataset) -> None:
        ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"

    run_case(
        site,
        "tiny.dcm",
        edited(DICOM_DIR / "pydicom_wheel_CR" / "CR1_6154.dcm", chest),
        reason="image 16x16 smaller than 64x64",
    )


# --- hostile header values: a rejection naming the tag, never a traceback -----------------


def raw_value(keyword: str, text: str) -> Callable[[Dataset], None]:
    """An edit that stores ``text`` verbatim as ``keyword`` (pydicom would refuse to encode it)."""

    def edit(ds: Dataset) -> None:
        value = text.encode() + b" " * (len(text) % 2)
        tag = Tag(tag_for_keyword(keyword))
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)

    return edit


def windowed(center: object, width: object) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.SOPInstanceUID = generate_uid()

    return edit


def test_number_of_frames_not_an_integer(site):
    run_case(
        site,
        "frames.dcm",
        edited(DICOM_DIR / SIIM_CHEST, raw_value("NumberOfFrames", "x1")),
        reason="NumberOfFrames 'x1' is not an integer",
    )


def test_rescale_slope_not_a_number(site):
    run_case(
        site,
        "slope.dcm",
        edited(DICOM_DIR / SIIM_CHEST, raw_value("RescaleSlope", "abc")),
        reason="RescaleSlope 'abc' is not a number",
    )


def test_rescale_intercept_not_finite(site):
    run_case(
        site,
        "intercept.dcm",
        edited(DICOM_DIR / SIIM_CHEST, raw_value("RescaleIntercept", "1e400")),
        reason="RescaleIntercept '1e400' is not a finite number",
    )


def test_rescale_slope_zero(site):
    run_case(
        site,
        "flat.dcm",
        edited(DICOM_DIR / SIIM_CHEST, lambda ds: setattr(ds, "RescaleSlope", 0)),
        reason="RescaleSlope 0 maps every pixel to one value",
    )


def test_window_width_zero(site):
    run_case(
        site,
        "window0.dcm",
        edited(DICOM_DIR / SIIM_CHEST, windowed(128, 0)),
        reason="WindowWidth 0: a LINEAR window needs at least 1",
    )


def test_window_center_not_finite(site):
    run_case(
        site,
        "window_nan.dcm",
        edited(DICOM_DIR / SIIM_CHEST, raw_value("WindowCenter", "NaN")),
        reason="WindowCenter 'NaN' is not a finite number",
    )


def test_rescale_overflowing_float_is_rejected(site):
    def huge_slope(ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = 1e300, 0  # finite, but 255e300 is not a float32

    run_case(
        site,
        "overflow.dcm",
        edited(DICOM_DIR / SIIM_CHEST, huge_slope),
        reason="pixel values not finite after the Modality / VOI LUT",
    )


def test_malformed_voi_lut_sequence(site):
    def short_lut(ds: Dataset) -> None:
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]  # 4096 entries announced, 4 present
        item.LUTData = np.array([0, 10, 20, 30], "<u2").tobytes()
        ds.VOILUTSequence = [item]

    run_case(
        site, "lut.dcm", edited(DICOM_DIR / SIIM_CHEST, short_lut), reason="VOI LUT / window not applicable"
    )


def test_absurd_window_falls_back_to_the_image_range(site):
    """WindowCenter 1e99 maps every pixel to one value: the image's own range is used instead."""
    report = run_case(
        site,
        "window1e99.dcm",
        edited(DICOM_DIR / SIIM_CHEST, windowed(1e99, 400)),
        reason="",
        status="accepted",
    )
    index = read_csv(site.work.source_index, dtype=str, keep_default_na=False).set_index(
        "file"
    )
    arrays = SiteCache(site.cache(32))
    absurd, plain = (
        np.load(arrays.array_path(index.at[f, "image_key"])) for f in ("window1e99.dcm", SIIM_CHEST)
    )
    assert report.at["window1e99.dcm", "reason"] == ""
    assert absurd.std() > 0.05
    np.testing.assert_allclose(absurd, plain, atol=1e-6)


# --- inconsistent pixel module -------------------------------------------------------------


def bits(allocated: int, stored: int, high: int, representation: int = 0) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, high
        ds.PixelRepresentation = representation

    return edit


@pytest.mark.parametrize(
    "source, edit, reason",
    [
        (SIIM_CHEST, bits(8, 16, 15), "BitsStored 16 exceeds BitsAllocated 8"),
        (SIIM_CHEST, bits(8, 0, 7), "BitsStored 0"),
        (J2K_CHEST, bits(16, 20, 19), "BitsStored 20 exceeds BitsAllocated 16"),
        (SIIM_CHEST, bits(12, 8, 7), "BitsAllocated 12 not in [8, 16, 32]"),
        (SIIM_CHEST, bits(8, 8, 3), "HighBit 3 is not BitsStored - 1 (7)"),
        (SIIM_CHEST, bits(8, 8, 7, representation=2), "PixelRepresentation 2 not in [0, 1]"),
    ],
    ids=[
        "stored-above-allocated",
        "stored-zero",
        "stored-20-of-16",
        "allocated-12",
        "high-bit",
        "representation",
    ],
)
def test_inconsistent_pixel_module(site, source, edit, reason):
    run_case(site, "bits.dcm", edited(DICOM_DIR / source, edit), reason=reason)


def test_native_pixel_data_shorter_than_the_header_says(site):
    def taller(ds: Dataset) -> None:
        ds.Rows = ds.Rows * 2

    run_case(
        site,
        "tall.dcm",
        edited(site.input_dir / "img_0001.dcm", taller),
        reason="pixel data not decodable: PixelData holds",
    )


# --- codestreams that declare another size than the header ---------------------------------


def first_fragment_offset(pixel_data: bytes) -> int:
    """Where the first fragment's codestream starts in encapsulated PixelData."""
    bot_length = struct.unpack_from("<I", pixel_data, 4)[0]
    return 8 + bot_length + 8


def jpeg2000_bomb(path: Path) -> None:
    """A real chest (256x256, JPEG 2000) whose SIZ marker says 20000x20000 (1.6 GB to decode)."""
    ds = pydicom.dcmread(DICOM_DIR / "pydicom_wheel_CR" / "CR1_6154.dcm")
    pixels = pydicom.dcmread(DICOM_DIR / SIIM_CHEST).pixel_array[::4, ::4].astype("<u2") * 16
    ds.BodyPartExamined, ds.ViewPosition, ds.SOPInstanceUID = "CHEST", "PA", generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = pixels.tobytes()
    ds.compress(uid.JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    start = first_fragment_offset(data)
    assert data[start : start + 4] == b"\xff\x4f\xff\x51"  # SOC, SIZ
    struct.pack_into(">II", data, start + 8, 20000, 20000)  # Xsiz, Ysiz
    ds.PixelData = bytes(data)
    path.write_bytes(dicom_bytes(ds))


def test_jpeg2000_codestream_larger_than_the_header(site):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_case(
        site,
        "bomb.dcm",
        jpeg2000_bomb,
        reason="JPEG 2000 codestream declares 20000x20000 with 1 component(s) but the header says "
        "256x256 (Rows x Columns) with SamplesPerPixel 1: rejected before decoding",
    )
    assert (site.input_dir / "bomb.dcm").stat().st_size < 100_000
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, f"peak memory grew by {grown_mb:.0f} MB: the codestream was decoded"


def test_jpeg_frame_header_larger_than_the_header(site):
    def bigger_frame(ds: Dataset) -> None:
        data = bytearray(ds.PixelData)
        sof = data.index(b"\xff\xc0", first_fragment_offset(data))  # baseline SOF0
        struct.pack_into(">HH", data, sof + 5, 30000, 30000)  # Y, X
        ds.PixelData = bytes(data)

    run_case(
        site,
        "sof.dcm",
        edited(DICOM_DIR / SIIM_CHEST, bigger_frame),
        reason="JPEG codestream declares 30000x30000 with 1 component(s) but the header says 1024x1024",
    )


def test_jpeg_ls_frame_header_smaller_than_the_header(site):
    def jpeg_ls(ds: Dataset) -> None:
        crop = ds.pixel_array[:256, :256].copy()
        ds.Rows = ds.Columns = 256
        ds.compress(uid.JPEGLSLossless, crop)
        ds.SOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = 512  # the SOF55 frame header keeps 256x256

    run_case(
        site,
        "ls.dcm",
        edited(DICOM_DIR / SIIM_CHEST, jpeg_ls),
        reason="JPEG-LS codestream declares 256x256 with 1 component(s) but the header says 512x512",
    )


def test_decoding_memory_above_the_cap(site):
    def huge(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 10000  # within max_pixels below: the memory estimate decides

    run_case(
        site,
        "big.dcm",
        edited(DICOM_DIR / SIIM_CHEST, huge),
        reason="decoding would need about 1526 MB (10000x10000, 16 bytes per sample), above max_decode_mb 1024",
        overrides=("preprocess.acceptance.max_pixels=1000000000",),
    )


def test_deflated_dataset_inflating_beyond_the_cap(site):
    def bomb(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
        ds.SOPInstanceUID = generate_uid()
        ds.PixelData = bytes(ds.Rows * ds.Columns * 2) + bytes(80 << 20)  # 80 MB of zeros deflate to 80 kB

    run_case(
        site,
        "deflated.dcm",
        edited(site.input_dir / "img_0001.dcm", bomb),
        reason="deflated dataset inflates to more than max_decode_mb 64",
        overrides=("preprocess.acceptance.max_decode_mb=64",),
    )


def test_file_larger_than_the_cap_is_not_read(site):
    def sparse(path: Path) -> None:
        with open(path, "wb") as handle:
            handle.truncate(65 << 20)

    run_case(
        site,
        "large.dcm",
        sparse,
        reason="file of 65 MB exceeds max_decode_mb 64 (not read)",
        overrides=("preprocess.acceptance.max_decode_mb=64",),
    )


# --- symbolic links ------------------------------------------------------------------------


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A folder outside the site's input folder holding one valid chest radiograph."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    edited(DICOM_DIR / SIIM_CHEST, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()))(
        folder / "chest.dcm"
    )
    return folder


def test_link_to_a_file_outside_the_input_folder(site, elsewhere):
    run_case(
        site,
        "outside.dcm",
        lambda path: path.symlink_to(elsewhere / "chest.dcm"),
        reason="symbolic link to a file outside the input folder: not followed "
        "(preprocess.follow_external_links is false)",
    )


def test_link_to_a_file_outside_followed_when_allowed(site, elsewhere):
    run_case(
        site,
        "outside.dcm",
        lambda path: path.symlink_to(elsewhere / "chest.dcm"),
        reason="",
        status="accepted",
        overrides=("preprocess.follow_external_links=true",),
    )


def test_link_to_a_folder_outside_the_input_folder(site, elsewhere):
    def linked_folder(path: Path) -> None:
        path.symlink_to(elsewhere, target_is_directory=True)
        labels = pd.read_csv(site.labels_csv)
        pd.concat([labels, pd.DataFrame({"file": ["linked/chest.dcm"], "label": ["normal"]})]).to_csv(
            site.labels_csv, index=False
        )

    report = run_case(
        site,
        "linked",
        linked_folder,
        label=None,
        reason="symbolic link to a folder outside the input folder: not followed",
    )
    assert report.loc["linked/chest.dcm", ["status", "reason"]].tolist() == [
        "rejected",
        "inside a linked folder that is not followed (see the folder's own row)",
    ]


def test_link_loops(site, elsewhere):
    def loops(path: Path) -> None:
        path.parent.symlink_to(elsewhere, target_is_directory=True)  # ext -> elsewhere, followed
        (elsewhere / "again").symlink_to(elsewhere, target_is_directory=True)  # a loop outside
        (site.input_dir / "up").symlink_to(site.input_dir, target_is_directory=True)  # a loop inside
        (site.input_dir / "ping.dcm").symlink_to(site.input_dir / "pong.dcm")
        (site.input_dir / "pong.dcm").symlink_to(site.input_dir / "ping.dcm")
        labels = pd.read_csv(site.labels_csv)
        pd.concat(
            [labels, pd.DataFrame({"file": ["ext/chest.dcm", "ping.dcm"], "label": ["normal"] * 2})]
        ).to_csv(site.labels_csv, index=False)

    report = run_case(
        site,
        "ext/again",
        loops,
        label=None,
        overrides=("preprocess.follow_external_links=true",),
        reason="symbolic link to a folder already listed (a loop or a second path to it)",
    )
    assert report.at["ext/chest.dcm", "status"] == "accepted"
    assert report.loc["up", ["status", "reason"]].tolist() == [
        "skipped",
        "symbolic link to a folder inside the input folder: its files are listed under their own path",
    ]
    assert report.at["ping.dcm", "reason"] == "unreadable: OSError (Too many levels of symbolic links)"


def test_source_file_name_with_a_formula_is_neutralised_in_the_report(site):
    name = '=HYPERLINK("http:evil.example","open").dcm'
    run_case(site, name, raw(b"not an image" * 20), reason="not a DICOM file")
    text = (site.work_dir / "report.csv").read_text()
    assert "\n\"'=HYPERLINK(" in text and '\n"=HYPERLINK(' not in text
    rerun = preprocess_consented(
        site, compose_config("data.image_size=32", "preprocess.workers=1").preprocess
    )
    assert rerun.processed == 0  # the private index reads the name back unchanged
