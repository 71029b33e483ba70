"""Build simulated hospitals from the embedded Kermany sample (``data/demo/kermany``).

Each site gets what a hospital has: ``dicom/img_NNNN.dcm`` (one DICOM file per image, with
invented identifying header values), ``labels.csv`` (``file,label``) and a random
``site_secret.key``. Sites hold disjoint patients and a skewed class mix (non-IID).
Everything except the secret is a deterministic function of the seed, and a rerun only
writes files whose bytes changed.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from pipeline.contracts.files import csv_bytes, read_csv, write_if_changed
from pipeline.contracts.labels import CLASS_NAMES
from pipeline.contracts.layout import SitePaths
from pipeline.ingestion.pseudonym import ensure_secret

SAMPLE_IN_CHECKOUT = Path("data") / "demo" / "kermany"


def _demo_sample() -> Path:
    """The embedded demo sample: in the checkout this module lies in, else under the working
    directory (fedrad installed as a package and run from its checkout, as in the docker image)."""
    beside = Path(__file__).resolve().parents[2] / SAMPLE_IN_CHECKOUT
    return beside if beside.is_dir() else Path.cwd() / SAMPLE_IN_CHECKOUT


DEMO_SAMPLE = _demo_sample()
SOP_CLASS = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
}
# Header fields holding invented identifying values; none may reach a cache.
PLANTED_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)
BITS_STORED = 12
MONOCHROME1_FRACTION = 0.1
IMAGE_NAME = re.compile(r"img_\d{4}\.dcm")


@dataclass(frozen=True)
class DemoImage:
    """One planned DICOM file of a demo site."""

    site: int  # 1-based site number
    number: int  # 1-based image number within the site
    patient: int  # 1-based patient number within the site
    source: str  # PNG file name in the sample
    label: str
    modality: str
    view: str
    monochrome1: bool

    @property
    def file_name(self) -> str:
        return f"img_{self.number:04d}.dcm"


def load_sample(sample_dir: Path = DEMO_SAMPLE) -> pd.DataFrame:
    """The sample's manifest (``file``, ``label``, ``patient_id``), checked."""
    manifest = sample_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"demo sample manifest {manifest} not found: the repository's data/ is incomplete"
        )
    table = read_csv(manifest, dtype=str)
    unknown = sorted(set(table["label"]) - set(CLASS_NAMES))
    if unknown:
        raise ValueError(f"{manifest}: labels {unknown} are not in {CLASS_NAMES}")
    return table


def assign_sites(sample: pd.DataFrame, n_sites: int, seed: int, skew: float) -> dict[str, int]:
    """Patient id -> site index (0-based), disjoint and non-IID.

    Patients are grouped by their majority label; site ``s`` receives a ``1 + skew`` share of
    class ``s mod 3`` and a share of 1 of every other class.
    """
    majority = sample.groupby("patient_id")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())
    rng = random.Random(seed)
    site_of: dict[str, int] = {}
    for class_index, name in enumerate(CLASS_NAMES):
        patients = sorted(majority[majority == name].index)
        rng.shuffle(patients)
        weights = np.array([1 + skew if s % len(CLASS_NAMES) == class_index else 1.0 for s in range(n_sites)])
        bounds = np.cumsum(weights) / weights.sum() * len(patients)
        for i, patient in enumerate(patients):
            site_of[patient] = int(np.searchsorted(bounds, i, side="right"))
    return site_of


def plan_sites(
    sample: pd.DataFrame, n_sites: int, seed: int, skew: float, max_images: int | None
) -> list[list[DemoImage]]:
    """The DICOM files of every site, in file-number order."""
    site_of = assign_sites(sample, n_sites, seed, skew)
    plans = []
    for site in range(n_sites):
        rng = random.Random(f"{seed}-site{site + 1}")
        patients = sorted(p for p, s in site_of.items() if s == site)
        rng.shuffle(patients)
        images: list[DemoImage] = []
        for patient_number, patient in enumerate(patients, start=1):
            rows = sample[sample["patient_id"] == patient].sort_values("file")
            if max_images is not None and len(images) + len(rows) > max_images:
                continue
            view = "AP" if rng.random() < 0.3 else "PA"
            for row in rows.itertuples():
                images.append(
                    DemoImage(
                        site=site + 1,
                        number=len(images) + 1,
                        patient=patient_number,
                        source=row.file,
                        label=row.label,
                        modality="CR" if site % 2 == 0 else "DX",
                        view=view,
                        monochrome1=rng.random() < MONOCHROME1_FRACTION,
                    )
                )
        plans.append(images)
    return plans


def _uid(seed: int, *parts: object) -> UID:
    return generate_uid(entropy_srcs=["fedrad-demo", str(seed), *map(str, parts)])


def _birth_date(seed: int, image: DemoImage) -> str:
    rng = random.Random(f"{seed}-birth-{image.site}-{image.patient}")
    return f"{rng.randint(2013, 2017)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"


def dicom_bytes(pixels: np.ndarray, image: DemoImage, seed: int) -> bytes:
    """An uncompressed 12-bit CR/DX file holding ``pixels`` (uint8 H, W) with invented identifiers.

    Stored value = 16 * pixel (inverted for MONOCHROME1); a per-site rescale slope/intercept
    and a window covering the full range make the modality and VOI LUTs matter.
    """
    stored = pixels.astype(np.uint16) * 16
    if image.monochrome1:
        stored = (2**BITS_STORED - 1) - stored
    slope, intercept = ((1.0, 0.0), (0.5, -1024.0), (2.0, -2048.0))[(image.site - 1) % 3]
    sop_uid = _uid(seed, image.site, "image", image.number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[image.modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP_CLASS[image.modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(seed, image.site, "study", image.patient)
    ds.SeriesInstanceUID = _uid(seed, image.site, "series", image.number)
    ds.PatientName = f"Fakename^Site{image.site}Patient{image.patient:04d}"
    ds.PatientID = f"S{image.site}MRN{image.patient:05d}"
    ds.PatientBirthDate = _birth_date(seed, image)
    ds.AccessionNumber = f"ACC{image.site}{image.number:06d}"
    ds.InstitutionName = f"Fake Children's Hospital {image.site}"
    ds.ReferringPhysicianName = f"Fakedoc^Referrer{image.site}"
    ds.StudyID = f"ST{image.site}{image.patient:05d}"
    ds.StudyDate = "20180101"
    ds.Modality = image.modality
    ds.Manufacturer = "fedrad demo"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = image.view
    ds.SeriesNumber = 1
    ds.InstanceNumber = image.number
    ds.ImagerPixelSpacing = [0.9, 0.9]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if image.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.RescaleType = "US"
    ds.WindowCenter = slope * (2**BITS_STORED - 1) / 2 + intercept
    ds.WindowWidth = slope * 2**BITS_STORED
    ds.PixelData = stored.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def prepare_demo_sites(
    root: str | Path,
    n_sites: int = 3,
    seed: int = 0,
    skew: float = 1.0,
    max_images: int | None = None,
    sample_dir: Path = DEMO_SAMPLE,
) -> list[SitePaths]:
    """Write ``site1`` .. ``site<n_sites>`` under ``root``; return their SitePaths.

    ``max_images`` caps each site's image count (whole patients only) for quick tests.
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    sample = load_sample(sample_dir)
    sites = []
    for number, images in enumerate(plan_sites(sample, n_sites, seed, skew, max_images), start=1):
        site = SitePaths.under(root, f"site{number}")
        site.input_dir.mkdir(parents=True, exist_ok=True)
        for image in images:
            with Image.open(sample_dir / image.source) as png:
                pixels = np.asarray(png.convert("L"))
            write_if_changed(site.input_dir / image.file_name, dicom_bytes(pixels, image, seed))
        wanted = {image.file_name for image in images}
        for stale in site.input_dir.iterdir():
            if IMAGE_NAME.fullmatch(stale.name) and stale.name not in wanted:
                stale.unlink()
        labels = pd.DataFrame({"file": [i.file_name for i in images], "label": [i.label for i in images]})
        write_if_changed(site.labels_csv, csv_bytes(labels))
        ensure_secret(site.secret_file)
        sites.append(site)
    return sites


def planted_identifiers(site: SitePaths) -> set[str]:
    """Every invented identifying value in a demo site's DICOM headers (see PLANTED_KEYWORDS)."""
    values: set[str] = set()
    for path in sorted(site.input_dir.glob("img_*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values.update(str(ds[k].value) for k in PLANTED_KEYWORDS if k in ds)
    return values
