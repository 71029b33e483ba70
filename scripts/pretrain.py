r"""Pretrain the model on a public data set the coordinator holds, to start a federation warm.

For ML engineers at the coordinator. Required: pretrain.input_dir=<public images> and pretrain.labels_csv=<their labels.csv>.

    python scripts/pretrain.py pretrain.input_dir=/data/public/images \
        pretrain.labels_csv=/data/public/labels.csv model=resnet18_groupnorm data.image_size=128
    python scripts/simulate.py experiment=pneumonia_primia model.weights_path=outputs/pretrain/pretrained.pt

The public folder is preprocessed like a site (its own cache and report.csv under
pretrain.work_dir), trained on centrally for pretrain.epochs, and written to pretrain.output.
Its patients must not be any site's patients. Start from ImageNet weights a hospital holds with
model.weights_path=<file> model.weights_strict=false.
"""

from __future__ import annotations

import logging

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.contracts.messages import NUM_EXAMPLES  # noqa: E402
from pipeline.training.pretraining import pretrain  # noqa: E402

log = logging.getLogger("fedrad.pretrain")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors(bool(cfg.verbose)):
        output, metrics = pretrain(cfg)
    scores = "  ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if k != NUM_EXAMPLES)
    log.info("pretrained weights: %s  (public validation: %s)", output, scores or "no val split")


if __name__ == "__main__":
    main()
