"""The release policy: a model leaves only if its attack audit stays within the thresholds."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.ingestion.pseudonym import file_sha256


@dataclass(frozen=True)
class ReleasePolicy:
    """``audit.release`` in the config: the most an audit may show."""

    max_membership_auc: float
    max_tpr_at_1pct_fpr: float
    max_reconstruction_ssim: float

    @classmethod
    def from_config(cls, release: DictConfig) -> "ReleasePolicy":
        return cls(
            max_membership_auc=float(release.max_membership_auc),
            max_tpr_at_1pct_fpr=float(release.max_tpr_at_1pct_fpr),
            max_reconstruction_ssim=float(release.max_reconstruction_ssim),
        )


def release_metrics(membership: dict[str, Any], inversion: dict[str, Any]) -> dict[str, Any]:
    """The figures the policy checks: the strongest membership attack and the reconstruction
    SSIM under the protection the model was trained with."""
    attacks = {
        name: result for name, result in membership.items() if isinstance(result, dict) and "auc" in result
    }
    auc_attack = max(attacks, key=lambda name: attacks[name]["auc"])
    tpr_attack = max(attacks, key=lambda name: attacks[name]["tpr_at_fpr"]["0.01"])
    return {
        "membership_auc": attacks[auc_attack]["auc"],
        "membership_auc_attack": auc_attack,
        "tpr_at_1pct_fpr": attacks[tpr_attack]["tpr_at_fpr"]["0.01"],
        "tpr_attack": tpr_attack,
        "reconstruction_ssim": inversion["ssim"],
        "reconstruction_protection": inversion["protection"],
    }


def check_release(audit_result: dict[str, Any], policy: ReleasePolicy) -> list[str]:
    """Every threshold one audited model's ``release_metrics`` exceed (empty: it may be released)."""
    m = audit_result["release_metrics"]
    checks = [
        (
            m["membership_auc"],
            policy.max_membership_auc,
            "max_membership_auc",
            f"membership attack ROC-AUC ({m['membership_auc_attack']})",
        ),
        (
            m["tpr_at_1pct_fpr"],
            policy.max_tpr_at_1pct_fpr,
            "max_tpr_at_1pct_fpr",
            f"membership attack TPR at 1% FPR ({m['tpr_attack']})",
        ),
        (
            m["reconstruction_ssim"],
            policy.max_reconstruction_ssim,
            "max_reconstruction_ssim",
            f"gradient-inversion SSIM (protection: {m['reconstruction_protection']})",
        ),
    ]
    return [
        f"{what} {value:.3f} exceeds audit.release.{key} = {limit:.3f}"
        for value, limit, key, what in checks
        if value > limit
    ]


class ReleaseRefused(Exception):
    """The model may not be released; the message says why."""


def audited_entry(model: Path, audit_json: Path) -> dict[str, Any]:
    """The entry of ``audit_json`` for this exact model file (matched by sha256)."""
    if not audit_json.is_file():
        raise ReleaseRefused(
            f"no audit at {audit_json}: run scripts/audit_privacy.py audit.checkpoint={model} first"
        )
    digest = file_sha256(model)
    entries = [e for e in json.loads(audit_json.read_text())["models"] if e["sha256"] == digest]
    if not entries:
        raise ReleaseRefused(
            f"{audit_json} does not audit this model file ({model}, sha256 {digest[:12]}…): the file changed "
            "since the audit or the audit is of another model; audit it again"
        )
    return entries[0]


def release_model(model: Path, audit_json: Path, policy: ReleasePolicy, release_dir: Path) -> Path:
    """Copy ``model`` and its audit into ``release_dir`` if the audit passes ``policy``;
    raise :class:`ReleaseRefused` naming every violated threshold otherwise."""
    entry = audited_entry(model, audit_json)
    violations = check_release(entry, policy)
    if violations:
        raise ReleaseRefused(f"{model} is not released: " + "; ".join(violations))
    release_dir.mkdir(parents=True, exist_ok=True)
    target = release_dir / model.name
    shutil.copy2(model, target)
    shutil.copy2(audit_json, release_dir / audit_json.name)
    if file_sha256(target) != entry["sha256"]:
        target.unlink()
        raise ReleaseRefused(f"the copy of {model} in {release_dir} does not match the audited file")
    return target
