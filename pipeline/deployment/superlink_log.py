"""The SuperLink's own log lines on the coordinator's console: the ones that matter, each
site named.

Flower's SuperLink logs a line per API call, in colour, and names sites by node id only
(``[Fleet.ActivateNode] Activated node_id=...``). The coordinator echoes its warnings, errors
and the lines about sites joining and leaving (every line with ``verbose=true``), without
colour codes, each ``node_id=N`` followed by the name the site's key was registered under
(``flwr supernode register --name``), read from the SuperLink's own database, read-only.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from flwr.supercore.utils import int64_to_uint64

NODE_ID = re.compile(r"node_id=(\d+)")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def registered_names(database: Path) -> dict[int, str]:
    """Node id -> registered name of every site in the SuperLink's database (empty while the
    database is missing or busy)."""
    try:
        with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=2) as db:
            rows = db.execute("SELECT node_id, name FROM node WHERE name IS NOT NULL").fetchall()
    except sqlite3.Error:
        return {}
    return {int64_to_uint64(int(node_id)): str(name) for node_id, name in rows if node_id is not None}


class NamedNodeLog:
    """Rewrites the SuperLink's lines so that every node id carries its site's name, and
    leaves out its per-call lines unless ``verbose``."""

    def __init__(self, database: Path, verbose: bool = False) -> None:
        self.database = database
        self.verbose = verbose
        self.names: dict[int, str] = {}
        self.showing = True  # a line without a level (a traceback) goes with the line before

    def shown(self, text: str) -> bool:
        level = LEVEL.match(text)
        if level:
            self.showing = self.verbose or level.group(1) not in ("DEBUG", "INFO") or "node_id=" in text
        return self.showing

    def name(self, node_id: int) -> str | None:
        if node_id not in self.names:
            self.names.update(registered_names(self.database))
        return self.names.get(node_id)

    def line(self, text: str) -> str:
        text = COLOUR.sub("", text)

        def named(match: re.Match[str]) -> str:
            name = self.name(int(match.group(1)))
            return f"{match.group(0)} ({name})" if name else match.group(0)

        return NODE_ID.sub(named, text)

    def echo(self, output: Iterable[str], to: IO[str] | None = None) -> None:
        """Print every line of ``output`` that is :meth:`shown` once, named; a line that cannot be
        named as it is."""
        for text in output:
            out = to or sys.stdout
            try:
                text = self.line(text)
            except Exception:  # noqa: BLE001 - the log must flow whatever a line holds
                pass
            if self.shown(text):
                out.write(text)
                out.flush()
