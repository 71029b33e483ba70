"""Crash-safe resume: a federation restarted on the same output folder continues.

A round is *completed* when both its global-model checkpoint
(``checkpoints/round_NNN.pt``) and its record in ``rounds.jsonl`` are on disk. A restarted
coordinator starts from the last completed round's global parameters and round number
and runs the rounds still missing; records of a round cut short are dropped. FedAvg keeps
no other server-side state (no server optimiser), so nothing else needs restoring.

The run keeps one fedrad run id (in ``run.json`` in the output folder, with the experiment
configuration it was started with) across restarts. Sites key
their privacy ledgers by that id and the round number, so a round that is run again after a
crash replaces its ledger entry instead of charging the budget twice.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.checkpoints import load_checkpoint
from pipeline.federation.run_config import experiment_yaml

log = logging.getLogger("fedrad.federation")

RUN_FILE = "run.json"
ROUNDS_FILE = "rounds.jsonl"
CHECKPOINT_NAME = re.compile(r"round_(\d{3,})\.pt$")


@dataclass(frozen=True)
class ResumePoint:
    """Where a (re)started federation begins: the last completed round and its model."""

    completed_round: int
    state: dict[str, torch.Tensor] | None


def _comparable(cfg: DictConfig) -> dict:
    """The experiment configuration, less the round count (a restart may extend it)."""
    plain = json.loads(experiment_yaml(cfg))
    plain.get("federation", {}).pop("num_rounds", None)
    return plain


def fedrad_run_id(output_dir: Path, cfg: DictConfig) -> str:
    """The run id of the federation in ``output_dir``, created on its first start.

    Raises ``ValueError`` when the folder holds a run of a different experiment.
    """
    path = output_dir / RUN_FILE
    if path.is_file():
        run = json.loads(path.read_text())
        if run["experiment"] != _comparable(cfg):
            raise ValueError(
                f"{output_dir} holds a run of a different experiment (see {path}): resume it "
                "with the same configuration, or choose a new output_dir"
            )
        return str(run["run_id"])
    output_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:16]
    path.write_text(json.dumps({"run_id": run_id, "experiment": _comparable(cfg)}, indent=1))
    return run_id


def recorded_rounds(output_dir: Path) -> dict[int, str]:
    """Round number -> JSON line of every complete record in ``rounds.jsonl``."""
    path = output_dir / ROUNDS_FILE
    records: dict[int, str] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records[int(json.loads(line)["round"])] = line
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a damaged line in %s (a crash while writing it)", path)
    return records


def round_wall_times(output_dir: Path) -> list[float]:
    """Each recorded round's wall time in seconds, in round order (for benchmarks)."""
    records = (json.loads(line) for _, line in sorted(recorded_rounds(output_dir).items()))
    return [float(r["wall_s"]) for r in records]


def checkpointed_rounds(output_dir: Path) -> list[int]:
    """Rounds with a global-model checkpoint, in increasing order."""
    folder = output_dir / "checkpoints"
    names = (CHECKPOINT_NAME.search(p.name) for p in folder.glob("round_*.pt"))
    return sorted(int(m.group(1)) for m in names if m)


def resume_point(output_dir: Path) -> ResumePoint:
    """The last completed round in ``output_dir`` (0 and no state for a new run).

    Rewrites ``rounds.jsonl`` without the records of rounds after the completed one.
    """
    records = recorded_rounds(output_dir)
    completed = [r for r in checkpointed_rounds(output_dir) if r in records]
    if not completed:
        _keep_records(output_dir, records, 0)
        return ResumePoint(0, None)
    last = completed[-1]
    path = output_dir / "checkpoints" / f"round_{last:03d}.pt"
    state, _ = load_checkpoint(path)
    _keep_records(output_dir, records, last)
    log.info("resuming %s after round %d (global model %s)", output_dir, last, path)
    return ResumePoint(last, state)


def _keep_records(output_dir: Path, records: dict[int, str], last: int) -> None:
    """Rewrite ``rounds.jsonl`` with the records of rounds 1..``last`` only."""
    path = output_dir / ROUNDS_FILE
    if not path.is_file():
        return
    kept = [line for round_, line in sorted(records.items()) if round_ <= last]
    partial = path.with_suffix(".jsonl.partial")
    partial.write_text("".join(line + "\n" for line in kept))
    partial.replace(path)
