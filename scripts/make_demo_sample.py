"""Select the embedded demo sample (data/demo/kermany) from the shared Kermany copy.

For maintainers rebuilding the embedded sample; needs a copy of the Kermany images (``--source``).

    python scripts/make_demo_sample.py --source ../shared/data/kermany --per-class 72

Whole patients only (a patient's images are never split between sample and rest), the
three classes roughly balanced, reproducible for a given seed. Each image is resized to
``--long-side`` px on its long side (Lanczos) and stored as an 8-bit grayscale PNG.
Only needed to rebuild the sample; nothing at run time reads ``--source``.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.contracts.files import write_csv

REPO = Path(__file__).resolve().parents[1]
LABELS = {"NORMAL": "normal", "PNEUMONIA_bacteria": "bacterial", "PNEUMONIA_virus": "viral"}


def select_patients(manifest: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Rows of whole patients, added in seeded order while no class exceeds ``per_class``."""
    patients = sorted(manifest["patient_id"].unique())
    random.Random(seed).shuffle(patients)
    rows = manifest.groupby("patient_id")
    counts: Counter[str] = Counter()
    chosen = []
    for patient in patients:
        images = rows.get_group(patient)
        extra = Counter(images["label"])
        if all(counts[label] + n <= per_class for label, n in extra.items()):
            counts.update(extra)
            chosen.append(images)
        if all(counts[label] >= per_class for label in LABELS.values()):
            break
    return pd.concat(chosen).sort_values("file").reset_index(drop=True)


def write_sample(source: Path, out_dir: Path, per_class: int, long_side: int, seed: int) -> pd.DataFrame:
    """Resize the selected images into ``out_dir`` and write its manifest.csv."""
    manifest = pd.read_csv(source / "manifest.csv")
    manifest["label"] = manifest["label_3class"].map(LABELS)
    if manifest["label"].isna().any():
        raise ValueError(f"{source / 'manifest.csv'}: label_3class outside {sorted(LABELS)}")
    sample = select_patients(manifest, per_class, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        stale.unlink()
    names = []
    for row in sample.itertuples():
        name = f"{row.label}_{Path(row.file).stem}.png"
        with Image.open(source / row.file) as image:
            image = image.convert("L")
            scale = long_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image.resize(size, Image.Resampling.LANCZOS).save(out_dir / name, optimize=True)
        names.append(name)
    table = pd.DataFrame({"file": names, "label": sample["label"], "patient_id": sample["patient_id"]})
    write_csv(out_dir / "manifest.csv", table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=Path("../shared/data/kermany"),
        help="Kermany copy with manifest.csv (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "data" / "demo" / "kermany",
        help="output folder (default: data/demo/kermany)",
    )
    parser.add_argument("--per-class", type=int, default=72, help="images per class, at most")
    parser.add_argument("--long-side", type=int, default=224, help="long side in pixels")
    parser.add_argument("--seed", type=int, default=2018)
    args = parser.parse_args()
    if not (args.source / "manifest.csv").is_file():
        parser.error(f"no manifest.csv under --source {args.source}: point it at the Kermany copy")
    table = write_sample(args.source, args.out, args.per_class, args.long_side, args.seed)
    print(f"{len(table)} images of {table['patient_id'].nunique()} patients -> {args.out}")
    print(table["label"].value_counts().to_string())


if __name__ == "__main__":
    main()
