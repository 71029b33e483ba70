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
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.contracts.experiment import experiment_yaml
from pipeline.contracts.layout import RunLayout
from pipeline.training.checkpoints import load_checkpoint

log = logging.getLogger("fedrad.federation")


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
    path = RunLayout(output_dir).run
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
    path = RunLayout(output_dir).rounds
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


def _last_completed(output_dir: Path, records: dict[int, str]) -> int:
    """The last round with both its checkpoint and its record (0: none)."""
    completed = [r for r in RunLayout(output_dir).checkpoint_rounds() if r in records]
    return completed[-1] if completed else 0


def rounds_left(output_dir: Path, num_rounds: int) -> int:
    """How many of ``num_rounds`` the run in ``output_dir`` still has to train (0 once it
    stopped early); reads only, unlike :func:`resume_point`."""
    records = recorded_rounds(output_dir)
    last = _last_completed(output_dir, records)
    if any(json.loads(records[r]).get("stopped_early") for r in records if r <= last):
        return 0
    return max(0, num_rounds - last)


def resume_point(output_dir: Path) -> ResumePoint:
    """The last completed round in ``output_dir`` (0 and no state for a new run).

    Rewrites ``rounds.jsonl`` without the records of rounds after the completed one.
    """
    records = recorded_rounds(output_dir)
    last = _last_completed(output_dir, records)
    if not last:
        _keep_records(output_dir, records, 0)
        return ResumePoint(0, None)
    path = RunLayout(output_dir).checkpoint(last)
    state, _ = load_checkpoint(path)
    _keep_records(output_dir, records, last)
    log.info("resuming %s after round %d (global model %s)", output_dir, last, path)
    return ResumePoint(last, state)


def _keep_records(output_dir: Path, records: dict[int, str], last: int) -> None:
    """Rewrite ``rounds.jsonl`` with the records of rounds 1..``last`` only."""
    path = RunLayout(output_dir).rounds
    if not path.is_file():
        return
    kept = [line for round_, line in sorted(records.items()) if round_ <= last]
    partial = path.with_suffix(".jsonl.partial")
    partial.write_text("".join(line + "\n" for line in kept))
    partial.replace(path)
