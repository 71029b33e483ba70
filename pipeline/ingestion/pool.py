"""Process a site's files in worker processes, surviving a worker that dies (a decoder crash,
the out-of-memory killer): the files it had not returned are processed again one at a time, each
in a process of its own, and the file whose process dies is rejected."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm import tqdm

from pipeline.ingestion.records import FileRecord

log = logging.getLogger("fedrad.preprocess")

WORKER_DIED = (
    "the worker process died while processing this file (a decoder crash or the out-of-memory killer)"
)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


MIN_TASKS_PER_WORKER = 4


def run_tasks(
    tasks: list, worker: Callable[[Any], FileRecord], workers: int, site: str
) -> Iterator[FileRecord]:
    """Yield each task's record as it completes (in task order), with a files/s progress bar.

    A pool is only started when every worker gets at least MIN_TASKS_PER_WORKER files;
    tasks go to the workers in chunks so that the pool's overhead stays small. When a
    worker process dies (a decoder crash, the out-of-memory killer), the files not yet
    returned are processed again one at a time, each in a process of its own, and the file
    whose process dies is rejected (in-process, with one worker, a crash ends the run).
    """
    workers = min(workers, len(tasks) // MIN_TASKS_PER_WORKER)
    with tqdm(total=len(tasks), unit="file", desc=f"preprocess {site}", mininterval=1.0) as bar:
        if workers <= 1:
            for task in tasks:
                yield worker(task)
                bar.update()
            return
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        done = 0
        try:
            with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
                for record in pool.map(worker, tasks, chunksize=chunk):
                    yield record
                    done += 1
                    bar.update()
        except BrokenProcessPool:
            log.warning(
                "%s: a worker process died; processing the other %d files one at a time",
                site,
                len(tasks) - done,
            )
            for task in tasks[done:]:
                yield _isolated(worker, task)
                bar.update()


def _isolated(worker: Callable[[Any], FileRecord], task: tuple[str, Any]) -> FileRecord:
    """``worker(task)`` in a process of its own; a rejection when that process dies."""
    with ProcessPoolExecutor(max_workers=1, initializer=_worker_init) as pool:
        try:
            return pool.submit(worker, task).result()
        except BrokenProcessPool:
            return FileRecord(file=task[0], status="rejected", reason=WORKER_DIED)
