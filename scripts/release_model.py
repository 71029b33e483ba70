"""Release a model only if its privacy audit exists, is of this exact file and passes the policy.

For the privacy officer. Required: release.model=<model.pt> (its audit must exist next to it or
at release.audit).

    python scripts/release_model.py release.model=outputs/runs/X/model.pt
    python scripts/release_model.py release.model=runs/demo_private/model.pt \
        release.audit=runs/audit/audit.json audit.release.folder=outputs/releases/v1

The audit (``audit.json`` of ``scripts/audit_privacy.py``; default ``audit/audit.json``
next to the model) must list the model file's sha256, and its figures must stay within
``audit.release`` (max membership ROC-AUC, max TPR at 1% FPR, max reconstruction SSIM).
Then the model and its audit are copied into ``audit.release.folder`` with the model card
(``model_card.html`` and ``model_card.json``: intended use, training data per site, privacy,
the audit's figures, clinical performance on the test patients of ``data.sites`` and known
limitations); otherwise the script exits with status 1 and names every violated threshold.
Run it where the audit ran: the card scores the model on every site's test images.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.evaluation.audit.release import ReleasePolicy, ReleaseRefused, release_model  # noqa: E402
from pipeline.evaluation.audit.report import AUDIT_JSON  # noqa: E402
from pipeline.evaluation.model_card import write_release_card  # noqa: E402

log = logging.getLogger("fedrad.release")


@hydra.main(config_path="../conf", config_name="release_model", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model = Path(cfg.release.model)
    audit_json = Path(cfg.release.audit or model.parent / "audit" / AUDIT_JSON)
    policy = ReleasePolicy.from_config(cfg.audit.release)
    try:
        released = release_model(model, audit_json, policy, Path(cfg.audit.release.folder))
    except ReleaseRefused as refusal:
        log.error("%s", refusal)
        sys.exit(1)
    log.info("released %s", released)
    with one_line_errors(bool(cfg.verbose)):
        card = write_release_card(model, audit_json, policy, cfg)
    log.info("model card: %s", card)


if __name__ == "__main__":
    main()
