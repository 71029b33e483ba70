"""Time the site preprocessing against a bare pydicom loop, and with two worker processes.

    python scripts/bench/preprocess.py                   # demo sites' DICOMs + real chest files
    python scripts/bench/preprocess.py --repeats 5 --image-size 128
    python scripts/bench/preprocess.py --full-size-only --copies 10   # only the full-size real files

The files are real chest radiographs: every DICOM file of the three demo sites (built with
``prepare_demo_sites`` in a temporary folder) plus the real chest files of ``data/dicom``
(JPEG baseline, JPEG 2000). ``--copies N`` repeats the set N times (each copy with a new
SOPInstanceUID and, for uncompressed files, pixels shifted by one grey level per copy, so
no two files are duplicates) for a run long enough to amortise the worker pool's start.

Three measurements run interleaved, ``--repeats`` times each, in one process:

- bare: ``pydicom.dcmread`` + ``pixel_array`` + the same ``resize_square``, one file after
  another;
- site 1 worker / site 2 workers: ``preprocess_site`` with a fresh work folder (so every
  file is processed: hash, header, acceptance, decode, LUTs, resize, cache write, tables).
  Each run writes to a new folder and nothing is deleted until the end: deleting the last
  run's thousands of files just before would time the disk's discards of that deletion
  (``discard`` mounts) as file creation. Dirty pages are flushed (``os.sync``) before each
  timed measurement, so that none pays for the writes of the one before.

Medians are reported. The last line is ``RESULT {json}`` with ``ratio`` (site 1 worker
images/s over bare images/s, target >= 0.9) and ``speedup_2_workers`` (target >= 1.7).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.uid import generate_uid

from pipeline.demo_sites import prepare_demo_sites
from pipeline.preprocess import preprocess_site
from pipeline.sites import SitePaths
from transforms.image import resize_square

REPO = Path(__file__).resolve().parents[2]
# Fake_MONOHR1.dcm is left out: it shares its SOPInstanceUID with the SIIM file (a duplicate).
CHEST_FILES = ("1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "RG1_J2KI.dcm")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (median)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--copies", type=int, default=3, help="how many times to repeat the file set")
    parser.add_argument("--full-size-only", action="store_true",
                        help="only the full-size real chest files (1024 px JPEG, 1955x1841 JPEG 2000)")
    return parser.parse_args()


def distinct_copy(source: Path, target: Path, copy: int) -> None:
    """Copy ``source`` as a new instance: new SOPInstanceUID, uncompressed pixels ``+copy``."""
    if copy == 0:
        shutil.copyfile(source, target)
        return
    ds = pydicom.dcmread(source)
    uid = generate_uid(entropy_srcs=["fedrad-bench", str(copy), str(ds.SOPInstanceUID)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.PixelData = (ds.pixel_array + copy).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(target)


def build_site(root: Path, copies: int, full_size_only: bool) -> SitePaths:
    """One site holding every benchmark file, all labelled."""
    sources = [REPO / "data" / "dicom" / name for name in CHEST_FILES]
    if not full_size_only:
        demo = prepare_demo_sites(root / "demo", n_sites=3)
        sources += [p for site in demo for p in sorted(site.input_dir.glob("*.dcm"))]
    site = SitePaths.under(root, "bench")
    site.input_dir.mkdir(parents=True)
    names = []
    for copy in range(copies):
        for number, source in enumerate(sources):
            name = f"c{copy:02d}_{number:05d}.dcm"
            distinct_copy(source, site.input_dir / name, copy)
            names.append(name)
    pd.DataFrame({"file": names, "label": "normal"}).to_csv(site.labels_csv, index=False)
    return site


def time_bare(files: list[Path], size: int) -> float:
    os.sync()
    started = time.perf_counter()
    for path in files:
        pixels = pydicom.dcmread(path).pixel_array
        resize_square(np.asarray(pixels, np.float32), size)
    return time.perf_counter() - started


def time_site(site: SitePaths, cfg: dict, workers: int, run: int) -> float:
    """Preprocess ``site`` into a new work folder ``fedrad_<run>``."""
    fresh = dataclasses.replace(site, work_dir=site.work_dir.with_name(f"fedrad_{run}"))
    os.sync()
    started = time.perf_counter()
    summary = preprocess_site(fresh, {**cfg, "workers": workers})
    elapsed = time.perf_counter() - started
    if summary.processed != summary.files or summary.status.get("accepted", 0) != summary.files:
        raise RuntimeError(f"benchmark site not fully accepted: {summary.text()}")
    return elapsed


def main() -> None:
    args = parse_args()
    cfg = {
        "version": 0, "image_size": args.image_size,
        "acceptance": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "views": ["PA", "AP"],
                       "min_rows": 64, "min_cols": 64},
        "split": {"val_fraction": 0.15, "test_fraction": 0.2, "seed": 0},
    }
    with tempfile.TemporaryDirectory(prefix="fedrad-bench-") as tmp:
        site = build_site(Path(tmp), args.copies, args.full_size_only)
        files = sorted(site.input_dir.iterdir())
        time_bare(files[:20], args.image_size)  # warm-up: imports, decoder plugins, page cache
        times: dict[str, list[float]] = {"bare": [], "site_1_worker": [], "site_2_workers": []}
        runs = itertools.count()
        for _ in range(args.repeats):
            times["bare"].append(time_bare(files, args.image_size))
            times["site_1_worker"].append(time_site(site, cfg, workers=1, run=next(runs)))
            times["site_2_workers"].append(time_site(site, cfg, workers=2, run=next(runs)))
    median = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: len(files) / seconds for name, seconds in median.items()}
    for name in times:
        print(f"{name:15s} {rate[name]:8.1f} images/s  (median of {args.repeats}: "
              f"{median[name]:.2f} s for {len(files)} files)")
    result = {
        "files": len(files),
        "image_size": args.image_size,
        "images_per_s": {name: round(value, 1) for name, value in rate.items()},
        "ratio": round(rate["site_1_worker"] / rate["bare"], 3),
        "speedup_2_workers": round(median["site_1_worker"] / median["site_2_workers"], 3),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
