"""Write SIMULATED radiologist reads of the demo sites (not real reads) for the report demo.

For maintainers of the demo, after the demo sites change; no options are required.

    python scripts/simulate_reads.py                     # writes data/demo/reads_sample.csv
    python scripts/simulate_reads.py --output reads.csv

Every image of the three demo sites (as built by ``scripts/prepare_demo.py``: same files
``img_NNNN.dcm`` on every machine) gets one read per simulated reader. A reader calls the
true label, except that with probability ``1 - sensitivity`` a pneumonia is called normal,
with probability ``1 - specificity`` a normal image is called pneumonia, and a pneumonia
called as such gets the wrong type with probability ``type_confusion``. The confidence is
drawn higher for right calls than for wrong ones. The draws depend only on ``--seed``.
Which images fall in the test split depends on each site's secret, so all images are read.
Every row says ``simulated=yes``: the clinical report shows a banner saying the reads are simulated.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.contracts.files import write_csv
from pipeline.contracts.labels import CLASS_NAMES, NORMAL_INDEX
from pipeline.support.demo_sites import load_sample, plan_sites

REPO = Path(__file__).resolve().parents[1]
SAMPLE_READS = REPO / "data" / "demo" / "reads_sample.csv"
DEMO_SITES = 3  # as scripts/prepare_demo.py and the demo configuration
NORMAL = CLASS_NAMES[NORMAL_INDEX]


@dataclass(frozen=True)
class SimulatedReader:
    name: str
    sensitivity: float
    specificity: float
    type_confusion: float  # probability of naming the wrong pneumonia type
    three_class: bool = True  # False: reads normal / pneumonia only


READERS = (
    SimulatedReader("R1", sensitivity=0.93, specificity=0.80, type_confusion=0.25),
    SimulatedReader("R2", sensitivity=0.85, specificity=0.92, type_confusion=0.35),
    SimulatedReader("R3", sensitivity=0.90, specificity=0.88, type_confusion=0.0, three_class=False),
)


def simulated_read(reader: SimulatedReader, truth: str, rng: random.Random) -> tuple[str, float]:
    """One (label, confidence) read of an image whose true label is ``truth``."""
    if truth == NORMAL:
        call = NORMAL if rng.random() < reader.specificity else rng.choice(CLASS_NAMES[1:])
    elif rng.random() < reader.sensitivity:
        other = next(c for c in CLASS_NAMES[1:] if c != truth)
        call = other if rng.random() < reader.type_confusion else truth
    else:
        call = NORMAL
    right = (call == NORMAL) == (truth == NORMAL)
    confidence = rng.uniform(0.6, 1.0) if right else rng.uniform(0.5, 0.8)
    label = call if reader.three_class or call == NORMAL else "pneumonia"
    return label, round(confidence, 2)


def simulate_reads(seed: int = 0) -> pd.DataFrame:
    """Columns site, image, reader, label, confidence, simulated: every demo image read by every reader."""
    rows = []
    for images in plan_sites(load_sample(), n_sites=DEMO_SITES, seed=0, skew=1.0, max_images=None):
        for image in images:
            for reader in READERS:
                rng = random.Random(f"{seed}-{reader.name}-{image.site}-{image.number}")
                label, confidence = simulated_read(reader, image.label, rng)
                rows.append((f"site{image.site}", image.file_name, reader.name, label, confidence, "yes"))
    return pd.DataFrame(rows, columns=["site", "image", "reader", "label", "confidence", "simulated"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:3]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", type=Path, default=SAMPLE_READS, help=f"CSV to write (default: {SAMPLE_READS.relative_to(REPO)})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated reads (default: 0)")
    args = parser.parse_args(argv)
    reads = simulate_reads(args.seed)
    write_csv(args.output, reads)
    print(f"{len(reads)} SIMULATED reads by {reads['reader'].nunique()} readers written to {args.output}")


if __name__ == "__main__":
    main()
