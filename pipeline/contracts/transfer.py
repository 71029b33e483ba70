"""How promptly a message's parts that are still on their way are asked for again.

A Flower message travels as a tree of objects (a model: one per tensor). The one who receives
it (the coordinator collecting a reply, a site taking a message from its SuperNode) may see the
message before all its objects have arrived; Flower 1.41 then asks for each missing object
again after 1 s, doubling up to 10 s, which can add as much waiting again as the transfer took.
fedrad's receivers ask again after :data:`PULL_BACKOFF_S`, doubling up to
:data:`PULL_BACKOFF_CAP_S`, for as long as Flower would wait in all.
"""

from __future__ import annotations

from typing import Any

from flwr.supercore.constant import PULL_MAX_TIME

PULL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 0.1
PROMPT_PULLS: dict[str, Any] = {
    "initial_backoff": PULL_BACKOFF_S,
    "backoff_cap": PULL_BACKOFF_CAP_S,
    "max_tries_per_object": None,  # bounded by max_time, not by a number of quick tries
    "max_time": PULL_MAX_TIME,
}
