"""Attack a trained model and report what leaks: membership inference and gradient inversion.

For the privacy officer, on a machine that holds every site's images (the attacks need the
training and the held-out images of every site; never the coordinator). Required:
audit.checkpoint=<model.pt>.

    python scripts/audit_privacy.py audit.checkpoint=outputs/runs/X/model.pt
    python scripts/audit_privacy.py audit.checkpoint=runs/demo/model.pt \
        audit.compare_checkpoint=runs/demo_private/model.pt audit.output_dir=runs/audit
    python scripts/audit_privacy.py audit.checkpoint=... audit.membership.shadow_models=0   # loss attack only
    python scripts/audit_privacy.py audit.checkpoint=... audit.include_images=false   # a report to share

Members are the training patients of ``data.sites`` (under ``data.sites_root``), non-members
their validation and test patients. Each model is audited with the configuration of the run
that wrote it (its ``.hydra/config.yaml``). Writes ``audit.html`` (self-contained),
``audit.json`` and the figures into ``audit.output_dir`` (default: ``audit/`` next to
``audit.checkpoint``), and logs each model's release verdict under ``audit.release``. With
``audit.include_images=false`` the report leaves out the attacked training image and its
reconstructions.
"""

from __future__ import annotations

import logging

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.evaluation.audit.report import write_audit_report  # noqa: E402
from pipeline.evaluation.audit.run import audit_output_dir, run_audit  # noqa: E402

log = logging.getLogger("fedrad.audit")


@hydra.main(config_path="../conf", config_name="audit_privacy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors(bool(cfg.verbose)):
        audit, images = run_audit(cfg)
        html = write_audit_report(audit, images, audit_output_dir(cfg))
    for model in audit["models"]:
        metrics = model["release_metrics"]
        log.info(
            "%s: membership AUC %.3f, TPR at 1%% FPR %.3f, reconstruction SSIM %.3f: %s",
            model["name"],
            metrics["membership_auc"],
            metrics["tpr_at_1pct_fpr"],
            metrics["reconstruction_ssim"],
            "; ".join(model["release"]["violations"]) or "within the release policy",
        )
    log.info("audit report: %s", html)


if __name__ == "__main__":
    main()
