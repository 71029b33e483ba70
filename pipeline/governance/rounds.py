"""What a site writes for each round it trains: a signed ``round`` ledger entry, and privately
the pseudonymous keys of the patients whose images it trained on.

The ``round`` entry's body: ``run``, ``round``, ``config_sha256`` (:func:`experiment_sha256`: the
experiment config the coordinator sent, as the site trained under it), ``code_sha256``
(:func:`pipeline.governance.code_hash.code_hash`), ``data_sha256`` (the training rows: image key,
patient key, label), ``images``, ``patients``, ``global_model_sha256`` (the model received),
``update_sha256`` (the model sent back) and, under DP-SGD, ``epsilon``, ``delta``,
``accountant`` and the round's accountant ``history`` (see :mod:`pipeline.governance.budget`).

After each round's aggregation the site also receives the new global model to evaluate: an
``evaluation`` entry (``run``, ``round``, ``global_model_sha256``) records it, so that the last
model of a run, the one released, is in the ledger too.

``<work dir>/private/trained_patients.jsonl`` lists, per ``run:round``, the patient keys trained
on; it stays at the site and serves consent revocation. A round holds the site's round lock
(:func:`round_lock`) from before it reads its training rows until its entry is written, and a
revocation takes the same lock, so a revocation never misses a round in flight.

Every head a site reports (with its evaluation replies) is also kept at the site in
``<work dir>/private/reported_heads.jsonl``; :func:`verified_entries` checks the ledger against
them before each round, so a ledger cut back to before a reported head blocks training.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.experiment import experiment_yaml
from pipeline.contracts.layout import WorkDir
from pipeline.governance.code_hash import code_hash
from pipeline.governance.heads import site_head
from pipeline.governance.site_ledger import SiteLedger

log = logging.getLogger("fedrad.governance")

DATA_COLUMNS = ["image_key", "patient_key", "label"]


def round_key(run_id: str, server_round: int) -> str:
    return f"{run_id}:{server_round}"


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a model state's names, dtypes, shapes and values (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def experiment_sha256(cfg: DictConfig) -> str:
    """sha256 of the experiment config as sent (:func:`pipeline.contracts.experiment.experiment_yaml`)
    without ``governance``, which each site sets for itself; a site's tighter epsilon budget shows."""
    shared = json.loads(experiment_yaml(cfg))
    shared.pop("governance", None)
    return hashlib.sha256(json.dumps(shared, separators=(",", ":")).encode()).hexdigest()


def rows_sha256(rows: pd.DataFrame) -> str:
    """sha256 of the training rows (image key, patient key, label), sorted by image key."""
    table = rows[DATA_COLUMNS].sort_values("image_key")
    return hashlib.sha256(table.to_csv(index=False, lineterminator="\n").encode()).hexdigest()


def trained_patients_path(work_dir: Path) -> Path:
    return WorkDir(Path(work_dir)).trained_patients


def trained_patients(work_dir: Path) -> dict[str, list[str]]:
    """``run:round`` -> patient keys trained on in that round (every training of it)."""
    path = trained_patients_path(work_dir)
    if not path.is_file():
        return {}
    rows: Iterator[dict] = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    patients: dict[str, set[str]] = {}
    for row in rows:
        patients.setdefault(row["key"], set()).update(row["patients"])
    return {key: sorted(keys) for key, keys in patients.items()}


@contextmanager
def round_lock(work_dir: Path, waiting: str = "") -> Iterator[None]:
    """Hold the site's round lock (``private/round.lock``): one round or revocation at a time.

    ``waiting``: logged when another holder has it (e.g. a revocation waiting for a round)."""
    path = WorkDir(Path(work_dir)).round_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.warning("%s", waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reported_heads(work_dir: Path) -> list[tuple[int, str]]:
    """The (seq, hash) heads this site has reported to a coordinator."""
    path = WorkDir(Path(work_dir)).reported_heads
    if not path.is_file():
        return []
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [(int(h["seq"]), str(h["head"])) for h in lines]


def verified_entries(work_dir: Path) -> list[dict]:
    """The site's ledger entries once the whole ledger verifies with the site's own key and
    against every head it reported; raises :class:`pipeline.governance.site_ledger.LedgerCorrupted`
    (naming the first problem) otherwise: a ledger that does not verify blocks training."""
    return SiteLedger.for_site(work_dir).verified_entries(reported_heads(work_dir))


@dataclass(frozen=True)
class TrainedRound:
    """One round a site is about to train: what it received and which rows it trains on."""

    work_dir: Path
    run_id: str
    server_round: int
    config_sha256: str
    global_model_sha256: str
    train_rows: pd.DataFrame

    @classmethod
    def start(
        cls,
        cfg: DictConfig,
        cache_dir: Path,
        global_state: dict[str, torch.Tensor],
        server_round: int,
        run_id: str,
    ) -> "TrainedRound":
        """Read the cache's training rows and fingerprint the config and the received model."""
        manifest = SiteCache(cache_dir).manifest()
        return cls(
            work_dir=WorkDir.of_cache(cache_dir).root,
            run_id=run_id,
            server_round=server_round,
            config_sha256=experiment_sha256(cfg),
            global_model_sha256=state_sha256(global_state),
            train_rows=manifest[manifest["split"] == "train"],
        )

    @property
    def key(self) -> str:
        return round_key(self.run_id, self.server_round)

    def record(self, update: dict[str, torch.Tensor], privacy: dict | None = None) -> dict:
        """Keep the round's patient keys privately, then append its signed ``round`` entry."""
        patients = sorted(set(self.train_rows["patient_key"]))
        path = trained_patients_path(self.work_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps({"key": self.key, "patients": patients}) + "\n")
        body = {
            "run": self.run_id,
            "round": self.server_round,
            "config_sha256": self.config_sha256,
            "code_sha256": code_hash(),
            "data_sha256": rows_sha256(self.train_rows),
            "images": len(self.train_rows),
            "patients": len(patients),
            "global_model_sha256": self.global_model_sha256,
            "update_sha256": state_sha256(update),
            **(privacy or {}),
        }
        return SiteLedger.for_site(self.work_dir).append("round", body)


def evaluation_head(
    work_dir: Path, run_id: str, server_round: int, global_state: dict[str, torch.Tensor]
) -> dict[str, str | int]:
    """Append the ``evaluation`` entry of the global model the site received to evaluate, then
    return the ledger head the site reports with its evaluation reply (that entry included),
    kept at the site too (``private/reported_heads.jsonl``)."""
    body = {"run": run_id, "round": server_round, "global_model_sha256": state_sha256(global_state)}
    SiteLedger.for_site(work_dir).append("evaluation", body)
    head = site_head(work_dir)
    path = WorkDir(Path(work_dir)).reported_heads
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps({"seq": head["seq"], "head": head["head"]}) + "\n")
    return head
