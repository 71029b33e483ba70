"""A training job as a hospital's data owner reviews it: what would be trained, on what, how often,
at which privacy cost, by which code; and the one hash that an approval signs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

from omegaconf import DictConfig

from pipeline.contracts.experiment import check_experiment, experiment_yaml
from pipeline.governance.code_hash import code_hash

# The site's own approval policy travels with the config in simulation; it is not part of the job.
NOT_PART_OF_JOB = ("governance",)


def _canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal content, equal text, equal hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Job:
    """One federated training run as proposed to the sites.

    ``experiment`` is the configuration the coordinator sends with every message (the
    ``experiment_yaml`` of its config); rounds and privacy budget are repeated from it so that
    a reader sees them at once. ``epsilon_budget`` is ``None`` for a non-private run; ``delta``
    is ``None`` when each site uses 1/(10 x its training images). A job whose experiment names
    anything outside the sites' allow-list (:mod:`pipeline.contracts.experiment`) cannot
    be made, so it can be neither proposed nor approved.
    """

    experiment: dict
    fedrad_version: str
    code_hash: str
    num_rounds: int
    local_epochs: int
    epsilon_budget: float | None
    delta: float | None

    def __post_init__(self) -> None:
        check_experiment(self.experiment)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Job":
        """The job that ``cfg`` describes, with the code and version installed here."""
        experiment = {
            key: value
            for key, value in json.loads(experiment_yaml(cfg)).items()
            if key not in NOT_PART_OF_JOB
        }
        privacy = experiment.get("privacy") or {}
        private = bool(privacy.get("enabled"))
        return cls(
            experiment=experiment,
            fedrad_version=version("fedrad"),
            code_hash=code_hash(),
            num_rounds=int(experiment["federation"]["num_rounds"]),
            local_epochs=int(experiment["federation"]["local_epochs"]),
            epsilon_budget=float(privacy["epsilon_budget"]) if private else None,
            delta=float(privacy["delta"]) if private and privacy.get("delta") is not None else None,
        )

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return _canonical(asdict(self))

    @property
    def job_hash(self) -> str:
        """SHA-256 of the canonical JSON of every field: any change makes another job."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def summary(self) -> str:
        """One line without identifiers, for ledgers and listings."""
        net = self.experiment["model"]["net"]["_target_"].rsplit(".", 1)[-1]
        return (
            f"{net}, {self.num_rounds} rounds x {self.local_epochs} local epochs, "
            f"{self.privacy_text()}, fedrad {self.fedrad_version}, code {self.code_hash[:12]}"
        )

    def privacy_text(self) -> str:
        if self.epsilon_budget is None:
            return "non-private (no differential privacy)"
        delta = (
            f"delta={self.delta:g}"
            if self.delta is not None
            else "delta=1/(10 x this site's training images)"
        )
        return f"DP-SGD, epsilon at most {self.epsilon_budget:g} at {delta}"

    def render(self) -> str:
        """Plain text a data owner reads before deciding."""
        exp = self.experiment
        model, data, fed = exp["model"], exp["data"], exp["federation"]
        net = dict(model["net"])
        target = net.pop("_target_")
        optimizer = dict(model["optimizer"])
        optimizer_name = optimizer.pop("_target_")
        settings = ", ".join(f"{k}={v}" for k, v in optimizer.items() if not k.startswith("_"))
        weights = model.get("weights_path") or "none: training starts from scratch"
        augment = ", ".join(f"{k}={v}" for k, v in (data.get("augment") or {}).items()) or "none"
        privacy = exp.get("privacy") or {}
        lines = [
            f"Training job {self.job_hash}",
            "",
            "Model",
            f"  network: {target} ({', '.join(f'{k}={v}' for k, v in net.items())})",
            f"  optimiser: {optimizer_name} ({settings})",
            f"  starting weights: {weights}",
            "Data used at this site",
            "  this site's preprocessed, identifier-free cache: its training split to train,",
            "  its validation split to score each round's global model",
            f"  images {data['image_size']} px, batch {data['batch_size']}, augmentation: {augment}",
            "  what leaves the site: model parameters, the number of training images, scalar metrics",
            "Rounds",
            f"  {self.num_rounds} rounds x {self.local_epochs} local epochs; at least "
            f"{fed['min_sites']} sites per round",
            "Privacy",
            f"  {self.privacy_text()}",
        ]
        if self.epsilon_budget is not None:
            lines.append(
                f"  per-sample clipping {privacy['max_grad_norm']}, accountant {privacy['accountant']}; "
                "this site refuses any round that would take its cumulative epsilon past the budget"
            )
        lines += [
            f"  secure aggregation (SecAgg+): {'on' if fed.get('secure_aggregation') else 'off'}",
            "Code",
            f"  fedrad {self.fedrad_version}, code hash {self.code_hash}",
            "  (the hash of the installed pipeline/, models/ and transforms/ sources, the",
            "  repository's scripts/ when fedrad runs from a checkout, and the name==version of every",
            "  installed Python distribution: a site running other code or other package versions",
            "  computes another job hash, and this approval does not cover it)",
            "",
            "Full experiment configuration:",
            json.dumps(exp, indent=2, sort_keys=True),
        ]
        return "\n".join(lines)
