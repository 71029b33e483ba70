"""``flower-supernode`` that asks its coordinator for the next message every ``--poll-s`` seconds.

Flower 1.41's SuperNode, when the SuperLink has no message for it, sleeps 3 s before asking
again, and waits for the site's reply in steps of 0.5 s; it has no setting for either. A round
has at least two stages (train, evaluate; five under SecAgg+) and waits at each for the slowest
of its sites to ask, about 2 s a stage with three sites. This entry point runs Flower's own
SuperNode unchanged except for those waits (its loop module's clock, :class:`_PromptClock`) and
for asking again promptly for a message's parts still on their way
(:mod:`pipeline.contracts.transfer`).

    python -m pipeline.deployment.flower_supernode --poll-s 0.25 <flower-supernode arguments>

An idle site then makes one small authenticated request every ``--poll-s`` seconds on its one
outbound connection, as it already made one every 3 s.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

from pipeline.contracts.transfer import PROMPT_PULLS

POLL_FLAG = "--poll-s"
IDLE_WAIT_S = 3.0  # Flower's wait after asking the SuperLink for a message and getting none
REPLY_WAIT_S = 0.05  # instead of Flower's 0.5 s steps while the site's reply is being written


class _PromptClock:
    """The ``time`` module as Flower's SuperNode loop sees it: its 3 s idle wait is ``poll_s``,
    any shorter wait at most :data:`REPLY_WAIT_S`; everything else is :mod:`time` itself."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.poll_s if seconds >= IDLE_WAIT_S else min(seconds, REPLY_WAIT_S))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _prompt_pull_objects(object_ids: list[str], pull_object_fn, **_flower_defaults) -> dict[str, bytes]:
    return pull_objects(object_ids, pull_object_fn, **PROMPT_PULLS)


def command(poll_s: float) -> list[str]:
    """The start of a command line running this SuperNode (Flower's arguments follow)."""
    return [sys.executable, "-m", __name__, POLL_FLAG, str(poll_s)]


def main(argv: list[str]) -> int:
    """Run Flower's SuperNode with ``argv`` (``--poll-s S`` first, then Flower's arguments)."""
    if len(argv) < 2 or argv[0] != POLL_FLAG:
        raise SystemExit(f"usage: python -m {__name__} {POLL_FLAG} SECONDS <flower-supernode arguments>")
    poll_s = float(argv[1])
    if not 0 < poll_s <= IDLE_WAIT_S:
        raise SystemExit(f"{POLL_FLAG} must be above 0 and at most {IDLE_WAIT_S} s, not {argv[1]}")
    start_client_internal.time = _PromptClock(poll_s)  # type: ignore[assignment]
    start_client_internal.pull_objects = _prompt_pull_objects
    sys.argv = ["flower-supernode", *argv[2:]]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
