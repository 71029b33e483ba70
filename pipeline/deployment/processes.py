"""Flower processes that never outlive the fedrad command that started them.

A SuperLink or SuperNode started here runs in its own process group and is killed by the kernel
when the fedrad command dies (Linux ``PR_SET_PDEATHSIG``). On the coordinator, Flower starts its
SuperExec in a new session, and the SuperExec starts the ServerApp processes, so a process-group
kill alone misses some of them: :func:`stop_tree` stops a process with all its descendants, and a
fedrad command that called :func:`become_subreaper` inherits the descendants a crash orphaned
and stops them with :func:`stop_children`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import psutil

log = logging.getLogger("fedrad.deployment")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def become_subreaper() -> None:
    """Descendants orphaned by a crash of their parent are re-parented to this process (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the parent dies (and now if it already has)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def spawn(command: Sequence[str], **popen: object) -> subprocess.Popen:
    """Start ``command`` in its own process group, to be killed if this process dies."""
    parent = os.getpid()
    return subprocess.Popen(  # type: ignore[call-overload]
        list(command), start_new_session=True, preexec_fn=lambda: _die_with_parent(parent), **popen
    )


def _stop(processes: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM ``processes``, SIGKILL whatever is left after ``grace_s``, reap our children."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def stop_tree(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop ``process`` and every process it started, however detached, and reap it."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    _stop(tree, grace_s)
    process.wait()


def stop_children(grace_s: float = 20) -> None:
    """Stop every descendant of this process (orphans re-parented to it included) and reap them."""
    children = psutil.Process().children(recursive=True)
    if children:
        log.info("stopping %d Flower processes this command started", len(children))
    _stop(children, grace_s)


def _is_flower(process: psutil.Process) -> bool:
    return any("flwr" in part or "flower" in part for part in process.cmdline())


def stop_group(group: int, grace_s: float = 20) -> int:
    """Stop the Flower processes left in process group ``group`` by a killed predecessor of
    this command (other processes are left alone: the id may have been reused); how many."""
    left = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and _is_flower(process):
                left.append(process)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    _stop(left, grace_s)
    return len(left)
