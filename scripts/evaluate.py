"""Score a trained model (``model.pt``) on the held-out images of one or more site caches.

    python scripts/evaluate.py outputs/runs/X/model.pt outputs/demo_sites/site1/fedrad/cache \
        --reads data/demo/reads_sample.csv --output-dir outputs/eval

Writes ``metrics.json``, ``confusion_matrix.png`` and ``roc.png`` into ``--output-dir``, and
the clinicians' report (``report.html``, ``report.json``, figures as PNG) into its
``report/`` folder: the model against the radiologist reads of ``--reads``, if given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPORT_DIR = "report"
SPLITS = ("train", "test")  # scored splits; the threshold is chosen on val


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="model.pt written by training or the federation")
    parser.add_argument("cache_dirs", type=Path, nargs="+", help="preprocessed site cache folders")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="split to score (default: test; the threshold is chosen on val)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the report goes (default: an 'evaluation' folder next to the checkpoint)",
    )
    parser.add_argument(
        "--reads",
        type=Path,
        default=None,
        help="CSV of radiologist reads: image,reader,label[,site][,confidence]",
    )
    parser.add_argument(
        "--site-names",
        nargs="+",
        default=None,
        help="one name per cache (default: the folder above fedrad/cache, e.g. site1)",
    )
    parser.add_argument(
        "--threshold",
        choices=("youden", "sensitivity"),
        default="youden",
        help="how the pneumonia threshold is chosen on the validation split (default: youden)",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.9,
        help="validation sensitivity to reach with --threshold sensitivity (default: 0.9)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples of patients (default: 2000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # --help answers before the training stack is imported
    from pipeline.evaluation.clinical import ReadsError, ReportOptions, build_report, write_clinical_report
    from pipeline.evaluation.scoring import summary_line, write_report

    output_dir = args.output_dir or args.checkpoint.parent / "evaluation"
    options = ReportOptions(
        split=args.split,
        threshold_method=args.threshold,
        target_sensitivity=args.target_sensitivity if args.threshold == "sensitivity" else None,
        n_resamples=args.bootstrap,
        seed=args.seed,
    )
    try:
        report, cases = build_report(args.checkpoint, args.cache_dirs, args.reads, args.site_names, options)
    except ReadsError as error:
        sys.exit(f"error: {error}")
    metrics = write_report(cases.probabilities, cases.labels, list(cases.patient_keys), output_dir)
    html = write_clinical_report(report, output_dir / REPORT_DIR)
    print(f"{args.split}: {summary_line(metrics)}")
    for warning in (report["reads"] or {}).get("warnings", []):
        print(f"reads warning: {warning}")
    print(f"report in {output_dir}; open {html} in a browser")


if __name__ == "__main__":
    main()
