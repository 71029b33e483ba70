"""What a site released for each ``run:round``, so that a request asked again gets the same bytes.

A coordinator that sends the same round twice (a crash and resume, or an attack) must learn
nothing new: the site keeps, in ``<work dir>/private/releases/``, the update it sent for each
``run:round`` with the experiment and global model it was trained from. The same request again
is answered with the stored update, with no training, no new noise and no new charge; anything
else under the same ``run:round`` is a new training that the site's policy refuses or charges in
full (:class:`pipeline.federation.site_policy.SitePolicy`).

Under SecAgg+ a stored update may enter a second aggregation only with the same participants:
the neighbours the site masked it against, and the surviving / dropped sites of the unmasking,
are recorded at the first aggregation; a later one that differs is refused. Otherwise the
coordinator could subtract two sums that differ by one site and hold that site's update alone.

Only the update's hash is signed (the ``round`` entry of the site's ledger); the stored update is
replayed only while its hash still matches that entry.
"""

from __future__ import annotations

import hashlib
import json
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.contracts.files import atomic_write
from pipeline.contracts.layout import WorkDir

StateDict = dict[str, torch.Tensor]
# Set by the site's SecAgg+ mod while its training handler runs: the sites this update will be
# masked against. None: the update leaves in the clear. A context variable, so that nothing in
# a message can claim that the update is being masked.
MASKING_NEIGHBOURS: ContextVar[list[int] | None] = ContextVar("masking_neighbours", default=None)


class ReleaseRefused(PermissionError):
    """A request the site will not answer: it would release a round differently a second time."""


@dataclass
class Release:
    """One released update's identity and what came with it."""

    run: str
    round: int
    config_sha256: str
    global_model_sha256: str
    update_sha256: str
    num_examples: int
    metrics: dict[str, float]
    secure_aggregation: bool
    neighbours: list[int] | None = None  # SecAgg+: the sites it was masked against
    survivors: list[int] | None = None  # SecAgg+: unmasking's surviving sites
    dropped: list[int] | None = None  # SecAgg+: unmasking's dropped sites

    def same_request(self, config_sha256: str, global_model_sha256: str, secure: bool) -> bool:
        return (self.config_sha256, self.global_model_sha256, self.secure_aggregation) == (
            config_sha256,
            global_model_sha256,
            secure,
        )


class ReleaseStore:
    """The releases of one site (see the module docstring)."""

    def __init__(self, work: WorkDir) -> None:
        self.dir = work.releases

    def _stem(self, run: str, server_round: int) -> Path:
        run_id = hashlib.sha256(run.encode()).hexdigest()[:24]
        return self.dir / f"{run_id}-round{int(server_round)}"

    def find(self, run: str, server_round: int) -> Release | None:
        """The release of ``run:round`` if the site made one."""
        path = self._stem(run, server_round).with_suffix(".json")
        return Release(**json.loads(path.read_text())) if path.is_file() else None

    def update(self, release: Release) -> StateDict:
        """The stored update of ``release`` (tensors only)."""
        path = self._stem(release.run, release.round).with_suffix(".pt")
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, release: Release, update: StateDict | None = None) -> None:
        """Store ``release`` (and its update, when given) atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self._stem(release.run, release.round)
        if update is not None:
            tmp = stem.with_suffix(".pt.tmp")
            torch.save(update, tmp)
            tmp.replace(stem.with_suffix(".pt"))
        atomic_write(stem.with_suffix(".json"), json.dumps(asdict(release), indent=1).encode())

    def evaluation(self, run: str, server_round: int) -> dict | None:
        """The evaluation the site answered for ``run:round`` (model hash, metrics, head)."""
        path = self._stem(run, server_round).with_name(self._stem(run, server_round).name + "-eval.json")
        return json.loads(path.read_text()) if path.is_file() else None

    def save_evaluation(self, run: str, server_round: int, answer: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self._stem(run, server_round)
        atomic_write(stem.with_name(stem.name + "-eval.json"), json.dumps(answer, indent=1).encode())

    def masked_against(self, run: str, server_round: int, neighbours: list[int]) -> None:
        """SecAgg+: record the neighbours of the first aggregation, refuse different ones later."""
        release = self.find(run, server_round)
        if release is None:
            return
        neighbours = sorted(neighbours)
        if release.neighbours is None:
            release.neighbours = neighbours
            self.save(release)
        elif release.neighbours != neighbours:
            raise ReleaseRefused(
                f"round {server_round} of run {run} was already aggregated with other sites "
                f"({len(release.neighbours)} then, {len(neighbours)} now): this site's update "
                "enters a second secure aggregation only with the same participants"
            )

    def unmasking(self, run: str, server_round: int, survivors: list[int], dropped: list[int]) -> None:
        """SecAgg+: record the first unmasking's survivors and dropped sites; refuse other ones."""
        release = self.find(run, server_round)
        if release is None:
            raise ReleaseRefused(
                f"unmasking round {server_round} of run {run}, for which this site released no update"
            )
        survivors, dropped = sorted(survivors), sorted(dropped)
        if release.survivors is None:
            release.survivors, release.dropped = survivors, dropped
            self.save(release)
        elif (release.survivors, release.dropped) != (survivors, dropped):
            raise ReleaseRefused(
                f"round {server_round} of run {run} was already unmasked with "
                f"{len(release.survivors)} surviving and {len(release.dropped or [])} dropped "
                f"sites; now {len(survivors)} and {len(dropped)}: this site does not help unmask "
                "another sum of the same update"
            )
