"""The header facts fedrad reads from a source image, typed, and the coarse subgroup categories
it keeps of them.

Acceptance decides on :class:`HeaderFacts`; the index keeps its technical facts; the cache
manifest keeps only coarse, non-identifying categories for subgroup analysis
(:data:`pipeline.contracts.cache.SUBGROUP_COLUMNS`): the view (AP / PA / LAT), the sex, a
ten-year-or-coarser age band and the equipment maker from a fixed list. Free text from a header
never reaches the cache: a value outside these categories becomes ``other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNKNOWN = "unknown"
OTHER = "other"
VIEWS = {"AP": "AP", "PA": "PA", "LL": "LAT", "RL": "LAT", "LAT": "LAT", "LATERAL": "LAT"}
SEXES = {"M": "M", "F": "F", "O": OTHER}
# (upper bound in years, exclusive; band name)
AGE_BANDS = (
    (1.0, "<1 y"),
    (5.0, "1-4 y"),
    (10.0, "5-9 y"),
    (18.0, "10-17 y"),
    (40.0, "18-39 y"),
    (65.0, "40-64 y"),
    (float("inf"), "65+ y"),
)
AGE = re.compile(r"(\d{1,3})([DWMY]?)")  # a bare number (seen in the wild) counts as years
DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
# Makers of radiography equipment, matched as a word of the Manufacturer tag.
MAKERS = {
    "AGFA": "Agfa",
    "CANON": "Canon",
    "CARESTREAM": "Carestream",
    "FUJI": "Fujifilm",
    "FUJIFILM": "Fujifilm",
    "GE": "GE",
    "HOLOGIC": "Hologic",
    "KODAK": "Kodak",
    "KONICA": "Konica Minolta",
    "PHILIPS": "Philips",
    "SAMSUNG": "Samsung",
    "SHIMADZU": "Shimadzu",
    "SIEMENS": "Siemens",
    "TOSHIBA": "Toshiba",
}


@dataclass(frozen=True)
class HeaderFacts:
    """What fedrad reads from a source image's header (identifiers kept for site-only use:
    they are turned into keyed pseudonyms and never stored as they are)."""

    format: str  # "dicom", "pixel" (PNG / JPEG) or "nifti"
    rows: int
    cols: int
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    photometric: str | None = "MONOCHROME2"
    samples_per_pixel: int = 1
    bits_stored: int | None = None
    pixel_representation: int = 0
    pixel_spacing_mm: float | None = None
    transfer_syntax: str | None = None
    number_of_frames: int = 1
    sop_class: str | None = None
    patient_id: str | None = None
    sop_instance_uid: str | None = None
    sex: str | None = None
    age: str | None = None
    manufacturer: str | None = None

    def subgroups(self) -> dict[str, str]:
        """The coarse categories the cache manifest keeps (see the module docstring)."""
        return {
            "view": view_category(self.view),
            "sex": sex_category(self.sex),
            "age_band": age_band(self.age),
            "manufacturer": maker(self.manufacturer),
        }


def view_category(view: str | None) -> str:
    if not view:
        return UNKNOWN
    return VIEWS.get(view.strip().upper(), OTHER)


def sex_category(sex: str | None) -> str:
    if not sex:
        return UNKNOWN
    return SEXES.get(sex.strip().upper(), OTHER)


def age_band(age: str | None) -> str:
    """The band of a DICOM age string (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``; a bare number is
    read as years)."""
    match = AGE.fullmatch((age or "").strip().upper())
    if match is None:
        return UNKNOWN
    years = int(match.group(1)) * DAYS_PER_UNIT[match.group(2) or "Y"] / 365.25
    return next(name for bound, name in AGE_BANDS if years < bound)


def maker(manufacturer: str | None) -> str:
    if not manufacturer:
        return UNKNOWN
    words = re.findall(r"[A-Z]+", manufacturer.upper())
    return next((MAKERS[w] for w in words if w in MAKERS), OTHER)
