"""Consent revocation: a patient's images leave the site's cache and every later round.

The site operator names the patient by the hospital's own PatientID; it is turned into the
pseudonymous key with the site secret at once and never stored. Revoking a patient

1. writes the cache manifest without the patient's rows (atomically), then deletes their arrays;
2. adds the key to ``<work dir>/private/revoked_patients.txt``, which preprocessing consults, so
   that a rerun never adds the images back;
3. appends a ``revocation`` entry (patient key, images removed, rounds that included the
   patient) to the site's signed ledger;

all under the site's round lock (:func:`pipeline.governance.rounds.round_lock`): a revocation
during a round waits for it, so the round in flight is listed too, and every later round reads
the cache without the patient. A stored update that trained on the patient is never sent again.
4. reports which ``run:round`` trained on the patient and which global models the site
   received after those rounds (models that include its updates from the patient's images,
   up to the last model of each run, which the site receives to evaluate).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.files import atomic_write
from pipeline.contracts.layout import SitePaths, WorkDir, configured_sites
from pipeline.governance.rounds import round_key, round_lock, trained_patients
from pipeline.governance.site_ledger import SiteLedger
from pipeline.ingestion.preprocess import PreprocessSummary, preprocess_site
from pipeline.ingestion.pseudonym import load_secret, patient_key


@dataclass(frozen=True)
class ModelVersion:
    """A model the site saw in a run: the global model it received, or its own update."""

    run: str
    round: int
    sha256: str
    kind: str  # "global model received" or "site update sent"


@dataclass
class Revocation:
    """What revoking one patient did and which training included them."""

    patient_key: str
    images_removed: int
    rounds: list[str] = field(default_factory=list)
    models: list[ModelVersion] = field(default_factory=list)

    def text(self) -> str:
        """A few lines for the site operator (pseudonymous key only)."""
        lines = [
            f"patient {self.patient_key}: {self.images_removed} images removed from the cache; "
            "excluded from every later round and preprocessing run"
        ]
        if not self.rounds:
            return "\n".join(lines + ["no recorded round trained on this patient"])
        lines.append(f"rounds that trained on this patient: {', '.join(self.rounds)}")
        lines += [f"  {m.run}:{m.round}  {m.kind}  {m.sha256}" for m in self.models]
        return "\n".join(lines)


def revoked_patients(work_dir: Path) -> set[str]:
    """Pseudonymous keys of every patient whose consent this site has revoked."""
    path = WorkDir(Path(work_dir)).revoked_patients
    return set(path.read_text().split()) if path.is_file() else set()


def _known_patient(site: SitePaths, key: str) -> bool:
    """Whether any preprocessed source file of the site belongs to the patient ``key``."""
    index = site.work.source_index
    if not index.is_file():
        raise FileNotFoundError(f"no {index}: preprocess the site before revoking a patient")
    with index.open(newline="") as handle:
        return any(row["patient_key"] == key for row in csv.DictReader(handle))


def _drop_from_manifest(cache_dir: Path, key: str) -> list[str]:
    """Rewrite the manifest without the patient's rows (other lines byte for byte);
    returns the image keys of the rows removed."""
    path = SiteCache(cache_dir).manifest_path
    lines = path.read_text().splitlines(keepends=True)
    header = next(csv.reader(lines[:1]))
    key_col, image_col = header.index("patient_key"), header.index("image_key")
    kept, removed = lines[:1], []
    for line, row in zip(lines[1:], csv.reader(lines[1:])):
        if row[key_col] == key:
            removed.append(row[image_col])
        else:
            kept.append(line)
    if removed:
        atomic_write(path, "".join(kept).encode())
    return removed


def _models_including(work_dir: Path, rounds: list[str]) -> list[ModelVersion]:
    """The site's own updates from ``rounds``, and every global model it received (to train or to
    evaluate) that aggregated one of them, from its ledger; each model once."""
    first: dict[str, int] = {}
    for key in rounds:
        run, number = key.rsplit(":", 1)
        first[run] = min(first.get(run, int(number)), int(number))
    models: dict[str, ModelVersion] = {}
    for entry in SiteLedger.for_site(work_dir).entries():
        kind, body = entry["kind"], entry["body"]
        if kind not in ("round", "evaluation") or body.get("run") not in first:
            continue
        run, number = body["run"], body["round"]
        if kind == "round" and round_key(run, number) in rounds:
            models.setdefault(
                body["update_sha256"], ModelVersion(run, number, body["update_sha256"], "site update sent")
            )
        aggregated = number > first[run] if kind == "round" else number >= first[run]
        if aggregated:
            sha = body["global_model_sha256"]
            models.setdefault(sha, ModelVersion(run, number, sha, "global model received"))
    return list(models.values())


def revoke_patient(site: SitePaths, patient_id: str) -> Revocation:
    """Revoke the consent of the patient with the hospital's ``patient_id`` at ``site``."""
    key = patient_key(load_secret(site.secret_file), patient_id.strip())
    if not _known_patient(site, key) and key not in revoked_patients(site.work_dir):
        raise ValueError(
            f"site {site.name} has no image of this patient (key {key}): check the PatientID "
            f"(it is the source files' PatientID, or the labels' patient_id column)"
        )
    waiting = (
        f"site {site.name}: a round is in progress; the revocation waits for it to finish "
        "and then lists it among the rounds that trained on the patient"
    )
    with round_lock(site.work_dir, waiting=waiting):
        images: set[str] = set()
        for cache in site.work.caches():  # every image size the site has preprocessed
            dropped = _drop_from_manifest(cache, key)
            for image in dropped:
                SiteCache(cache).array_path(image).unlink(missing_ok=True)
            images.update(dropped)
        if key not in revoked_patients(site.work_dir):
            site.private_dir.mkdir(parents=True, exist_ok=True)
            with site.work.revoked_patients.open("a") as handle:
                handle.write(key + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        rounds = [k for k, patients in trained_patients(site.work_dir).items() if key in patients]
        SiteLedger.for_site(site.work_dir).append(
            "revocation", {"patient_key": key, "images_removed": len(images), "rounds": rounds}
        )
    return Revocation(key, len(images), rounds, _models_including(site.work_dir, rounds))


def preprocess_consented(site: SitePaths, cfg: Mapping[str, Any]) -> PreprocessSummary:
    """Preprocess ``site`` (``cfg``: the ``preprocess`` node) without the patients whose consent
    it has revoked: what every command that preprocesses a hospital's site calls."""
    return preprocess_site(site, cfg, revoked=revoked_patients(site.work_dir))


def preprocess_sites(cfg: Mapping[str, Any]) -> list[PreprocessSummary]:
    """Preprocess every configured site (:func:`pipeline.contracts.layout.configured_sites`)."""
    return [preprocess_consented(site, cfg["preprocess"]) for site in configured_sites(cfg)]
