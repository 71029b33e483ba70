"""How a federation's cost grows with its number of sites: 3, 10, 25 and 50 simulated sites.

For developers checking or re-measuring a figure of docs/benchmarks.md (each recorded there
with its date, commit and command); no options are required.

    python scripts/bench/scale.py                        # 3, 10, 25, 50 sites, plain and SecAgg+
    python scripts/bench/scale.py --sizes 3,10 --rounds 2 --no-dropout

Every federation is the same experiment (``experiment=demo`` with ``model=small_cnn``, 32 px,
one local epoch per round, ``--rounds`` rounds, training and evaluation every round), once in
plain FedAvg and once under SecAgg+. Site ``k`` holds ``--images`` real chest X-rays
(whole patients, drawn with a seed per site) from the Kermany images of ``shared/data/kermany``
when present, else from the embedded demo sample: every site has the same amount of work, and
sites of different federations are the same folders (``outputs/bench/scale_sites/site<k>``,
preprocessed once). Images recur across sites: the benchmark measures cost, not utility.

Each (size, mode) runs in its own process under Flower's simulation engine (Ray), one site at a
time with all cores (``federation.client_cpus`` = the number of cores), so that a round's wall
time is the sum of the sites' work and the coordinator's:

* wall time per site-round: ``wall_s`` of ``rounds.jsonl`` summed over rounds 2 to ``--rounds``
  (round 1 includes start-up), divided by sites x rounds;
* the coordinator's peak resident memory: the peak RSS of that process (Flower's ServerApp and
  simulation engine run there; the sites run in Ray's worker processes).

``secagg_50_dropout_ok``: one SecAgg+ round of the largest federation over an in-process grid
(:class:`pipeline.support.flower_grid.LoopbackGrid`) in which five sites drop out after the key
exchange; true when exactly the others trained and the released model equals the
example-weighted average of their stored updates within SecAgg+'s quantisation bound.

The last line is ``RESULT {json}`` with ``per_site_round_ratio_50_vs_3``, ``rss_ratio_50_vs_3``,
``secagg_per_site_round_ratio_50_vs_3`` and ``secagg_50_dropout_ok`` (for ``--sizes`` without 3
or 50, the smallest and the largest size), plus every measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline.cli import answer_argparse_help, benchmark_parser


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", default="3,10,25,50", help="comma-separated numbers of sites")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=30, help="images per site")
    parser.add_argument("--modes", default="plain,secagg", help="plain, secagg or both")
    parser.add_argument("--no-dropout", action="store_true", help="skip the SecAgg+ dropout round")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--secure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    answer_argparse_help(parse_args)  # before torch and the pipeline are imported

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.contracts.labels import CLASS_NAMES  # noqa: E402
from pipeline.contracts.layout import SitePaths  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KERMANY = REPO.parent / "shared" / "data" / "kermany"
DEMO_SAMPLE = REPO / "data" / "demo" / "kermany"
SITES_ROOT = REPO / "outputs" / "bench" / "scale_sites"
INPUT_SUBDIR = "images"
IMAGE_SIZE = 32
DROPOUTS = 5
# label_3class values of the shared Kermany manifest -> fedrad's label names
KERMANY_LABELS = {"NORMAL": "normal", "PNEUMONIA_bacteria": "bacterial", "PNEUMONIA_virus": "viral"}


# --- sites ------------------------------------------------------------------------------------


def image_pool() -> tuple[pd.DataFrame, Path]:
    """The real images sites draw from (``file``, ``label``, ``patient_id``) and their folder."""
    if (KERMANY / "manifest.csv").is_file():
        rows = pd.read_csv(KERMANY / "manifest.csv", dtype=str)
        rows = rows.assign(label=rows["label_3class"].map(KERMANY_LABELS))
        return rows[["file", "label", "patient_id"]], KERMANY
    return pd.read_csv(DEMO_SAMPLE / "manifest.csv", dtype=str), DEMO_SAMPLE


def draw_site(pool: pd.DataFrame, site: int, images: int) -> pd.DataFrame:
    """About ``images`` rows of whole patients, every class present, drawn with the site's seed."""
    rng = random.Random(f"scale-site{site}")
    chosen: list[str] = []
    count = 0
    per_patient = pool.groupby("patient_id")
    by_class = {c: sorted(pool[pool["label"] == c]["patient_id"].unique()) for c in CLASS_NAMES}
    for patients in by_class.values():
        rng.shuffle(patients)
    while count < images:
        for name in CLASS_NAMES:
            patient = by_class[name].pop()
            chosen.append(patient)
            count += len(per_patient.get_group(patient))
    return pool[pool["patient_id"].isin(chosen)]


def build_sites(count: int, images: int, cfg: DictConfig) -> None:
    """``site1`` .. ``site<count>`` under :data:`SITES_ROOT`, laid out and preprocessed (once)."""
    from pipeline.governance.revocation import preprocess_consented

    pool, source = image_pool()
    for number in range(1, count + 1):
        site = SitePaths.under(SITES_ROOT, f"site{number}", INPUT_SUBDIR)
        if not site.labels_csv.is_file():
            rows = draw_site(pool, number, images)
            for file in rows["file"]:
                target = site.input_dir / Path(file).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / file, target)
            rows.assign(file=[Path(f).name for f in rows["file"]]).to_csv(site.labels_csv, index=False)
        preprocess_consented(site, cfg.preprocess)


def site_config(sites: int, secure: bool, rounds: int) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "experiment=demo",
                "model=small_cnn",
                f"data.image_size={IMAGE_SIZE}",
                f"data.sites_root={SITES_ROOT}",
                f"data.sites=[{','.join(f'site{k}' for k in range(1, sites + 1))}]",
                f"data.input_subdir={INPUT_SUBDIR}",
                "data.prepare_demo=false",
                "preprocess.workers=1",
                "federation.local_epochs=1",
                f"federation.num_rounds={rounds}",
                f"federation.min_sites={sites - DROPOUTS if sites > 2 * DROPOUTS else sites}",
                f"federation.client_cpus={os.cpu_count() or 1}",
                f"federation.secure_aggregation={str(secure).lower()}",
                "federation.selection.metric=null",
                "trainer.enable_progress_bar=false",
            ],
        )


# --- one federation, in its own process ---------------------------------------------------------


class CpuMeter(threading.Thread):
    """CPU seconds of this process's descendants (Ray's workers), sampled every second: a
    measure of the federation's work that other load on the machine does not inflate."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            for process in psutil.Process().children(recursive=True):
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                self.seen[process.pid] = times.user + times.system


def child(sites: int, secure: bool, rounds: int, out: Path) -> None:
    """Federate ``sites`` sites; print their round times, CPU seconds and this process's peak
    RSS as JSON."""
    from pipeline.federation.resume import round_wall_times
    from pipeline.federation.simulation import simulate

    cfg = site_config(sites, secure, rounds)
    paths = [SitePaths.under(SITES_ROOT, name, INPUT_SUBDIR) for name in cfg.data.sites]
    meter = CpuMeter()
    meter.start()
    start, cpu = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0]
    simulate(cfg, paths, out)
    meter.done.set()
    result = {
        "round_s": round_wall_times(out),
        "total_s": time.perf_counter() - start,
        "coordinator_cpu_s": time.process_time() - cpu,
        "total_cpu_s": time.process_time() - cpu + sum(meter.seen.values()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average": [round(load, 1), round(os.getloadavg()[0], 1)],
    }
    print(json.dumps(result))


def measure(sites: int, secure: bool, rounds: int) -> dict:
    """Run :func:`child` in a fresh process and return its measurements."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--child", str(sites), "--rounds", str(rounds), "--out", out]
        done = subprocess.run(
            [*command, *(["--secure"] if secure else [])],
            cwd=REPO,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{sites} sites ({'secagg' if secure else 'plain'}) failed:\n{done.stderr[-4000:]}"
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    later = result["round_s"][1:]
    if len(later) != rounds - 1:
        raise RuntimeError(f"{sites} sites: {len(result['round_s'])} of {rounds} rounds recorded")
    result["per_site_round_s"] = sum(later) / (sites * len(later))
    result["cpu_per_site_round_s"] = result["total_cpu_s"] / (sites * rounds)
    return result


# --- SecAgg+ with sites dropping out ------------------------------------------------------------


def dropout_round(sites: int) -> dict:
    """One SecAgg+ round of ``sites`` sites in which :data:`DROPOUTS` drop out after the key
    exchange: did exactly the others train, and is the release their weighted average?"""
    from pipeline.contracts.layout import RunLayout
    from pipeline.federation.releases import ReleaseStore
    from pipeline.federation.resume import fedrad_run_id
    from pipeline.federation.server_app import run_federation
    from pipeline.privacy.secagg import SecAggSettings
    from pipeline.support.flower_grid import LoopbackGrid
    from pipeline.training.checkpoints import load_checkpoint

    cfg = site_config(sites, secure=True, rounds=1)
    cfg.federation.fraction_evaluate = 0.0
    dropped = sorted(random.Random("scale-dropouts").sample(range(sites), DROPOUTS))
    grid = LoopbackGrid(partitions=sites, dropouts={1: dropped})
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        run_federation(grid, cfg, out)
        wall = time.perf_counter() - start
        run_id = fedrad_run_id(out, cfg)
        released = {}
        for index, name in enumerate(cfg.data.sites):
            store = ReleaseStore(SitePaths.under(SITES_ROOT, name, INPUT_SUBDIR).work)
            release = store.find(run_id, 1)
            if release is not None:
                released[index] = (release.num_examples, store.update(release))
        record = json.loads(RunLayout(out).rounds.read_text().splitlines()[0])
        survivors = sorted(set(range(sites)) - set(dropped))
        if sorted(released) != survivors or record.get("sites_trained") != len(survivors):
            return {"ok": False, "why": f"trained {sorted(released)}, record {record}", "wall_s": wall}
        aggregated, _ = load_checkpoint(RunLayout(out).checkpoint(1))
    counts = [n for n, _ in released.values()]
    settings = SecAggSettings.from_config(cfg.federation, sites)
    bound = settings.error_bound(counts) + settings.clipping_range * 2.0**-24
    worst = 0.0
    for key, value in aggregated.items():
        expected = sum(n * u[key].double() for n, u in released.values()) / sum(counts)
        worst = max(worst, float((value.double() - expected).abs().max()))
    return {"ok": worst <= bound, "max_error": worst, "bound": bound, "dropped": dropped, "wall_s": wall}


# --- the benchmark ------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.child is not None:
        child(args.child, args.secure, args.rounds, args.out)
        return
    logging.basicConfig(level=logging.WARNING)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    modes = [m.strip() for m in args.modes.split(",")]
    build_sites(max(sizes), args.images, site_config(max(sizes), False, args.rounds))
    results: dict[str, dict[int, dict]] = {}
    for mode in modes:
        results[mode] = {}
        for sites in sizes:
            results[mode][sites] = measure(sites, mode == "secagg", args.rounds)
            r = results[mode][sites]
            print(
                f"{mode:<7} {sites:>3} sites  {r['per_site_round_s']:.3f} s per site-round  "
                f"(CPU {r['cpu_per_site_round_s']:.3f} s, coordinator {r['coordinator_cpu_s']:.1f} s)  "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB  rounds {[round(s, 2) for s in r['round_s']]}  "
                f"load {r['load_average']}",
                flush=True,
            )
    dropout = None if args.no_dropout or "secagg" not in modes else dropout_round(max(sizes))
    if dropout is not None:
        print(f"SecAgg+ {max(sizes)} sites, {DROPOUTS} dropping out: {dropout}", flush=True)
    small, large = sizes[0], sizes[-1]

    def ratio(mode: str, key: str) -> float | None:
        runs = results.get(mode)
        return round(runs[large][key] / runs[small][key], 3) if runs else None

    result = {
        "per_site_round_ratio_50_vs_3": ratio("plain", "per_site_round_s"),
        "rss_ratio_50_vs_3": ratio("plain", "peak_rss_mib"),
        "secagg_per_site_round_ratio_50_vs_3": ratio("secagg", "per_site_round_s"),
        "secagg_50_dropout_ok": None if dropout is None else bool(dropout["ok"]),
        "sizes": sizes,
        "rounds": args.rounds,
        "images_per_site": args.images,
        "per_site_round_s": {
            m: {n: round(r["per_site_round_s"], 4) for n, r in v.items()} for m, v in results.items()
        },
        "cpu_per_site_round_s": {
            m: {n: round(r["cpu_per_site_round_s"], 4) for n, r in v.items()} for m, v in results.items()
        },
        "cpu_per_site_round_ratio_50_vs_3": ratio("plain", "cpu_per_site_round_s"),
        "secagg_cpu_per_site_round_ratio_50_vs_3": ratio("secagg", "cpu_per_site_round_s"),
        "peak_rss_mib": {
            m: {n: round(r["peak_rss_mib"], 1) for n, r in v.items()} for m, v in results.items()
        },
        "load_average": {m: {n: r["load_average"] for n, r in v.items()} for m, v in results.items()},
        "secagg_rss_ratio_50_vs_3": ratio("secagg", "peak_rss_mib"),
        "dropout": dropout,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
