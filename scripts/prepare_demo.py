"""Build the simulated hospitals of the demo from the embedded sample (data/demo/kermany).

For anyone trying fedrad on one machine (``make demo`` runs it); no options are required.

    python scripts/prepare_demo.py                          # 3 sites under outputs/demo_sites
    python scripts/prepare_demo.py --sites 4 --root /tmp/x  # other count / place

Writes <root>/site<N>/dicom/img_NNNN.dcm, labels.csv and site_secret.key (kept when present).
Sites hold disjoint patients and a skewed class mix; reruns rewrite only changed files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.support.demo_sites import prepare_demo_sites


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=Path("outputs/demo_sites"), help="output root (default: %(default)s)"
    )
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient assignment and headers")
    parser.add_argument(
        "--skew",
        type=float,
        default=1.0,
        help="extra share of one class per site: 0 = IID (default: %(default)s)",
    )
    parser.add_argument(
        "--max-images", type=int, default=None, help="cap per site, whole patients (for quick tests)"
    )
    args = parser.parse_args()
    for site in prepare_demo_sites(args.root, args.sites, args.seed, args.skew, args.max_images):
        count = sum(1 for _ in site.input_dir.glob("*.dcm"))
        print(f"{site.name}: {count} DICOM files in {site.input_dir}")


if __name__ == "__main__":
    main()
