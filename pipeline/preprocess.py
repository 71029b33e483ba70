"""Turn one site's source images into its identifier-free training cache.

For every file under ``input_dir``: read its bytes once, hash them, skip the file when it
was already processed with the same content and settings, otherwise read the header ->
accept (header only, nothing rejected is decoded) -> decode -> DICOM pixel transforms ->
resize -> write ``cache/arrays/<image_key>.npy``. Then split patients into train / val /
test and write three tables:

- ``cache/manifest.csv``: pseudonymous keys, label, split and technical columns only;
- ``private/source_index.csv``: site-only link from source file to keys (and the rerun memory);
- ``report.csv`` (site-only): every file with its status (accepted / rejected / skipped, or
  missing for labels naming absent files) and the reason.

Hostile inputs: any failure reading, decoding or transforming one file rejects that file
with a reason and the site goes on (a worker process that dies is replaced, and the file
it was on is rejected). Symbolic links (files or folders) that resolve outside the input
folder are rejected unless ``follow_external_links`` is true; a link to a folder inside it
is skipped (its files are listed under their own path); every such entry has a report
row. Every CSV is written with spreadsheet formulas neutralised (``pipeline.files``), and
log lines, which may leave the site (a simulation's coordinator log), name no source file:
they give counts and point to ``report.csv``.

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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.acceptance import AcceptanceRules, rejection_reason
from pipeline.cache import ARRAYS_DIR, MANIFEST_NAME, SPLITS
from pipeline.files import read_csv, write_csv
from pipeline.governance.revocation import CONSENT_REVOKED, revoked_patients
from pipeline.labels import CLASS_NAMES, label_index, read_labels
from pipeline.pseudonym import ensure_secret, image_key, keyed_hash, load_secret, patient_key
from pipeline.readers import (
    MB,
    UnreadableImage,
    image_format,
    not_image_reason,
    open_image,
    special_file_reason,
)
from pipeline.sites import SitePaths
from pipeline.splits import assign_splits, patient_labels
from transforms.dicom import PixelTransformError, dicom_to_unit_square

log = logging.getLogger("fedrad.preprocess")

INDEX_NAME = "source_index.csv"
PROGRESS_NAME = "progress.jsonl"
REPORT_NAME = "report.csv"
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
)
REPORT_COLUMNS = ("file", "status", "reason", "reused", "label", "split")
EXTERNAL_LINK = (
    "symbolic link to a {kind} outside the input folder: not followed "
    "(preprocess.follow_external_links is false)"
)
INTERNAL_FOLDER_LINK = (
    "symbolic link to a folder inside the input folder: its files are listed under their own path"
)
LINK_LOOP = "symbolic link to a folder already listed (a loop or a second path to it): not followed"
UNDER_REFUSED_LINK = "inside a linked folder that is not followed (see the folder's own row)"
WORKER_DIED = (
    "the worker process died while processing this file (a decoder crash or the out-of-memory killer)"
)
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
class FileRecord:
    """One source file's outcome; the rows of ``private/source_index.csv``.

    ``sop_key`` is a keyed hash of the SOPInstanceUID (the UID itself is never stored).
    ``duplicate_of`` names the file this one duplicates (then it is rejected although it
    was processed; the decision is made again on every run).
    """

    file: str
    status: str
    reason: str = ""
    sha256: str = ""
    image_key: str = ""
    patient_key: str = ""
    sop_key: str = ""
    format: str = ""
    version: str = ""
    rules: str = ""
    rows: int = 0
    cols: int = 0
    frames: int = 0
    bits_stored: int = 0
    pixel_spacing_mm: float = float("nan")
    duplicate_of: str = ""
    reused: bool = False


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


@dataclass
class SourceListing:
    """The entries of an input folder: ``files`` (posix paths relative to it, sorted), and
    ``refused``: the links that are not followed, each with its (status, reason)."""

    files: list[str]
    refused: dict[str, tuple[str, str]]


def source_files(input_dir: Path, follow_external_links: bool = False) -> SourceListing:
    """Every non-hidden entry under ``input_dir`` that is not a folder, and every link not followed.

    Broken links, FIFOs and other special entries are listed too, so that the report
    accounts for them instead of silently dropping them. A symbolic link (to a file or a
    folder) whose target lies outside ``input_dir`` is refused unless
    ``follow_external_links``; a link to a folder inside it is not followed (its files are
    listed under their real path), nor is a link to a folder already listed (loops).
    """
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} not found: check the site's input_dir")
    root = os.path.realpath(input_dir)
    files: list[str] = []
    refused: dict[str, tuple[str, str]] = {}
    followed = {root}

    def inside(target: str) -> bool:
        return target == root or target.startswith(root.rstrip(os.sep) + os.sep)

    def walk(folder: str, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            if not prefix:
                raise
            refused[prefix.rstrip("/")] = (
                "rejected",
                f"unreadable folder: {type(error).__name__} ({error.strerror})",
            )
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                is_folder = os.path.isdir(target)
                if not inside(target) and not follow_external_links:
                    refused[rel] = ("rejected", EXTERNAL_LINK.format(kind="folder" if is_folder else "file"))
                elif not is_folder:
                    files.append(rel)
                elif inside(target):
                    refused[rel] = ("skipped", INTERNAL_FOLDER_LINK)
                elif target in followed:
                    refused[rel] = ("rejected", LINK_LOOP)
                else:
                    followed.add(target)
                    walk(entry.path, rel + "/")
            elif entry.is_dir(follow_symlinks=False):
                walk(entry.path, rel + "/")
            else:
                files.append(rel)

    walk(root, "")
    return SourceListing(files=sorted([*files, *refused]), refused=refused)


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


def _describe(record: FileRecord, meta: Mapping[str, Any], secret: bytes) -> None:
    """Copy the header facts the index and manifest keep; identifiers only as keyed hashes."""
    record.format = meta["format"]
    record.rows, record.cols = meta["rows"], meta["cols"]
    record.frames = meta["number_of_frames"]
    record.bits_stored = meta["bits_stored"] or 0
    record.pixel_spacing_mm = meta["pixel_spacing_mm"] or float("nan")
    if meta["sop_instance_uid"]:
        record.sop_key = keyed_hash(secret, "sop-instance", meta["sop_instance_uid"])
    if meta["patient_id"]:
        record.patient_key = patient_key(secret, meta["patient_id"])


def process_file(
    task: tuple[str, dict[str, Any] | None],
    *,
    input_dir: Path,
    arrays_dir: Path,
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
    if previous is not None and _reusable(previous, sha, settings, arrays_dir / f"{key}.npy"):
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
        _describe(record, source.meta, secret)
        record.reason = rejection_reason(source.meta, settings.rules) or ""
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
    _write_array(arrays_dir / f"{key}.npy", image)
    record.status, record.image_key = "accepted", key
    return record


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


MIN_TASKS_PER_WORKER = 4


def _run_tasks(
    tasks: list, worker: Callable[[Any], FileRecord], workers: int, site: str
) -> Iterator[FileRecord]:
    """Yield each task's record as it completes (in task order), with a files/s progress bar.

    A pool is only started when every worker gets at least MIN_TASKS_PER_WORKER files;
    tasks go to the workers in chunks so that the pool's overhead stays small. When a
    worker process dies (a decoder crash, the out-of-memory killer), the files not yet
    returned are processed again one at a time, each in a process of its own, and the file
    whose process dies is rejected (in-process, with one worker, a crash ends the run).
    """
    workers = min(workers, len(tasks) // MIN_TASKS_PER_WORKER)
    with tqdm(total=len(tasks), unit="file", desc=f"preprocess {site}", mininterval=1.0) as bar:
        if workers <= 1:
            for task in tasks:
                yield worker(task)
                bar.update()
            return
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        done = 0
        try:
            with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
                for record in pool.map(worker, tasks, chunksize=chunk):
                    yield record
                    done += 1
                    bar.update()
        except BrokenProcessPool:
            log.warning(
                "%s: a worker process died; processing the other %d files one at a time",
                site,
                len(tasks) - done,
            )
            for task in tasks[done:]:
                yield _isolated(worker, task)
                bar.update()


def _isolated(worker: Callable[[Any], FileRecord], task: tuple[str, Any]) -> FileRecord:
    """``worker(task)`` in a process of its own; a rejection when that process dies."""
    with ProcessPoolExecutor(max_workers=1, initializer=_worker_init) as pool:
        try:
            return pool.submit(worker, task).result()
        except BrokenProcessPool:
            return FileRecord(file=task[0], status="rejected", reason=WORKER_DIED)


def _file_size(path: Path) -> int:
    """Size of ``path`` in bytes (0 when it cannot be read: the worker reports why)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    text_columns = (
        "file",
        "status",
        "sha256",
        "image_key",
        "patient_key",
        "sop_key",
        "reason",
        "format",
        "version",
        "rules",
        "duplicate_of",
    )
    table = read_csv(
        path,
        dtype=dict.fromkeys(text_columns, str),
        keep_default_na=False,
        na_values={"pixel_spacing_mm": [""]},
    )
    names = {f.name for f in fields(FileRecord)}
    return {row["file"]: {k: v for k, v in row.items() if k in names} for row in table.to_dict("records")}


def _read_progress(path: Path) -> dict[str, dict[str, Any]]:
    """Records an interrupted run finished (a torn last line is ignored)."""
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[row["file"]] = row
    return records


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


def preprocess_site(paths: SitePaths, cfg: Mapping[str, Any]) -> PreprocessSummary:
    """Preprocess one site (``cfg`` is the ``preprocess`` config node) and return its summary.

    Creates the site secret when the site has none yet (logged as a warning). Raises
    ``pipeline.labels.LabelsError`` (one line) when labels.csv is unusable.
    """
    started = time.perf_counter()
    settings = Settings.from_config(cfg)
    ensure_secret(paths.secret_file)
    secret = load_secret(paths.secret_file)
    table = read_labels(paths.labels_csv)
    labels: dict[str, str] = table["label"].to_dict()
    patient_ids: dict[str, str] = table["patient_id"].to_dict() if "patient_id" in table.columns else {}
    listing = source_files(paths.input_dir, bool(cfg.get("follow_external_links", False)))
    records: dict[str, FileRecord] = {
        rel: FileRecord(file=rel, status=status, reason=reason)
        for rel, (status, reason) in listing.refused.items()
    }
    folders = tuple(f"{rel}/" for rel in listing.refused)
    for rel in labels:  # labelled files behind a link that is not followed
        if rel.startswith(folders) and rel not in records:
            records[rel] = FileRecord(file=rel, status="rejected", reason=UNDER_REFUSED_LINK)
    files = sorted({*listing.files, *records})
    arrays_dir = paths.cache_dir / ARRAYS_DIR
    arrays_dir.mkdir(parents=True, exist_ok=True)
    paths.private_dir.mkdir(parents=True, exist_ok=True)
    index_path = paths.private_dir / INDEX_NAME
    progress_path = paths.private_dir / PROGRESS_NAME
    previous = {**_read_index(index_path), **_read_progress(progress_path)}

    tasks = []
    for rel in files:
        if rel in records:
            continue
        triaged = _triage(rel, paths.input_dir / rel, labels)
        if triaged is None:
            tasks.append((rel, previous.get(rel)))
        else:
            records[rel] = triaged
    workers = int(cfg.get("workers", 1))
    if workers > 1:  # largest first, so that no big file is left to one worker at the end
        tasks.sort(key=lambda task: -_file_size(paths.input_dir / task[0]))
    worker = partial(
        process_file, input_dir=paths.input_dir, arrays_dir=arrays_dir, settings=settings, secret=secret
    )
    with open(progress_path, "a") as journal:
        for record in _run_tasks(tasks, worker, workers, paths.name):
            records[record.file] = record
            if not record.reused:
                journal.write(json.dumps(vars(record)) + "\n")
                journal.flush()

    _reject_duplicates(files, records)
    for rel in files:
        record = records[rel]
        if record.status == "accepted" and record.format != "dicom":
            stem = patient_ids.get(rel, "")
            record.patient_key = patient_key(secret, stem.strip() or Path(rel).name.split(".")[0])

    revoked = revoked_patients(paths.work_dir)
    for record in records.values():
        if record.status == "accepted" and record.patient_key in revoked:
            record.status, record.reason = "rejected", CONSENT_REVOKED
    accepted = [records[rel] for rel in files if records[rel].status == "accepted"]
    # Revoked patients still take part in the split, so that no other patient changes split.
    withdrawn = [records[rel] for rel in files if records[rel].reason == CONSENT_REVOKED]
    label_of = {r.file: label_index(labels[r.file]) for r in accepted + withdrawn}
    split_cfg = cfg["split"]
    split_of = assign_splits(
        patient_labels((r.patient_key, label_of[r.file]) for r in accepted + withdrawn),
        float(split_cfg["val_fraction"]),
        float(split_cfg["test_fraction"]),
        int(split_cfg["seed"]),
    )
    manifest = pd.DataFrame(
        [
            {
                "image_key": r.image_key,
                "patient_key": r.patient_key,
                "label": label_of[r.file],
                "split": split_of[r.patient_key],
                "preprocessing_version": settings.version,
                "image_size": settings.image_size,
                "source_rows": r.rows,
                "source_cols": r.cols,
                "pixel_spacing_mm": r.pixel_spacing_mm,
                "bits_stored": r.bits_stored,
            }
            for r in accepted
        ],
        columns=list(MANIFEST_COLUMNS),
    ).sort_values("image_key")
    write_csv(paths.cache_dir / MANIFEST_NAME, manifest)
    keep = set(manifest["image_key"])
    for stale in arrays_dir.glob("*.npy"):
        if stale.stem not in keep:
            stale.unlink()

    ordered = [records[rel] for rel in files]
    index = pd.DataFrame(
        [{k: v for k, v in vars(r).items() if k != "reused"} for r in ordered],
        columns=[f.name for f in fields(FileRecord) if f.name != "reused"],
    )
    write_csv(index_path, index)
    progress_path.unlink(missing_ok=True)
    missing = sorted(set(labels) - set(files))
    if missing:  # no file names in logs: they may leave the site
        log.warning(
            "%s: %d files listed in %s were not found (their rows in %s say which)",
            paths.name,
            len(missing),
            paths.labels_csv,
            paths.work_dir / REPORT_NAME,
        )
    report = pd.DataFrame(
        [
            {
                "file": r.file,
                "status": r.status,
                "reason": r.reason,
                "reused": r.reused,
                "label": labels.get(r.file, ""),
                "split": split_of.get(r.patient_key, "") if r.status == "accepted" else "",
            }
            for r in ordered
        ]
        + [
            {
                "file": rel,
                "status": "missing",
                "reason": "listed in labels.csv but not found",
                "reused": False,
                "label": labels[rel],
                "split": "",
            }
            for rel in missing
        ],
        columns=list(REPORT_COLUMNS),
    )
    write_csv(paths.work_dir / REPORT_NAME, report)

    summary = _summarise(paths.name, ordered, missing, manifest, time.perf_counter() - started)
    unlabelled = summary.rejections.get("no label in labels.csv", 0)
    if unlabelled:
        log.warning(
            "%s: %d files have no row in %s (see %s)",
            paths.name,
            unlabelled,
            paths.labels_csv,
            paths.work_dir / REPORT_NAME,
        )
    log.info("%s", summary.text())
    return summary


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


def site_from_config(node: Mapping[str, Any]) -> SitePaths:
    """SitePaths from a ``conf/site/*.yaml`` node with explicit paths (a deployed site)."""
    return SitePaths(
        name=str(node["name"]),
        input_dir=Path(node["input_dir"]),
        labels_csv=Path(node["labels_csv"]),
        work_dir=Path(node["work_dir"]),
        secret_file=Path(node["secret_file"]),
    )


def configured_sites(cfg: Mapping[str, Any]) -> list[SitePaths]:
    """The site chosen with ``+site=<name>``, else every ``data.sites`` under ``data.sites_root``."""
    if cfg.get("site"):
        return [site_from_config(cfg["site"])]
    return SitePaths.of_data(cfg["data"])


def preprocess_sites(cfg: Mapping[str, Any]) -> list[PreprocessSummary]:
    """Preprocess every configured site (see :func:`configured_sites`) with ``cfg.preprocess``."""
    return [preprocess_site(site, cfg["preprocess"]) for site in configured_sites(cfg)]
