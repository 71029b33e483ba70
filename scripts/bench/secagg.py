"""Round wall time and bytes each site sends, with and without SecAgg+.

For developers checking or re-measuring a figure of docs/benchmarks.md (each recorded there
with its date, commit and command); no options are required.

    python scripts/bench/secagg.py                    # ResNet-18 (group norm), 3 demo sites, 224 px
    python scripts/bench/secagg.py --rounds 4 --image-size 64

Both modes federate the same three demo sites with the same config and one local epoch per
round; only ``federation.secure_aggregation`` differs. The sites are built and preprocessed
at the benchmark's image size under ``outputs/bench/secagg_sites_<size>px`` (not the
default demo sites, whose caches stay as they are).

* Time: Flower's simulation engine (Ray), ``--rounds`` rounds per mode, alternating modes
  ``--repeats`` times; a round's wall time is ``wall_s`` of ``rounds.jsonl`` (training,
  aggregation and evaluation), round 1 excluded (it includes start-up). Medians.
* Bytes: one round of each mode over an in-process grid
  (:class:`pipeline.support.flower_grid.LoopbackGrid`) running the same ServerApp and
  ClientApp code: the payload of every reply a site sends in the round (parameters or
  masked vector, keys, shares, metrics), summed per site.
* Deployment: the same rounds with coordinator and sites as separate processes on loopback
  (TLS and SuperNode authentication, :class:`pipeline.support.local_deployment.LoopbackDeployment`),
  once per mode; ``--no-deployment`` skips it (``time_ratio_deployment`` null).

The last line is ``RESULT {json}`` with ``time_ratio``, ``time_ratio_deployment`` and
``bytes_ratio`` (secure / plain).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from pipeline.cli import answer_argparse_help, benchmark_parser


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", default="resnet18_groupnorm")
    parser.add_argument("--no-deployment", action="store_true", help="simulation only")
    return parser.parse_args()


if __name__ == "__main__":
    answer_argparse_help(parse_args)  # before torch and the pipeline are imported

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.contracts.layout import SitePaths  # noqa: E402
from pipeline.federation.resume import round_wall_times  # noqa: E402
from pipeline.federation.server_app import run_federation  # noqa: E402
from pipeline.federation.simulation import simulate  # noqa: E402
from pipeline.governance.revocation import preprocess_consented  # noqa: E402
from pipeline.support.demo_sites import prepare_demo_sites  # noqa: E402
from pipeline.support.flower_grid import LoopbackGrid  # noqa: E402
from pipeline.support.local_deployment import LoopbackDeployment  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SITES = ["site1", "site2", "site3"]


def overrides(args: argparse.Namespace, secure: bool) -> list[str]:
    sites_root = REPO / "outputs" / "bench" / f"secagg_sites_{args.image_size}px"
    return [
        "experiment=demo",
        f"data.sites_root={sites_root}",
        f"model={args.model}",
        f"data.image_size={args.image_size}",
        "federation.local_epochs=1",
        f"federation.num_rounds={args.rounds}",
        f"federation.secure_aggregation={str(secure).lower()}",
        "data.prepare_demo=false",
    ]


def config(args: argparse.Namespace, secure: bool):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides(args, secure))


def round_times(args: argparse.Namespace, secure: bool, sites: list[SitePaths]) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        simulate(config(args, secure), sites, Path(out))
        return round_wall_times(Path(out))[1:]


def deployment_round_times(args: argparse.Namespace, secure: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        extra = [f"output_dir={run}", "federation.min_sites=3"]
        LoopbackDeployment(Path(tmp), [*overrides(args, secure), *extra], SITES).run()
        return round_wall_times(run)[1:]


def bytes_per_site(args: argparse.Namespace, secure: bool) -> float:
    cfg = config(args, secure)
    cfg.federation.num_rounds, cfg.federation.fraction_evaluate = 1, 0.0
    grid = LoopbackGrid(partitions=len(cfg.data.sites))
    with tempfile.TemporaryDirectory() as out:
        run_federation(grid, cfg, Path(out))
    sent = sum(size for kind, size, _ in grid.replies if kind == "train")
    return sent / len(grid.contexts)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = config(args, secure=False)
    sites = [SitePaths.under(cfg.data.sites_root, name) for name in cfg.data.sites]
    prepare_demo_sites(cfg.data.sites_root, n_sites=len(sites))
    for site in sites:
        preprocess_consented(site, cfg.preprocess)

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for secure in (False, True):
            times[secure] += round_times(args, secure, sites)
    deployed = (
        {}
        if args.no_deployment
        else {secure: statistics.median(deployment_round_times(args, secure)) for secure in (False, True)}
    )
    torch.set_num_threads(1)
    sizes = {secure: bytes_per_site(args, secure) for secure in (False, True)}

    plain, secure = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"{args.model}, {len(sites)} sites, {args.image_size} px, one local epoch, "
        f"{args.rounds} rounds x {args.repeats} repeats per mode (round 1 excluded)"
    )
    print(f"{'mode':<12}{'round s (sim)':>15}{'round s (deployed)':>20}{'MB sent / site':>16}")
    for name, secure_mode in (("plain", False), ("SecAgg+", True)):
        median = statistics.median(times[secure_mode])
        deployed_s = f"{deployed[secure_mode]:.2f}" if deployed else "-"
        print(f"{name:<12}{median:>15.2f}{deployed_s:>20}{sizes[secure_mode] / 1e6:>16.2f}")
    result = {
        "time_ratio": round(secure / plain, 3),
        "time_ratio_deployment": round(deployed[True] / deployed[False], 3) if deployed else None,
        "bytes_ratio": round(sizes[True] / sizes[False], 3),
        "round_s_plain": plain,
        "round_s_secure": secure,
        "bytes_per_site_plain": int(sizes[False]),
        "bytes_per_site_secure": int(sizes[True]),
        "round_s_deployment_plain": deployed.get(False),
        "round_s_deployment_secure": deployed.get(True),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
