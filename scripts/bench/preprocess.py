"""Time the site preprocessing against a bare pydicom loop, and with two worker processes.

For developers checking or re-measuring a figure of docs/benchmarks.md (each recorded there
with its date, commit and command); no options are required.

    python scripts/bench/preprocess.py                  # both file sets below
    python scripts/bench/preprocess.py --repeats 5 --copies 16 --image-size 128

Two sets of real radiographs, measured in the same run:

- ``dicom`` (the headline figures): the real CR DICOM files of ``data/dicom`` as a PACS
  export holds them: a 1024 px JPEG baseline chest film (and its MONOCHROME1 twin), a
  1955x1841 JPEG 2000 chest CR, and two 1760 px JPEG 2000 CRs of a lower leg (lossy and
  lossless, whose body part the benchmark's rules accept so that every file is processed).
  ``--copies`` times each (default 8).
- ``thumbnails``: every DICOM file of the three demo sites (``prepare_demo_sites``: Kermany
  images of 256 px or less wrapped as 12-bit DICOM), ``--thumbnail-copies`` times each
  (default 3). At this size the fixed cost per file (hashing, header, LUTs, cache write)
  weighs against a read + resize of well under a millisecond.

Every copy is a new instance (new SOPInstanceUID; uncompressed pixels shifted by one grey
level per copy), so no two files are duplicates.

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
images/s over bare images/s on the ``dicom`` set, target >= 0.9), ``speedup_2_workers``
(target >= 1.7), the same two for the thumbnails (``ratio_thumbnails``,
``speedup_2_workers_thumbnails``) and every set's images/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.cli import answer_argparse_help, benchmark_parser


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (median)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--copies", type=int, default=8, help="copies of each real DICOM file")
    parser.add_argument("--thumbnail-copies", type=int, default=3, help="copies of each demo DICOM file")
    return parser.parse_args()


if __name__ == "__main__":
    answer_argparse_help(parse_args)  # before torch and the pipeline are imported

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from pipeline.contracts.files import write_csv  # noqa: E402
from pipeline.contracts.layout import SitePaths  # noqa: E402
from pipeline.governance.revocation import preprocess_consented  # noqa: E402
from pipeline.support.demo_sites import prepare_demo_sites  # noqa: E402
from transforms.image import resize_square  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DICOM_FILES = (
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "Fake_MONOHR1.dcm",
    "RG1_J2KI.dcm",
    "RG3_J2KI.dcm",
    "RG3_J2KR.dcm",
)


def distinct_copy(source: Path, target: Path, copy: int) -> None:
    """Copy ``source`` as a new instance: new SOPInstanceUID, uncompressed pixels ``+copy``."""
    ds = pydicom.dcmread(source)
    uid = generate_uid(entropy_srcs=["fedrad-bench", str(copy), str(source)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    if copy and not ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.PixelData = (ds.pixel_array + copy).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(target)


def file_sets(root: Path) -> dict[str, list[Path]]:
    """The source files of each benchmark set (see the module docstring)."""
    demo = prepare_demo_sites(root / "demo", n_sites=3)
    return {
        "dicom": [REPO / "data" / "dicom" / name for name in DICOM_FILES],
        "thumbnails": [p for site in demo for p in sorted(site.input_dir.glob("*.dcm"))],
    }


def build_site(root: Path, name: str, sources: list[Path], copies: int) -> SitePaths:
    """One site holding ``copies`` distinct copies of every file of ``sources``, all labelled."""
    site = SitePaths.under(root, name)
    site.input_dir.mkdir(parents=True)
    names = []
    for copy in range(copies):
        for number, source in enumerate(sources):
            name = f"c{copy:02d}_{number:05d}.dcm"
            distinct_copy(source, site.input_dir / name, copy)
            names.append(name)
    write_csv(site.labels_csv, pd.DataFrame({"file": names, "label": "normal"}))
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
    summary = preprocess_consented(fresh, {**cfg, "workers": workers})
    elapsed = time.perf_counter() - started
    if summary.processed != summary.files or summary.status.get("accepted", 0) != summary.files:
        raise RuntimeError(f"benchmark site not fully accepted: {summary.text()}")
    return elapsed


MODES = ("bare", "site_1_worker", "site_2_workers")


def main() -> None:
    args = parse_args()
    cfg = {
        "version": 0,
        "image_size": args.image_size,
        "acceptance": {
            "modalities": ["CR", "DX"],
            "body_parts": ["CHEST", "EXTREMITY"],
            "views": ["PA", "AP"],
            "min_rows": 64,
            "min_cols": 64,
        },
        "split": {"val_fraction": 0.15, "test_fraction": 0.2, "seed": 0},
    }
    copies = {"dicom": args.copies, "thumbnails": args.thumbnail_copies}
    times = {name: {mode: [] for mode in MODES} for name in copies}
    with tempfile.TemporaryDirectory(prefix="fedrad-bench-") as tmp:
        sites = {
            name: build_site(Path(tmp), name, sources, copies[name])
            for name, sources in file_sets(Path(tmp)).items()
        }
        files = {name: sorted(site.input_dir.iterdir()) for name, site in sites.items()}
        for name in sites:  # warm-up: imports, decoder plugins, page cache
            time_bare(files[name][:20], args.image_size)
        runs = itertools.count()
        for _ in range(args.repeats):
            for name, site in sites.items():
                times[name]["bare"].append(time_bare(files[name], args.image_size))
                times[name]["site_1_worker"].append(time_site(site, cfg, workers=1, run=next(runs)))
                times[name]["site_2_workers"].append(time_site(site, cfg, workers=2, run=next(runs)))
    result: dict = {"image_size": args.image_size, "repeats": args.repeats}
    for name, measured in times.items():
        median = {mode: statistics.median(values) for mode, values in measured.items()}
        rate = {mode: len(files[name]) / seconds for mode, seconds in median.items()}
        print(f"{name}: {len(files[name])} files")
        for mode in MODES:
            print(
                f"  {mode:15s} {rate[mode]:8.1f} images/s  (median of {args.repeats}: {median[mode]:.2f} s)"
            )
        suffix = "" if name == "dicom" else f"_{name}"
        result[f"ratio{suffix}"] = round(rate["site_1_worker"] / rate["bare"], 3)
        result[f"speedup_2_workers{suffix}"] = round(median["site_1_worker"] / median["site_2_workers"], 3)
        result[f"files{suffix}"] = len(files[name])
        result[f"images_per_s{suffix}"] = {mode: round(value, 1) for mode, value in rate.items()}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
