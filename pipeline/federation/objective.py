"""The value a hyper-parameter search maximises: the global model's score on the sites' validation
patients after the last round (never the held-out test patients, which stay for the final report)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.contracts.layout import RunLayout
from pipeline.federation.resume import recorded_rounds


def validation_metric(output_dir: Path, name: str) -> float:
    """``name`` (e.g. ``val_pneumonia_auroc``) of the last round's example-weighted validation
    metrics in ``<output_dir>/rounds.jsonl``."""
    rounds = recorded_rounds(Path(output_dir))
    if not rounds:
        raise ValueError(f"{RunLayout(Path(output_dir)).rounds} records no round: nothing to optimise")
    last = json.loads(rounds[max(rounds)])
    scores = last.get("val") or {}
    if name not in scores:
        raise KeyError(
            f"optimized_metric={name!r} is not among round {last['round']}'s validation metrics "
            f"{sorted(scores)} in {RunLayout(Path(output_dir)).rounds}"
        )
    return float(scores[name])
