"""Turn one site's source images into its identifier-free training cache.

For every file under ``input_dir``: read its bytes once, hash them, skip the file when it
was already processed with the same content and settings, otherwise read the header ->
accept (header only, nothing rejected is decoded) -> decode -> DICOM pixel transforms ->
resize -> write ``cache/<N>px/arrays/<image_key>.npy`` (one cache per image size). Then split
patients into train / val / test and write three tables:

- ``cache/<N>px/manifest.csv``: pseudonymous keys, label, split, technical columns and coarse
  subgroup categories only;
- ``private/source_index.csv``: site-only link from source file to keys (and the rerun memory);
- ``report.csv`` (site-only): every file with its status (accepted / rejected / skipped, or
  missing for labels naming absent files) and the reason.

Hostile inputs: any failure reading, decoding or transforming one file rejects that file with a
reason and the site goes on (:mod:`pipeline.ingestion.pool`: a worker process that dies is
replaced, and the file it was on is rejected). Links and special entries are listed by
:mod:`pipeline.ingestion.sources`; every such entry has a report row. Every CSV is written with
spreadsheet formulas neutralised (``pipeline.contracts.files``), and log lines, which may leave
the site (a simulation's coordinator log), name no source file: they give counts and point to
``report.csv``.

Every finished file is appended to ``private/progress.jsonl`` as it completes, so an
interrupted run resumes where it stopped; the journal is folded into the index at the end.
Source files are only read. Tables are written atomically, and a rerun over the same inputs
reproduces the cache byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.contracts.cache import SPLITS, SUBGROUP_COLUMNS, SiteCache
from pipeline.contracts.files import atomic_write, write_csv
from pipeline.contracts.labels import CLASS_NAMES, label_index, read_labels
from pipeline.contracts.layout import SitePaths
from pipeline.ingestion.acceptance import AcceptanceRules, rejection_reason
from pipeline.ingestion.header import HeaderFacts
from pipeline.ingestion.pool import run_tasks
from pipeline.ingestion.pseudonym import ensure_secret, image_key, keyed_hash, load_secret, patient_key
from pipeline.ingestion.readers import (
    MB,
    UnreadableImage,
    image_format,
    not_image_reason,
    open_image,
    special_file_reason,
)
from pipeline.ingestion.records import FileRecord, previous_records
from pipeline.ingestion.sources import UNDER_REFUSED_LINK, file_size, source_files
from pipeline.ingestion.splits import assign_splits, patient_labels
from transforms.dicom import PixelTransformError, dicom_to_unit_square

log = logging.getLogger("fedrad.preprocess")

CONSENT_REVOKED = "consent revoked"  # the rejection reason of a revoked patient's files
MANIFEST_COLUMNS = (
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
    *SUBGROUP_COLUMNS,
)
REPORT_COLUMNS = ("file", "status", "reason", "reused", "label", "split")
# Reasons that name another source file, and what log lines show instead.
NAMING_REASONS = ("same content as ", "duplicate SOPInstanceUID: same instance as ")


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs to process one file (picklable)."""

    version: str
    image_size: int
    rules: AcceptanceRules

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Settings":
        size = int(cfg["image_size"])
        return cls(
            version=f"v{cfg['version']}-{size}px",
            image_size=size,
            rules=AcceptanceRules.from_config(cfg["acceptance"]),
        )

    @property
    def rules_id(self) -> str:
        """Fingerprint of the acceptance rules: changing them re-evaluates every file."""
        return hashlib.sha256(repr(self.rules).encode()).hexdigest()[:12]


@dataclass
class PreprocessSummary:
    """Counts of one site's preprocessing run."""

    site: str
    files: int = 0
    processed: int = 0
    reused: int = 0
    status: dict[str, int] = field(default_factory=dict)
    images: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> count
    rejections: dict[str, int] = field(default_factory=dict)
    patients: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        """A few lines for a human: counts per class and split, rejections by reason."""
        rate = self.files / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"site {self.site}: {self.files} files in {self.seconds:.1f} s ({rate:.1f} files/s), "
            f"{self.processed} processed, {self.reused} unchanged; "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.status.items())),
            f"  {self.patients} patients; images per split: "
            + "; ".join(
                f"{split} " + " ".join(f"{c}={self.images.get(split, {}).get(c, 0)}" for c in CLASS_NAMES)
                for split in SPLITS
            ),
        ]
        rejections = Counter[str]()
        for reason, n in self.rejections.items():
            rejections[loggable_reason(reason)] += n
        lines += [f"  rejected {n}x: {reason}" for reason, n in sorted(rejections.items())]
        return "\n".join(lines)


QUOTED_VALUE = re.compile(r"'[^']*'|\"[^\"]*\"")


def loggable_reason(reason: str) -> str:
    """``reason`` for a log line: without the source file name some reasons carry, and without
    the header values they quote (a hostile file can put any text, a name included, in a tag)."""
    for prefix in NAMING_REASONS:
        if reason.startswith(prefix):
            return f"{prefix}another file (see report.csv)"
    return QUOTED_VALUE.sub("<value>", reason)


def _array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def _write_array(path: Path, image: np.ndarray) -> None:
    """Write a cache array in place (no temporary file, no fsync: one file creation per image).

    Safe without atomic renames because a file only counts once its record is journalled,
    which happens after this returns, and reuse checks the file's size.
    """
    with open(path, "wb") as handle:
        handle.write(_array_bytes(image))


@lru_cache(maxsize=8)
def _array_file_size(image_size: int) -> int:
    """Size in bytes of a complete cache array file of ``image_size`` (detects torn files)."""
    return len(_array_bytes(np.zeros((image_size, image_size), np.float32)))


def _reusable(previous: dict[str, Any] | None, sha: str, settings: Settings, array: Path) -> bool:
    """True when ``previous`` describes the same bytes under the same settings, array intact."""
    if previous is None or (previous["sha256"], previous["version"], previous["rules"]) != (
        sha,
        settings.version,
        settings.rules_id,
    ):
        return False
    if previous["status"] != "accepted" and not previous["duplicate_of"]:
        return True
    return array.is_file() and array.stat().st_size == _array_file_size(settings.image_size)


def _describe(record: FileRecord, header: HeaderFacts, secret: bytes) -> None:
    """Copy the header facts the index and manifest keep: technical facts, coarse subgroup
    categories, and identifiers only as keyed hashes."""
    record.format = header.format
    record.rows, record.cols = header.rows, header.cols
    record.frames = header.number_of_frames
    record.bits_stored = header.bits_stored or 0
    record.pixel_spacing_mm = header.pixel_spacing_mm or float("nan")
    for column, category in header.subgroups().items():
        setattr(record, column, category)
    if header.sop_instance_uid:
        record.sop_key = keyed_hash(secret, "sop-instance", header.sop_instance_uid)
    if header.patient_id:
        record.patient_key = patient_key(secret, header.patient_id)


def process_file(
    task: tuple[str, dict[str, Any] | None],
    *,
    input_dir: Path,
    cache: SiteCache,
    settings: Settings,
    secret: bytes,
) -> FileRecord:
    """Process one labelled source file, or reuse its previous record when nothing changed.

    The file is read once: the same bytes are hashed and parsed. Acceptance runs on the
    header, so rejected files are never decoded. Any failure past reading the bytes
    rejects the file with a reason instead of raising.
    """
    rel, previous = task
    max_bytes = settings.rules.max_decode_mb * MB
    try:
        with open(input_dir / rel, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                return FileRecord(
                    file=rel,
                    status="rejected",
                    reason=f"file of {size / MB:.0f} MB exceeds max_decode_mb "
                    f"{settings.rules.max_decode_mb} (not read)",
                )
            data = handle.read()
    except OSError as error:
        return FileRecord(
            file=rel, status="rejected", reason=f"unreadable: {type(error).__name__} ({error.strerror})"
        )
    sha = hashlib.sha256(data).hexdigest()
    key = image_key(secret, sha)
    if previous is not None and _reusable(previous, sha, settings, cache.array_path(key)):
        if previous["duplicate_of"]:  # processed and accepted; duplicates are decided afresh
            return FileRecord(
                **{**previous, "status": "accepted", "reason": "", "duplicate_of": "", "reused": True}
            )
        return FileRecord(**{**previous, "reused": True})
    record = FileRecord(
        file=rel, status="rejected", sha256=sha, version=settings.version, rules=settings.rules_id
    )
    try:
        source = open_image(input_dir / rel, data, max_bytes)
        _describe(record, source.header, secret)
        record.reason = rejection_reason(source.header, settings.rules) or ""
        if not record.reason and record.format == "dicom" and not record.patient_key:
            record.reason = "PatientID missing"
        if record.reason:
            return record
        loaded = source.decode()
        image = dicom_to_unit_square(loaded.pixels, loaded.dicom, settings.image_size)
    except (UnreadableImage, PixelTransformError) as error:
        record.reason = str(error)
        return record
    except Exception as error:  # anything else a hostile file triggers rejects only that file
        message = " ".join(str(error).split())[:160]
        record.reason = f"processing failed ({type(error).__name__}: {message})"
        return record
    _write_array(cache.array_path(key), image)
    record.status, record.image_key = "accepted", key
    return record


def _triage(rel: str, path: Path, labels: Mapping[str, str]) -> FileRecord | None:
    """The record of a file that is not processed (unreadable, not an image, unlabelled), or None."""
    problem = special_file_reason(path)
    if problem:
        return FileRecord(file=rel, status="rejected", reason=problem)
    if image_format(path) is None:
        return FileRecord(file=rel, status="skipped", reason=not_image_reason(path))
    if rel not in labels:
        return FileRecord(file=rel, status="rejected", reason="no label in labels.csv")
    if labels[rel].strip().lower() not in CLASS_NAMES:
        return FileRecord(file=rel, status="rejected", reason=f"unknown label {labels[rel]!r}")
    return None


def _reject_duplicates(files: list[str], records: dict[str, FileRecord]) -> None:
    """Keep the first file (in path order) of identical content or of one SOPInstanceUID."""
    seen_content: dict[str, str] = {}
    seen_instance: dict[str, str] = {}
    for rel in files:
        record = records[rel]
        if record.status != "accepted":
            continue
        if record.image_key in seen_content:
            record.duplicate_of = seen_content[record.image_key]
            record.status, record.reason = "rejected", f"same content as {record.duplicate_of}"
        elif record.sop_key and record.sop_key in seen_instance:
            record.duplicate_of = seen_instance[record.sop_key]
            record.status, record.reason = (
                "rejected",
                f"duplicate SOPInstanceUID: same instance as {record.duplicate_of}",
            )
        else:
            seen_content[record.image_key] = rel
            if record.sop_key:
                seen_instance[record.sop_key] = rel


@dataclass
class Labels:
    """A site's labels.csv: label and optional patient id by source file."""

    label: dict[str, str]
    patient_id: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> "Labels":
        table = read_labels(path)
        ids = table["patient_id"].to_dict() if "patient_id" in table.columns else {}
        return cls(table["label"].to_dict(), ids)


def preprocess_site(
    paths: SitePaths, cfg: Mapping[str, Any], *, revoked: Collection[str]
) -> PreprocessSummary:
    """Preprocess one site (``cfg`` is the ``preprocess`` config node) and return its summary.

    The stages: list the input folder, triage and process each file (journalled, in workers),
    reject duplicates, key the patients, withdraw the patients whose keys are in ``revoked``
    (consent revoked, see :func:`pipeline.governance.revocation.preprocess_consented`), split by
    patient, then write the manifest, the source index and the report.

    Creates the site secret when the site has none yet (logged as a warning). Raises
    ``pipeline.contracts.labels.LabelsError`` (one line) when labels.csv is unusable.
    """
    started = time.perf_counter()
    settings = Settings.from_config(cfg)
    labels = Labels.read(paths.labels_csv)
    files, records = _inventory(paths.input_dir, labels, bool(cfg.get("follow_external_links", False)))
    ensure_secret(paths.secret_file)  # only once the site's labels and images are there
    atomic_write(paths.work.name_file, paths.name.encode())  # the name its lines and replies use
    secret = load_secret(paths.secret_file)
    cache_dir = paths.cache(settings.image_size)
    _process(paths, files, records, labels, settings, secret, int(cfg.get("workers", 1)))
    _reject_duplicates(files, records)
    _key_patients(files, records, labels, secret)
    _withdraw(records, revoked)
    split_of = _split(files, records, labels, cfg["split"])
    ordered = [records[rel] for rel in files]
    manifest = _write_manifest(cache_dir, ordered, labels, split_of, settings)
    write_csv(paths.work.source_index, _index_table(ordered))
    paths.work.preprocess_journal.unlink(missing_ok=True)
    missing = sorted(set(labels.label) - set(files))
    write_csv(paths.work.preprocess_report, _report_table(ordered, missing, labels, split_of))
    summary = _summarise(paths.name, ordered, missing, manifest, time.perf_counter() - started)
    _warn_about_labels(paths, summary, missing)
    log.info("%s", summary.text())
    return summary


def _inventory(
    input_dir: Path, labels: Labels, follow_external_links: bool
) -> tuple[list[str], dict[str, FileRecord]]:
    """Every entry of the input folder (sorted) and the records of the links not followed."""
    listing = source_files(input_dir, follow_external_links)
    records: dict[str, FileRecord] = {
        rel: FileRecord(file=rel, status=status, reason=reason)
        for rel, (status, reason) in listing.refused.items()
    }
    folders = tuple(f"{rel}/" for rel in listing.refused)
    for rel in labels.label:  # labelled files behind a link that is not followed
        if rel.startswith(folders) and rel not in records:
            records[rel] = FileRecord(file=rel, status="rejected", reason=UNDER_REFUSED_LINK)
    return sorted({*listing.files, *records}), records


def _process(
    paths: SitePaths,
    files: list[str],
    records: dict[str, FileRecord],
    labels: Labels,
    settings: Settings,
    secret: bytes,
    workers: int,
) -> None:
    """Triage every file, then process the rest (or reuse what an earlier run did), journalling
    each finished file so that an interrupted run resumes where it stopped."""
    cache = SiteCache(paths.cache(settings.image_size))
    cache.arrays_dir.mkdir(parents=True, exist_ok=True)
    paths.private_dir.mkdir(parents=True, exist_ok=True)
    journal_path = paths.work.preprocess_journal
    previous = previous_records(paths.work.source_index, journal_path)
    tasks = []
    for rel in files:
        if rel in records:
            continue
        triaged = _triage(rel, paths.input_dir / rel, labels.label)
        if triaged is None:
            tasks.append((rel, previous.get(rel)))
        else:
            records[rel] = triaged
    if workers > 1:  # largest first, so that no big file is left to one worker at the end
        tasks.sort(key=lambda task: -file_size(paths.input_dir / task[0]))
    worker = partial(process_file, input_dir=paths.input_dir, cache=cache, settings=settings, secret=secret)
    with open(journal_path, "a") as journal:
        for record in run_tasks(tasks, worker, workers, paths.name):
            records[record.file] = record
            if not record.reused:
                journal.write(json.dumps(vars(record)) + "\n")
                journal.flush()


def _key_patients(files: list[str], records: dict[str, FileRecord], labels: Labels, secret: bytes) -> None:
    """Key the patient of each accepted non-DICOM file: labels.csv's patient_id, else the file
    name's stem (DICOM files were keyed from their PatientID when read)."""
    for rel in files:
        record = records[rel]
        if record.status == "accepted" and record.format != "dicom":
            stem = labels.patient_id.get(rel, "")
            record.patient_key = patient_key(secret, stem.strip() or Path(rel).name.split(".")[0])


def _withdraw(records: dict[str, FileRecord], revoked: Collection[str]) -> None:
    """Reject the files of the patients whose consent is revoked."""
    for record in records.values():
        if record.status == "accepted" and record.patient_key in revoked:
            record.status, record.reason = "rejected", CONSENT_REVOKED


def _split(
    files: list[str], records: dict[str, FileRecord], labels: Labels, split_cfg: Mapping[str, Any]
) -> dict[str, str]:
    """Patient key -> split. Revoked patients still take part, so that no other patient changes
    split when one withdraws."""
    kept = [records[rel] for rel in files if records[rel].status == "accepted"]
    kept += [records[rel] for rel in files if records[rel].reason == CONSENT_REVOKED]
    return assign_splits(
        patient_labels((r.patient_key, label_index(labels.label[r.file])) for r in kept),
        float(split_cfg["val_fraction"]),
        float(split_cfg["test_fraction"]),
        int(split_cfg["seed"]),
    )


def _write_manifest(
    cache_dir: Path, ordered: list[FileRecord], labels: Labels, split_of: dict[str, str], settings: Settings
) -> pd.DataFrame:
    """Write the cache manifest of the accepted files and remove arrays no row names."""
    manifest = pd.DataFrame(
        [
            {
                "image_key": r.image_key,
                "patient_key": r.patient_key,
                "label": label_index(labels.label[r.file]),
                "split": split_of[r.patient_key],
                "preprocessing_version": settings.version,
                "image_size": settings.image_size,
                "source_rows": r.rows,
                "source_cols": r.cols,
                "pixel_spacing_mm": r.pixel_spacing_mm,
                "bits_stored": r.bits_stored,
                **{column: getattr(r, column) for column in SUBGROUP_COLUMNS},
            }
            for r in ordered
            if r.status == "accepted"
        ],
        columns=list(MANIFEST_COLUMNS),
    ).sort_values("image_key")
    cache = SiteCache(cache_dir)
    write_csv(cache.manifest_path, manifest)
    keep = set(manifest["image_key"])
    for stale in cache.array_files():
        if stale.stem not in keep:
            stale.unlink()
    return manifest


def _index_table(ordered: list[FileRecord]) -> pd.DataFrame:
    """The source index: every file's record (the site's memory for the next run)."""
    return pd.DataFrame(
        [{k: v for k, v in vars(r).items() if k != "reused"} for r in ordered],
        columns=[f.name for f in fields(FileRecord) if f.name != "reused"],
    )


def _report_table(
    ordered: list[FileRecord], missing: list[str], labels: Labels, split_of: dict[str, str]
) -> pd.DataFrame:
    """The report: every file with its status and reason, and labelled files not found."""
    rows = [
        {
            "file": r.file,
            "status": r.status,
            "reason": r.reason,
            "reused": r.reused,
            "label": labels.label.get(r.file, ""),
            "split": split_of.get(r.patient_key, "") if r.status == "accepted" else "",
        }
        for r in ordered
    ]
    rows += [
        {
            "file": rel,
            "status": "missing",
            "reason": "listed in labels.csv but not found",
            "reused": False,
            "label": labels.label[rel],
            "split": "",
        }
        for rel in missing
    ]
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def _warn_about_labels(paths: SitePaths, summary: PreprocessSummary, missing: list[str]) -> None:
    """Counts only: no file names in logs, which may leave the site."""
    report = paths.work.preprocess_report
    if missing:
        log.warning(
            "%s: %d files listed in %s were not found (their rows in %s say which)",
            paths.name,
            len(missing),
            paths.labels_csv,
            report,
        )
    unlabelled = summary.rejections.get("no label in labels.csv", 0)
    if unlabelled:
        log.warning(
            "%s: %d files have no row in %s (see %s)", paths.name, unlabelled, paths.labels_csv, report
        )


def _summarise(
    site: str, ordered: list[FileRecord], missing: list[str], manifest: pd.DataFrame, seconds: float
) -> PreprocessSummary:
    status = Counter(r.status for r in ordered)
    if missing:
        status["missing"] = len(missing)
    images: dict[str, dict[str, int]] = {}
    for (split, label), n in manifest.groupby(["split", "label"]).size().items():
        images.setdefault(split, {})[CLASS_NAMES[label]] = int(n)
    reused = sum(r.reused for r in ordered)
    processed = sum(1 for r in ordered if r.sha256 and not r.reused)
    return PreprocessSummary(
        site=site,
        files=len(ordered),
        processed=processed,
        reused=reused,
        status=dict(status),
        images=images,
        rejections=dict(Counter(r.reason for r in ordered if r.status == "rejected")),
        patients=int(manifest["patient_key"].nunique()),
        seconds=seconds,
    )
