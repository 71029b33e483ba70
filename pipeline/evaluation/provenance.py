"""What a model is, from its file and the records of the run that wrote it: the provenance the
clinical report, the model card and the audit state.

A ``model.pt`` holds its network, image size, round and operating threshold
(:mod:`pipeline.training.checkpoints`); a federated run's folder (:class:`RunLayout`) also holds
``run.json`` (its id and experiment), ``rounds.jsonl`` (each round's sites, their training-image
counts and, under DP-SGD, their epsilon) and Hydra's record of its configuration. Only counts
and settings are read: no site's data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from pipeline.contracts.layout import RunLayout
from pipeline.contracts.messages import NUM_EXAMPLES
from pipeline.ingestion.pseudonym import file_sha256
from pipeline.training.checkpoints import OPERATING_THRESHOLD

# Hydra records every run's composed configuration here, in the run's output folder.
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


def network_name(net: dict[str, Any]) -> str:
    """``ResNet18 (batch norm)`` from a ``model.net`` config."""
    name = str(net.get("_target_", "unknown")).rsplit(".", 1)[-1]
    return f"{name} ({net['norm']} norm)" if net.get("norm") else name


def recorded_config(checkpoint: Path) -> DictConfig | None:
    """The configuration Hydra recorded for the run that wrote ``checkpoint`` (None: none)."""
    recorded = checkpoint.parent / HYDRA_CONFIG
    return cast(DictConfig, OmegaConf.load(recorded)) if recorded.is_file() else None


def _rounds(run: RunLayout) -> list[dict[str, Any]]:
    if not run.rounds.is_file():
        return []
    return [json.loads(line) for line in run.rounds.read_text().splitlines() if line.strip()]


def training_record(checkpoint: Path, model_round: int | None) -> dict[str, Any] | None:
    """What the run folder of ``checkpoint`` says about its training (None: not a run folder).

    ``sites``: the sites of the run's experiment; ``training_images``: each site's training
    images in the model's round; ``privacy``: DP-SGD and secure aggregation settings and each
    site's epsilon (spent over every round it trained, the last recorded) at its delta.
    """
    run = RunLayout(checkpoint.parent)
    if not run.run.is_file():
        return None
    identity = json.loads(run.run.read_text())
    experiment = identity.get("experiment", {})
    rounds = _rounds(run)
    trained = next((r for r in rounds if r.get("round") == model_round), rounds[-1] if rounds else {})
    per_site = trained.get("train_per_site") or {}
    images = {site: int(per_site[site][NUM_EXAMPLES]) for site in sorted(per_site)}
    spent: dict[str, dict[str, float]] = {}
    for record in rounds:
        for site, metrics in (record.get("train_per_site") or {}).items():
            if "epsilon" in metrics:
                spent[site] = {"epsilon": float(metrics["epsilon"]), "delta": float(metrics["delta"])}
    federation = experiment.get("federation", {})
    return {
        "run_id": identity.get("run_id"),
        "sites": list(experiment.get("data", {}).get("sites", [])),
        "rounds": len(rounds),
        "training_images": images,
        "privacy": {
            "secure_aggregation": bool(federation.get("secure_aggregation")),
            "dp_sgd": bool(experiment.get("privacy", {}).get("enabled")),
            "epsilon_per_site": spent,
        },
    }


def model_provenance(checkpoint: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The model file's identity and what it holds, with its run's training record."""
    threshold = info.get(OPERATING_THRESHOLD)
    return {
        "file": checkpoint.name,
        "sha256": file_sha256(checkpoint),
        "network": network_name(info["config"]["net"]),
        "image_size": info.get("image_size"),
        "round": info.get("round"),
        "operating_threshold": None if threshold is None else threshold["value"],
        "training": training_record(checkpoint, info.get("round")),
    }


def statement(checkpoint: Path, default: DictConfig) -> dict[str, Any]:
    """The intended-use statement (``clinical`` config) of the run that wrote ``checkpoint``,
    else ``default``."""
    recorded = recorded_config(checkpoint)
    chosen = recorded.clinical if recorded is not None and "clinical" in recorded else default
    return cast(dict[str, Any], OmegaConf.to_container(chosen, resolve=True))
