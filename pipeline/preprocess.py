"""Turn one site's source images into its identifier-free training cache.

For every file under ``input_dir``: hash it, skip it when it was already processed with
the same content and settings, otherwise read -> accept -> DICOM pixel transforms ->
resize -> write ``cache/arrays/<image_key>.npy``. Then split patients into train / val /
test and write three tables:

- ``cache/manifest.csv``: pseudonymous keys, label, split and technical columns only;
- ``private/source_index.csv``: site-only link from source file to keys (and the rerun memory);
- ``report.csv``: every file with its status (accepted / rejected / skipped, or missing for
  labels naming absent files) and the reason.

Source files are only read. Every output is written atomically, and a rerun over the same
inputs reproduces the cache byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.acceptance import AcceptanceRules, rejection_reason
from pipeline.cache import ARRAYS_DIR, MANIFEST_NAME, SPLITS
from pipeline.files import atomic_write
from pipeline.labels import CLASS_NAMES, label_index
from pipeline.pseudonym import ensure_secret, file_sha256, image_key, load_secret, patient_key
from pipeline.readers import UnreadableImage, image_format, read_image
from pipeline.sites import SitePaths
from pipeline.splits import assign_splits, patient_labels
from transforms.dicom import dicom_to_unit
from transforms.image import resize_square

log = logging.getLogger("fedrad.preprocess")

INDEX_NAME = "source_index.csv"
REPORT_NAME = "report.csv"
LABEL_COLUMNS = ("file", "label")


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs to process one file (picklable)."""

    version: str
    image_size: int
    rules: AcceptanceRules

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Settings":
        size = int(cfg["image_size"])
        return cls(version=f"v{cfg['version']}-{size}px", image_size=size,
                   rules=AcceptanceRules.from_config(cfg["acceptance"]))

    @property
    def rules_id(self) -> str:
        """Fingerprint of the acceptance rules: changing them re-evaluates every file."""
        return hashlib.sha256(repr(self.rules).encode()).hexdigest()[:12]


@dataclass
class FileRecord:
    """One source file's outcome; the rows of ``private/source_index.csv``."""

    file: str
    status: str
    reason: str = ""
    sha256: str = ""
    image_key: str = ""
    patient_key: str = ""
    format: str = ""
    version: str = ""
    rules: str = ""
    rows: int = 0
    cols: int = 0
    bits_stored: int = 0
    pixel_spacing_mm: float = float("nan")
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

    def text(self) -> str:
        """A few lines for a human: counts per class and split, rejections by reason."""
        lines = [
            f"site {self.site}: {self.files} files, {self.processed} processed, "
            f"{self.reused} unchanged; " + ", ".join(f"{k} {v}" for k, v in sorted(self.status.items())),
            f"  {self.patients} patients; images per split: "
            + "; ".join(
                f"{split} " + " ".join(f"{c}={self.images.get(split, {}).get(c, 0)}" for c in CLASS_NAMES)
                for split in SPLITS
            ),
        ]
        lines += [f"  rejected {n}x: {reason}" for reason, n in sorted(self.rejections.items())]
        return "\n".join(lines)


def read_labels(labels_csv: Path) -> pd.DataFrame:
    """The labels table (``file``, ``label``, optional ``patient_id``), one row per file."""
    if not labels_csv.is_file():
        raise FileNotFoundError(f"labels file {labels_csv} not found: expected columns file,label")
    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{labels_csv} lacks columns {missing}: expected file,label[,patient_id]")
    table["file"] = table["file"].str.strip().str.replace("\\", "/", regex=False)
    duplicated = table["file"][table["file"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{labels_csv}: files listed more than once: {duplicated[:5]}; keep one row each")
    return table.set_index("file")


def source_files(input_dir: Path) -> list[str]:
    """Paths (posix, relative to ``input_dir``) of all non-hidden files, sorted."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} not found: check the site's input_dir")
    return sorted(
        p.relative_to(input_dir).as_posix()
        for p in input_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)
    )


def _save_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32), allow_pickle=False)
    atomic_write(path, buffer.getvalue())


def process_file(
    task: tuple[str, dict[str, Any] | None], *, input_dir: Path, arrays_dir: Path,
    settings: Settings, secret: bytes,
) -> FileRecord:
    """Process one labelled source file, or reuse its previous record when nothing changed."""
    rel, previous = task
    sha = file_sha256(input_dir / rel)
    key = image_key(secret, sha)
    if (
        previous is not None
        and previous["sha256"] == sha
        and previous["version"] == settings.version
        and previous["rules"] == settings.rules_id
        and (previous["status"] != "accepted" or (arrays_dir / f"{key}.npy").is_file())
    ):
        return FileRecord(**{**previous, "reused": True})
    record = FileRecord(file=rel, status="rejected", sha256=sha, version=settings.version,
                        rules=settings.rules_id)
    try:
        loaded = read_image(input_dir / rel)
    except UnreadableImage as error:
        record.reason = str(error)
        return record
    meta = loaded.meta
    record.format = meta["format"]
    record.rows, record.cols = meta["rows"], meta["cols"]
    record.bits_stored = meta["bits_stored"] or 0
    record.pixel_spacing_mm = meta["pixel_spacing_mm"] or float("nan")
    record.reason = rejection_reason(meta, settings.rules) or ""
    if not record.reason and meta["format"] == "dicom" and not meta["patient_id"]:
        record.reason = "PatientID missing"
    if record.reason:
        return record
    if meta["patient_id"]:
        record.patient_key = patient_key(secret, meta["patient_id"])
    image = resize_square(dicom_to_unit(loaded.pixels, loaded.dicom), settings.image_size)
    _save_array(arrays_dir / f"{key}.npy", image)
    record.status, record.image_key = "accepted", key
    return record


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _run_tasks(tasks: list, worker, workers: int, site: str) -> list[FileRecord]:
    bar = tqdm(total=len(tasks), unit="file", desc=f"preprocess {site}", leave=False)
    with bar:
        if workers <= 1:
            results = []
            for task in tasks:
                results.append(worker(task))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
            results = []
            for record in pool.map(worker, tasks, chunksize=4):
                results.append(record)
                bar.update()
            return results


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype={"file": str, "sha256": str, "image_key": str,
                                     "patient_key": str, "reason": str, "format": str,
                                     "version": str, "rules": str}, keep_default_na=False,
                        na_values={"pixel_spacing_mm": [""]})
    names = {f.name for f in fields(FileRecord)}
    return {row["file"]: {k: v for k, v in row.items() if k in names}
            for row in table.to_dict("records")}


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    atomic_write(path, table.to_csv(index=False, lineterminator="\n").encode())


def preprocess_site(paths: SitePaths, cfg: Mapping[str, Any]) -> PreprocessSummary:
    """Preprocess one site (``cfg`` is the ``preprocess`` config node) and return its summary.

    Creates the site secret when the site has none yet (logged as a warning).
    """
    settings = Settings.from_config(cfg)
    ensure_secret(paths.secret_file)
    secret = load_secret(paths.secret_file)
    labels = read_labels(paths.labels_csv)
    files = source_files(paths.input_dir)
    arrays_dir = paths.cache_dir / ARRAYS_DIR
    arrays_dir.mkdir(parents=True, exist_ok=True)
    index_path = paths.private_dir / INDEX_NAME
    previous = _read_index(index_path)

    records: dict[str, FileRecord] = {}
    tasks = []
    for rel in files:
        if image_format(paths.input_dir / rel) is None:
            records[rel] = FileRecord(file=rel, status="skipped", reason="not an image file")
        elif rel not in labels.index:
            records[rel] = FileRecord(file=rel, status="rejected", reason="no label in labels.csv")
        elif labels.at[rel, "label"].strip().lower() not in CLASS_NAMES:
            records[rel] = FileRecord(file=rel, status="rejected",
                                      reason=f"unknown label {labels.at[rel, 'label']!r}")
        else:
            tasks.append((rel, previous.get(rel)))
    worker = partial(process_file, input_dir=paths.input_dir, arrays_dir=arrays_dir,
                     settings=settings, secret=secret)
    for record in _run_tasks(tasks, worker, int(cfg.get("workers", 1)), paths.name):
        records[record.file] = record

    seen: dict[str, str] = {}
    for rel in files:
        record = records[rel]
        if record.status != "accepted":
            continue
        if record.image_key in seen:
            record.status, record.reason = "rejected", f"same content as {seen[record.image_key]}"
            continue
        seen[record.image_key] = rel
        if record.format != "dicom":
            stem = labels.at[rel, "patient_id"] if "patient_id" in labels.columns else ""
            record.patient_key = patient_key(secret, stem.strip() or Path(rel).name.split(".")[0])

    accepted = [records[rel] for rel in files if records[rel].status == "accepted"]
    label_of = {r.file: label_index(labels.at[r.file, "label"]) for r in accepted}
    split_cfg = cfg["split"]
    split_of = assign_splits(
        patient_labels((r.patient_key, label_of[r.file]) for r in accepted),
        float(split_cfg["val_fraction"]), float(split_cfg["test_fraction"]), int(split_cfg["seed"]),
    )
    manifest = pd.DataFrame(
        [{
            "image_key": r.image_key, "patient_key": r.patient_key, "label": label_of[r.file],
            "split": split_of[r.patient_key], "preprocessing_version": settings.version,
            "image_size": settings.image_size, "source_rows": r.rows, "source_cols": r.cols,
            "pixel_spacing_mm": r.pixel_spacing_mm, "bits_stored": r.bits_stored,
        } for r in accepted],
        columns=["image_key", "patient_key", "label", "split", "preprocessing_version", "image_size",
                 "source_rows", "source_cols", "pixel_spacing_mm", "bits_stored"],
    ).sort_values("image_key")
    _write_csv(paths.cache_dir / MANIFEST_NAME, manifest)
    keep = set(manifest["image_key"])
    for stale in arrays_dir.glob("*.npy"):
        if stale.stem not in keep:
            stale.unlink()

    ordered = [records[rel] for rel in files]
    index = pd.DataFrame([{k: v for k, v in asdict(r).items() if k != "reused"} for r in ordered],
                         columns=[f.name for f in fields(FileRecord) if f.name != "reused"])
    _write_csv(index_path, index)
    missing = sorted(set(labels.index) - set(files))
    for rel in missing:
        log.warning("%s: %s is listed in %s but not found", paths.name, rel, paths.labels_csv)
    report = pd.DataFrame(
        [{"file": r.file, "status": r.status, "reason": r.reason, "reused": r.reused,
          "label": labels.at[r.file, "label"] if r.file in labels.index else "",
          "split": split_of.get(r.patient_key, "") if r.status == "accepted" else ""}
         for r in ordered]
        + [{"file": rel, "status": "missing", "reason": "listed in labels.csv but not found",
            "reused": False, "label": labels.at[rel, "label"], "split": ""} for rel in missing],
        columns=["file", "status", "reason", "reused", "label", "split"],
    )
    _write_csv(paths.work_dir / REPORT_NAME, report)

    summary = _summarise(paths.name, ordered, missing, manifest)
    unlabelled = summary.rejections.get("no label in labels.csv", 0)
    if unlabelled:
        log.warning("%s: %d files have no row in %s (see %s)", paths.name, unlabelled,
                    paths.labels_csv, paths.work_dir / REPORT_NAME)
    log.info("%s", summary.text())
    return summary


def _summarise(site: str, ordered: list[FileRecord], missing: list[str],
               manifest: pd.DataFrame) -> PreprocessSummary:
    status = Counter(r.status for r in ordered)
    if missing:
        status["missing"] = len(missing)
    images: dict[str, dict[str, int]] = {}
    for (split, label), n in manifest.groupby(["split", "label"]).size().items():
        images.setdefault(split, {})[CLASS_NAMES[label]] = int(n)
    reused = sum(r.reused for r in ordered)
    processed = sum(1 for r in ordered if r.sha256 and not r.reused)
    return PreprocessSummary(
        site=site, files=len(ordered), processed=processed, reused=reused,
        status=dict(status), images=images,
        rejections=dict(Counter(r.reason for r in ordered if r.status == "rejected")),
        patients=int(manifest["patient_key"].nunique()),
    )


def site_from_config(node: Mapping[str, Any]) -> SitePaths:
    """SitePaths from a ``conf/site/*.yaml`` node with explicit paths (a deployed site)."""
    return SitePaths(
        name=str(node["name"]), input_dir=Path(node["input_dir"]),
        labels_csv=Path(node["labels_csv"]), work_dir=Path(node["work_dir"]),
        secret_file=Path(node["secret_file"]),
    )


def configured_sites(cfg: Mapping[str, Any]) -> list[SitePaths]:
    """The site chosen with ``+site=<name>``, else every ``data.sites`` under ``data.sites_root``."""
    if cfg.get("site"):
        return [site_from_config(cfg["site"])]
    return [SitePaths.under(cfg["data"]["sites_root"], name) for name in cfg["data"]["sites"]]


def preprocess_sites(cfg: Mapping[str, Any]) -> list[PreprocessSummary]:
    """Preprocess every configured site (see :func:`configured_sites`) with ``cfg.preprocess``."""
    return [preprocess_site(site, cfg["preprocess"]) for site in configured_sites(cfg)]
