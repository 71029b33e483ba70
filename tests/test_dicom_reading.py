"""Reading real DICOM files, the pixel transforms and the acceptance rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pipeline.acceptance import AcceptanceRules, rejection_reason
from pipeline.readers import UnreadableImage, image_format, read_image
from transforms.dicom import ModalityLUT, VOILUT, dicom_to_unit
from transforms.image import build_augmentation, resize_square

DICOM_DIR = Path(__file__).resolve().parents[1] / "data" / "dicom"
DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo" / "kermany"
SIIM_CHEST = DICOM_DIR / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FAKE_MONO1 = DICOM_DIR / "Fake_MONOHR1.dcm"
J2K_CHEST = DICOM_DIR / "RG1_J2KI.dcm"
TIBIA = DICOM_DIR / "RG3_J2KR.dcm"
SMALL_CR = DICOM_DIR / "pydicom_wheel_CR" / "CR1_6154.dcm"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = "1.2.840.10008.1.2.4.91"


def processed(path: Path, size: int = 64) -> np.ndarray:
    loaded = read_image(path)
    return resize_square(dicom_to_unit(loaded.pixels, loaded.dicom), size)


def test_monochrome1_twin_is_the_inverse_of_monochrome2():
    mono2, mono1 = processed(SIIM_CHEST), processed(FAKE_MONO1)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-5)
    assert abs(mono1.mean() - mono2.mean()) > 0.1  # the twins really differ


def test_jpeg2000_chest_decodes():
    loaded = read_image(J2K_CHEST)
    assert loaded.meta["transfer_syntax"] == JPEG_2000
    assert loaded.pixels.shape == (1955, 1841)
    assert loaded.meta["photometric"] == "MONOCHROME1"
    assert loaded.meta["bits_stored"] == 15
    assert loaded.pixels.max() > 1000


def test_jpeg_baseline_chest_decodes():
    loaded = read_image(SIIM_CHEST)
    assert loaded.meta["transfer_syntax"] == JPEG_BASELINE
    assert loaded.pixels.shape == (1024, 1024)
    assert loaded.pixels.std() > 10


@pytest.mark.parametrize("path", sorted(DICOM_DIR.rglob("*.dcm")), ids=lambda p: p.name)
def test_every_real_file_becomes_unit_range_square(path):
    image = processed(path, size=48)
    assert image.shape == (48, 48) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.01


def test_modality_lut_applies_rescale_slope_and_intercept():
    ds = pydicom.dcmread(SMALL_CR)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (0.684, 200.0)
    out = ModalityLUT()({"image": ds.pixel_array, "dicom": ds})["image"]
    np.testing.assert_allclose(out, ds.pixel_array * 0.684 + 200.0)


def test_voi_lut_windows_and_passes_through_without_window():
    ds = pydicom.dcmread(SMALL_CR)  # window centre 1600, width 2800
    values = np.array([[-1000.0, 1600.0, 5000.0]])
    windowed = VOILUT()({"image": values, "dicom": ds})["image"]
    assert windowed[0, 0] == windowed.min() and windowed[0, 2] == windowed.max()
    del ds.WindowCenter, ds.WindowWidth
    unchanged = VOILUT()({"image": values, "dicom": ds})["image"]
    np.testing.assert_array_equal(unchanged, values)


def test_png_reads_as_grayscale_and_skips_dicom_rules():
    png = sorted(DEMO_DIR.glob("*.png"))[0]
    loaded = read_image(png)
    assert loaded.pixels.ndim == 2 and loaded.dicom is None
    assert rejection_reason(loaded.meta, AcceptanceRules()) is None
    assert processed(png).shape == (64, 64)


def test_acceptance_takes_chests_and_rejects_the_tibia():
    rules = AcceptanceRules()
    assert rejection_reason(read_image(J2K_CHEST).meta, rules) is None
    assert rejection_reason(read_image(SIIM_CHEST).meta, rules) is None
    tibia = read_image(TIBIA).meta
    assert tibia["body_part"] == "EXTREMITY"
    assert rejection_reason(tibia, rules) == "BodyPartExamined 'EXTREMITY' not in ['CHEST']"


def test_acceptance_rules_for_missing_tags_and_size():
    meta = {**read_image(SIIM_CHEST).meta, "body_part": None}
    assert rejection_reason(meta, AcceptanceRules()) == "BodyPartExamined missing"
    assert rejection_reason(meta, AcceptanceRules(allow_missing_body_part=True)) is None
    assert rejection_reason({**meta, "modality": "MR"}, AcceptanceRules()) == "Modality 'MR' not in ['CR', 'DX']"
    small = read_image(DICOM_DIR / "pydicom_wheel_CR" / "CR2_6247.dcm").meta
    loose = AcceptanceRules(body_parts=("CSPINE",))
    assert rejection_reason(small, loose) == "image 16x16 smaller than 64x64"


def test_unreadable_and_non_image_files(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(UnreadableImage, match="unreadable DICOM"):
        read_image(junk)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert image_format(notes) is None


def test_augmentation_keeps_shape_and_is_seedable():
    augment = build_augmentation(rotate_degrees=10, translate_fraction=0.05, scale_fraction=0.1, prob=1.0)
    image = torch.from_numpy(processed(SIIM_CHEST))[None]
    first = augment.set_random_state(3)(image)
    again = augment.set_random_state(3)(image)
    assert type(first) is torch.Tensor and first.shape == (1, 64, 64)
    assert torch.equal(first, again) and not torch.equal(first, image)


def test_nifti_volume_reads_its_middle_slice(tmp_path):
    import nibabel

    volume = np.stack([np.full((80, 70), k, np.int16) for k in range(5)], axis=-1)
    path = tmp_path / "chest.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    loaded = read_image(path)
    assert loaded.pixels.shape == (80, 70) and (loaded.pixels == 2).all()
    assert loaded.meta["format"] == "nifti"
