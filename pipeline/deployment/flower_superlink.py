"""``flower-superlink`` that keeps messages' objects (the model's arrays) in memory and the rest
of its state (registered sites, runs, messages) in its database.

Flower 1.41's SuperLink with ``--database FILE`` stores every object of every message in that
SQLite file: a model written, committed, read back and deleted several times a round (the global
model for each stage, each site's reply), which on a small coordinator costs seconds of CPU and
disk a round. The objects only matter while a round is in flight, and a round in flight when the
SuperLink stops is lost with it anyway: the coordinator resumes after the last completed round
(:mod:`pipeline.deployment.coordinator`). What must survive a restart (the sites' registrations,
the runs' status) stays in the database.

What changes with it: Flower keeps an object and the database rows that account for it in one
transaction when both are in the file. In memory, an object stored just before a database write
that fails (a database still locked after Flower's timeout) stays in memory until its run is
cleaned up, and a message whose objects are gone is dropped by the SuperLink, so the round goes
on without that reply, as with a site that did not answer.

    python -m pipeline.deployment.flower_superlink <flower-superlink arguments>
"""

from __future__ import annotations

import sys

from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink import config_loader
from flwr.superlink.cli.flower_superlink import flower_superlink


def _objects_in_memory(_database: str) -> ObjectStoreFactory:
    return ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)


def command() -> list[str]:
    """The start of a command line running this SuperLink (Flower's arguments follow)."""
    return [sys.executable, "-m", __name__]


def main(argv: list[str]) -> int:
    """Run Flower's SuperLink with ``argv``, messages' objects in memory."""
    config_loader.ObjectStoreFactory = _objects_in_memory  # type: ignore[assignment,misc]
    sys.argv = ["flower-superlink", *argv]
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
