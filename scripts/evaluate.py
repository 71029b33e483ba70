"""Score a trained model (``model.pt``) on site caches and write the clinicians' report.

For whoever evaluates a model at a site (the caches and the reads never leave it).

    python scripts/evaluate.py outputs/runs/X/model.pt outputs/demo_sites/site1/fedrad/cache \
        --reads data/demo/reads_sample.csv --output-dir outputs/eval
    python scripts/evaluate.py outputs/runs/X/model.pt /data/hospitalB/fedrad/cache --external

The model calls pneumonia at its own operating threshold, chosen on the federation's validation
images and stored in ``model.pt`` (``--threshold`` overrides it). ``--external`` scores every
image of sites that did not train the model (all splits, nothing re-split). Writes
``metrics.json``, ``confusion_matrix.png`` and ``roc.png`` into ``--output-dir`` (default: a new
folder under ``outputs/evaluations/``), and the clinicians' report (``report.html``,
``report.json``, figures as PNG) into its ``report/`` folder: with ``--reads``, the model
against the radiologist reads.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

REPORT_DIR = "report"
SPLITS = ("test", "val", "train", "all")
CLINICAL_DEFAULT = Path(__file__).resolve().parents[1] / "conf" / "clinical" / "default.yaml"


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="model.pt written by training or the federation")
    parser.add_argument("cache_dirs", type=Path, nargs="+", help="preprocessed site cache folders")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="split to score, or all of them (default: test; all with --external)",
    )
    parser.add_argument(
        "--external",
        action="store_true",
        help="the caches are external sites that did not train the model: score every image",
    )
    parser.add_argument(
        "--threshold",
        type=probability,
        default=None,
        help="operating threshold on P(pneumonia) instead of the model's own",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=probability,
        default=None,
        help="choose the threshold again on the model's validation counts: the highest reaching this",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the report goes (default: outputs/evaluations/<date_time>)",
    )
    parser.add_argument(
        "--reads",
        type=Path,
        default=None,
        help="CSV of radiologist reads: image,reader,label[,site][,confidence][,simulated]",
    )
    parser.add_argument(
        "--simulated-reads",
        action="store_true",
        help="the reads are simulated, not a radiologist's: the report says so in a banner",
    )
    parser.add_argument(
        "--site-names",
        nargs="+",
        default=None,
        help="one name per cache (default: the folder above fedrad/cache, e.g. site1)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples of patients (default: 2000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    args = parser.parse_args(argv)
    if args.external and args.split not in (None, "all"):
        parser.error("--external scores every image of the external sites: leave out --split")
    if args.threshold is not None and args.target_sensitivity is not None:
        parser.error("--threshold and --target-sensitivity are two ways to set the threshold: give one")
    args.split = args.split or ("all" if args.external else "test")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # --help answers before the training stack is imported
    from omegaconf import DictConfig, OmegaConf

    from pipeline.cli import one_line_errors
    from pipeline.evaluation.clinical import ReadsError, ReportOptions, build_report, write_clinical_report
    from pipeline.evaluation.provenance import statement
    from pipeline.evaluation.scoring import summary_line, write_report

    output_dir = args.output_dir or Path("outputs/evaluations") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    options = ReportOptions(
        split=args.split,
        external=args.external,
        threshold=args.threshold,
        target_sensitivity=args.target_sensitivity,
        simulated_reads=args.simulated_reads,
        n_resamples=args.bootstrap,
        seed=args.seed,
    )
    with one_line_errors():
        default = OmegaConf.load(CLINICAL_DEFAULT)
        assert isinstance(default, DictConfig)
        try:
            report, cases = build_report(
                args.checkpoint,
                args.cache_dirs,
                args.reads,
                args.site_names,
                options,
                statement(args.checkpoint, default),
            )
        except ReadsError as error:
            sys.exit(f"error: {error}")
        threshold = report["threshold"]["value"]
        metrics = write_report(
            cases.probabilities, cases.labels, list(cases.patient_keys), output_dir, threshold
        )
        html = write_clinical_report(report, output_dir / REPORT_DIR)
    print(f"{args.split}{' (external)' if args.external else ''}: {summary_line(metrics)}")
    for warning in [*report["warnings"], *(report["reads"] or {}).get("warnings", [])]:
        print(f"warning: {warning}")
    print(f"report in {output_dir}; open {html} in a browser")


if __name__ == "__main__":
    main()
