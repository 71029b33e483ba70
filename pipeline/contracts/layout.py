"""Where every file lives: a site's folders (:class:`SitePaths`, :class:`WorkDir`) and a
federated run's outputs (:class:`RunLayout`). Every module asks these objects for paths.

A site folder (``scripts/prepare_demo.py`` writes the demo ones; a hospital names its own
folders in its site file)::

    <site>/<input folder>/       the hospital's images (read-only to fedrad)
    <site>/labels.csv            the hospital's labels (read-only to fedrad)
    <site>/site_secret.key       the key of the site's pseudonyms
    <site>/fedrad/               the work folder: everything fedrad writes (WorkDir)
        cache/<N>px/             identifier-free training cache, one per image size
        private/                 site-only bookkeeping: never leaves the site
        ledger.jsonl             the signed site ledger; ledger_signing.pub its public key
        approvals/               the data owner's decisions on jobs
        report.csv               what preprocessing did with each file
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_FOLDER = re.compile(r"(\d+)px")
WORK_FOLDER = "fedrad"  # a site's work folder, inside its site folder


@dataclass(frozen=True)
class WorkDir:
    """A site's work folder: everything fedrad writes for one site."""

    root: Path

    @property
    def caches_dir(self) -> Path:
        """The folder of the training caches, one per image size."""
        return self.root / "cache"

    def cache(self, image_size: int) -> Path:
        """The training cache of images preprocessed at ``image_size`` pixels."""
        return self.caches_dir / f"{int(image_size)}px"

    def caches(self) -> list[Path]:
        """Every image size's cache folder that exists."""
        if not self.caches_dir.is_dir():
            return []
        found = self.caches_dir.iterdir()
        return sorted(p for p in found if p.is_dir() and CACHE_FOLDER.fullmatch(p.name))

    @property
    def name_file(self) -> Path:
        """The site's name as its site file gives it (written when the site preprocesses)."""
        return self.private / "site_name"

    @property
    def site_name(self) -> str:
        """The site's name (:attr:`name_file`); for a work folder without one, the name of the
        site folder it sits in (``<site>/fedrad``)."""
        try:
            recorded = self.name_file.read_text(encoding="utf-8").strip()
        except OSError:
            recorded = ""
        return recorded or self.root.resolve().parent.name

    @classmethod
    def of_cache(cls, cache_dir: Path) -> "WorkDir":
        """The work folder a cache folder (:meth:`cache`) belongs to."""
        return cls(Path(cache_dir).parent.parent)

    @property
    def private(self) -> Path:
        """Site-only bookkeeping (source index, releases, revocations): never leaves the site."""
        return self.root / "private"

    @property
    def source_index(self) -> Path:
        """Source file -> image and patient pseudonyms (written by preprocessing)."""
        return self.private / "source_index.csv"

    @property
    def preprocess_journal(self) -> Path:
        """Files processed by an interrupted preprocessing run (removed when it finishes)."""
        return self.private / "progress.jsonl"

    @property
    def preprocess_report(self) -> Path:
        """What preprocessing did with each source file."""
        return self.root / "report.csv"

    @property
    def revoked_patients(self) -> Path:
        return self.private / "revoked_patients.txt"

    @property
    def trained_patients(self) -> Path:
        return self.private / "trained_patients.jsonl"

    @property
    def reported_heads(self) -> Path:
        """The ledger heads this site has reported to a coordinator."""
        return self.private / "reported_heads.jsonl"

    @property
    def round_lock(self) -> Path:
        return self.private / "round.lock"

    @property
    def session_marker(self) -> Path:
        """Present while the site's SuperNode runs: a leftover one means it was killed."""
        return self.private / "supernode_session"

    @property
    def runtime_secret(self) -> Path:
        """Signs the site's requests for its SuperNode's tasks (new at every site start)."""
        return self.private / "runtime.secret"

    @property
    def federation_finished(self) -> Path:
        """Written when the coordinator tells the site its federation is finished."""
        return self.private / "federation_finished"

    @property
    def releases(self) -> Path:
        """Every update and evaluation answer this site has released, by run and round."""
        return self.private / "releases"

    @property
    def signing_key(self) -> Path:
        return self.private / "ledger_signing.key"

    @property
    def public_key(self) -> Path:
        return self.root / "ledger_signing.pub"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.jsonl"

    @property
    def approvals(self) -> Path:
        return self.root / "approvals"

    def approval(self, job_hash: str) -> Path:
        """The data owner's latest signed decision on one job."""
        return self.approvals / f"{job_hash}.json"


@dataclass(frozen=True)
class SitePaths:
    """One site: its name, the hospital's own data (read-only to fedrad) and its work folder."""

    name: str
    input_dir: Path
    labels_csv: Path
    work_dir: Path
    secret_file: Path

    @property
    def work(self) -> WorkDir:
        return WorkDir(self.work_dir)

    def cache(self, image_size: int) -> Path:
        """The site's training cache at ``image_size`` pixels."""
        return self.work.cache(image_size)

    @property
    def private_dir(self) -> Path:
        return self.work.private

    @classmethod
    def of_data(cls, data: Mapping[str, Any]) -> list["SitePaths"]:
        """Every site of a ``data`` config node: ``data.sites`` under ``data.sites_root``."""
        subdir = str(data.get("input_subdir") or "dicom")
        return [cls.under(data["sites_root"], name, subdir) for name in data["sites"]]

    @classmethod
    def under(cls, sites_root: str | Path, name: str, input_subdir: str = "dicom") -> "SitePaths":
        """The conventional layout of a site folder (see the module docstring): the source images
        in the folder ``input_subdir`` (``data.input_subdir``; DICOM, PNG, JPEG or NIfTI alike)."""
        root = Path(sites_root) / name
        return cls(
            name=name,
            input_dir=root / input_subdir,
            labels_csv=root / "labels.csv",
            work_dir=root / WORK_FOLDER,
            secret_file=root / "site_secret.key",
        )

    @classmethod
    def public_set(cls, input_dir: str | Path, labels_csv: str | Path, root: str | Path) -> "SitePaths":
        """Public images the coordinator holds (pretraining), laid out as a site named ``public``
        whose work folder and secret are under ``root``."""
        return cls(
            name="public",
            input_dir=Path(input_dir),
            labels_csv=Path(labels_csv),
            work_dir=Path(root) / WORK_FOLDER,
            secret_file=Path(root) / "public_secret.key",
        )

    @classmethod
    def of_site_file(cls, node: Mapping[str, Any]) -> "SitePaths":
        """A deployed site's paths, as its site file (``conf/site/*.yaml``) names them."""
        return cls(
            name=str(node["name"]),
            input_dir=Path(node["input_dir"]),
            labels_csv=Path(node["labels_csv"]),
            work_dir=Path(node["work_dir"]),
            secret_file=Path(node["secret_file"]),
        )


def configured_sites(cfg: Mapping[str, Any]) -> list[SitePaths]:
    """The site chosen with ``+site=<name>``, else every ``data.sites`` under ``data.sites_root``."""
    if cfg.get("site"):
        return [SitePaths.of_site_file(cfg["site"])]
    return SitePaths.of_data(cfg["data"])


@dataclass(frozen=True)
class RunLayout:
    """The outputs of a federated (or centralised) run in its output folder."""

    root: Path

    @property
    def model(self) -> Path:
        """The released model: the selected round's weights."""
        return self.root / "model.pt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, server_round: int) -> Path:
        return self.checkpoints / f"round_{server_round:03d}.pt"

    def checkpoint_rounds(self) -> list[int]:
        """The rounds whose checkpoint file exists, in order."""
        names = (CHECKPOINT.fullmatch(p.name) for p in self.checkpoints.glob("round_*.pt"))
        return sorted(int(m.group(1)) for m in names if m)

    @property
    def rounds(self) -> Path:
        """One JSON line per completed round: its sites, metrics and failures."""
        return self.root / "rounds.jsonl"

    @property
    def run(self) -> Path:
        """The run's identity, so that a restarted coordinator resumes the same run."""
        return self.root / "run.json"

    @property
    def selection(self) -> Path:
        """Which round was released as the model, by which validation metric."""
        return self.root / "selection.json"

    @property
    def ledger_heads(self) -> Path:
        """The ledger heads every site reported, so that no site's ledger can be rolled back."""
        return self.root / "ledger_heads.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def logs(self) -> Path:
        """CSV and TensorBoard logs of a centralised or single-site training."""
        return self.root / "logs"

    @property
    def lightning_checkpoints(self) -> Path:
        """Lightning's checkpoint of the last epoch of a centralised or single-site training."""
        return self.root / "lightning_checkpoints"


CHECKPOINT = re.compile(r"round_(\d{3,})\.pt")
