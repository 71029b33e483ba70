"""Load and validate a CSV of radiologist reads of the evaluated images.

Columns (names case-insensitive): ``image`` (the site's source file name, as in its
``labels.csv``, or the cache's ``image_key``), ``reader``, ``label`` (normal / bacterial /
viral, or normal / pneumonia) and optionally ``site`` (needed when a file name exists at
several evaluated sites), ``confidence`` (0 to 1, the reader's certainty in the label) and
``simulated`` (``yes`` on a read that no radiologist made: the report then says so in a banner).

Problems that make the reads unusable raise :class:`ReadsError` listing every bad row;
the rest are returned as warnings and shown in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts.files import read_csv
from pipeline.contracts.labels import CLASS_NAMES, NORMAL_INDEX
from pipeline.evaluation.clinical.cases import Cases, SiteIndex

PNEUMONIA = "pneumonia"
READ_LABELS = (*CLASS_NAMES, PNEUMONIA)
REQUIRED_COLUMNS = ("image", "reader", "label")
OPTIONAL_COLUMNS = ("site", "confidence", "simulated")
YES, NO = ("yes", "true", "1"), ("no", "false", "0", "")
ACCEPTED = "accepted"
MAX_LISTED = 25


class ReadsError(ValueError):
    """The reads CSV cannot be used; ``problems`` lists each one (with its CSV line)."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        listed = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            listed.append(f"... and {len(problems) - MAX_LISTED} more")
        super().__init__(f"{path}: {len(problems)} problem(s) in the reads file:\n  " + "\n  ".join(listed))


@dataclass(frozen=True)
class ReaderReads:
    """One reader's reads of the evaluated images."""

    name: str
    cases: np.ndarray  # indices into the evaluated Cases
    labels: np.ndarray  # read label names (READ_LABELS)
    confidence: np.ndarray | None  # 0..1 certainty in the label; None unless given for every read
    simulated: bool = False  # any of the reads is marked simulated

    @property
    def three_class(self) -> bool:
        """True when the reader distinguished bacterial from viral pneumonia."""
        return PNEUMONIA not in set(self.labels)

    @property
    def says_pneumonia(self) -> np.ndarray:
        return self.labels != CLASS_NAMES[NORMAL_INDEX]

    @property
    def pneumonia_score(self) -> np.ndarray | None:
        """Certainty of pneumonia from the confidence (None without confidence)."""
        if self.confidence is None:
            return None
        return np.where(self.says_pneumonia, self.confidence, 1.0 - self.confidence)

    @property
    def class_indices(self) -> np.ndarray:
        """Read class indices (three-class readers only)."""
        return np.array([CLASS_NAMES.index(label) for label in self.labels])


@dataclass(frozen=True)
class Reads:
    readers: list[ReaderReads]
    warnings: list[str]


def _table(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The CSV with normalised column names and cell values, and warnings about its columns."""
    try:
        table = read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise ReadsError(
            path, ["the file is empty: expected a header line with columns image,reader,label"]
        ) from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ReadsError(
            path,
            [
                f"missing column(s) {', '.join(missing)}: found {', '.join(table.columns)}; "
                f"expected {', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})"
            ],
        )
    if table.empty:
        raise ReadsError(path, ["the file holds no reads (only a header line)"])
    extra = [c for c in table.columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    warnings = [f"column(s) {', '.join(extra)} ignored"] if extra else []
    for column in table.columns:
        table[column] = table[column].str.strip()
    return table, warnings


def _resolve(image: str, sites: list[SiteIndex]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (site, image_key) pairs ``image`` names among ``sites``, and rejection notes."""
    found, rejected = [], []
    for site in sites:
        if image in site.files:
            key, status, reason = site.files[image]
            if status == ACCEPTED:
                found.append((site.name, key))
            else:
                rejected.append(f"{site.name} rejected it in preprocessing ({reason or status})")
        elif image in site.image_keys:
            found.append((site.name, image))
    return found, rejected


def load_reads(path: str | Path, cases: Cases, sites: list[SiteIndex], split: str) -> Reads:
    """Validate the reads CSV at ``path`` against the evaluated ``cases`` of ``sites``."""
    path = Path(path)
    table, warnings = _table(path)
    by_name = {site.name: site for site in sites}
    case_of = {(s, k): i for i, (s, k) in enumerate(zip(cases.sites, cases.image_keys))}
    errors: list[str] = []
    rows: list[tuple[str, int, str, float | None, bool]] = []  # reader, case, label, confidence, simulated
    seen: dict[tuple[str, str, str], int] = {}
    outside_split, rejected_reads = 0, []
    for offset, row in enumerate(table.to_dict("records")):
        line = offset + 2  # 1-based, after the header
        where = f"line {line}"
        image, reader, label = row["image"], row["reader"], row["label"].lower()
        if not image or not reader:
            errors.append(f"{where}: empty {'image' if not image else 'reader'}")
            continue
        if label not in READ_LABELS:
            errors.append(
                f"{where}: unknown label {row['label']!r} (expected one of {', '.join(READ_LABELS)})"
            )
        confidence = None
        if row.get("confidence"):
            try:
                confidence = float(row["confidence"])
            except ValueError:
                confidence = float("nan")
            if not 0 <= confidence <= 1:
                errors.append(f"{where}: confidence {row['confidence']!r} is not a number from 0 to 1")
        simulated = row.get("simulated", "").lower()
        if simulated not in YES + NO:
            errors.append(f"{where}: simulated {row['simulated']!r} is not yes or no")
        site_name = row.get("site", "")
        if site_name and site_name not in by_name:
            errors.append(f"{where}: unknown site {site_name!r} (evaluated sites: {', '.join(by_name)})")
            continue
        found, rejected = _resolve(image, [by_name[site_name]] if site_name else sites)
        if len(found) > 1:
            at = ", ".join(s for s, _ in found)
            errors.append(f"{where}: image {image!r} exists at sites {at}: add a site column")
            continue
        if not found:
            if rejected:
                rejected_reads.append(f"{where}: image {image!r} was not evaluated: {'; '.join(rejected)}")
            else:
                scope = f"site {site_name}" if site_name else "any evaluated site"
                errors.append(f"{where}: unknown image {image!r}: not a source file or image key of {scope}")
            continue
        key = found[0]
        duplicate = seen.setdefault((*key, reader), line)
        if duplicate != line:
            errors.append(f"{where}: reader {reader!r} already read image {image!r} on line {duplicate}")
            continue
        case = case_of.get(key)
        if case is None:
            outside_split += 1
            continue
        rows.append((reader, case, label, confidence, simulated in YES))
    if errors:
        raise ReadsError(path, errors)
    warnings += rejected_reads
    if outside_split:
        warnings.append(f"{outside_split} read(s) of images outside the {split} split ignored")
    return Reads(_readers(rows, len(cases), split, warnings), warnings)


def _readers(
    rows: list[tuple[str, int, str, float | None, bool]], n_cases: int, split: str, warnings: list[str]
) -> list[ReaderReads]:
    """Group the valid reads by reader (in order of appearance), adding warnings as found."""
    if not rows:
        warnings.append(f"no read is of an image of the {split} split: the report has no reader comparison")
        return []
    frame = pd.DataFrame(rows, columns=["reader", "case", "label", "confidence", "simulated"])
    readers = []
    for name, reads in frame.groupby("reader", sort=False):
        if len(reads) < n_cases:
            warnings.append(
                f"reader {name!r} has no read for {n_cases - len(reads)} of the {n_cases} evaluated "
                f"images: their comparisons use the {len(reads)} images they read"
            )
        labels = reads["label"].to_numpy(str)
        if PNEUMONIA in labels and np.isin(labels, CLASS_NAMES[1:]).any():
            warnings.append(
                f"reader {name!r} mixes 'pneumonia' with bacterial / viral: "
                "compared on pneumonia vs normal only"
            )
        confidence = reads["confidence"].to_numpy(float)
        has_confidence = bool(np.isfinite(confidence).all())
        if not has_confidence and np.isfinite(confidence).any():
            warnings.append(
                f"reader {name!r} gave a confidence for only some reads: no ROC-AUC for this reader"
            )
        readers.append(
            ReaderReads(
                str(name),
                reads["case"].to_numpy(int),
                labels,
                confidence if has_confidence else None,
                bool(reads["simulated"].any()),
            )
        )
    return readers
