"""Score a trained model (``model.pt``) on the held-out images of one or more site caches.

    python scripts/evaluate.py outputs/runs/X/model.pt outputs/demo_sites/site1/fedrad/cache \
        --split test --output-dir outputs/eval

Writes ``metrics.json``, ``confusion_matrix.png`` and ``roc.png`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cache import SPLITS
from pipeline.evaluation import evaluate_checkpoint, summary_line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="model.pt written by training or the federation")
    parser.add_argument("cache_dirs", type=Path, nargs="+", help="preprocessed site cache folders")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to score (default: test)")
    parser.add_argument(
        "--output-dir", type=Path, default=None,
        help="where the report goes (default: an 'evaluation' folder next to the checkpoint)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = args.output_dir or args.checkpoint.parent / "evaluation"
    metrics = evaluate_checkpoint(args.checkpoint, args.cache_dirs, output_dir, split=args.split)
    print(f"{args.split}: {summary_line(metrics)}")
    print(f"report in {output_dir}")


if __name__ == "__main__":
    main()
