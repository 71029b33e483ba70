"""A round's wall time in deployment (SuperLink + SuperNodes) against simulation, and where
the difference goes.

For developers checking or re-measuring a figure of docs/benchmarks.md (each recorded there
with its date, commit and command); no options are required.

    python scripts/bench/deployment.py                       # demo experiment, 3 sites, 64 px
    python scripts/bench/deployment.py --rounds 4 --model small_cnn

The same experiment (``experiment=demo`` with one local epoch per round) federates the same
three demo sites three ways, one after the other in one run:

* simulation: Flower's simulation engine, every site a Ray actor in one long-lived process;
* deployment with TLS and SuperNode authentication (the default), coordinator and sites as
  separate processes on loopback (:class:`pipeline.support.local_deployment.LoopbackDeployment`);
* the same deployment in plain text (``deployment.insecure=true``).

A round's wall time is ``wall_s`` of ``rounds.jsonl``; round 1 is excluded (start-up).
A deployed site runs its messages in its own long-lived process
(:mod:`pipeline.deployment.warm_runtime`) and logs where each message's time went: queued
(until the site takes it), arriving (its SuperNode still downloading it from the coordinator,
then the hand-over), handling it (the ClientApp's compute) and handing the reply back. The
fixed cost per message on the site's side is queued + handing back; its median over the
training and evaluation messages of rounds 2 onwards is ``message_overhead_s``, and the median
arriving time is ``message_arriving_s``. What remains of the gap to simulation is the transfer
of the model between processes, Flower's polling (a SuperNode asks the SuperLink for messages
every 3 s when idle) and sites sharing the cores. For
comparison, ``clientapp_startup_s`` is what a fresh ClientApp process per message (Flower's
default executor) pays before it can start: Python start-up and the training stack's imports.
TLS is the difference between the two deployments; serialisation is the measured protobuf round
trip of one model message.

The last line is ``RESULT {json}`` with ``deployment_vs_simulation`` (deployment with TLS /
simulation round time), ``message_overhead_s`` and the components.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.cli import answer_argparse_help, benchmark_parser


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="resnet18")
    return parser.parse_args()


if __name__ == "__main__":
    answer_argparse_help(parse_args)  # before torch and the pipeline are imported

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.message_pb2 import Message as ProtoMessage  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.contracts.experiment import experiment_yaml  # noqa: E402
from pipeline.contracts.layout import SitePaths  # noqa: E402
from pipeline.contracts.messages import ARRAYS, CONFIG, CONFIG_KEY  # noqa: E402
from pipeline.deployment.warm_runtime import TASK_ANSWERED  # noqa: E402
from pipeline.federation.resume import round_wall_times  # noqa: E402
from pipeline.federation.simulation import simulate  # noqa: E402
from pipeline.governance.revocation import preprocess_consented  # noqa: E402
from pipeline.support.demo_sites import prepare_demo_sites  # noqa: E402
from pipeline.support.flower_grid import LoopbackGrid  # noqa: E402
from pipeline.support.local_deployment import LoopbackDeployment  # noqa: E402
from pipeline.training.loop import build_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SITES = ["site1", "site2", "site3"]


def overrides(args: argparse.Namespace, sites_root: Path, output_dir: Path) -> list[str]:
    return [
        "experiment=demo",
        f"model={args.model}",
        f"data.image_size={args.image_size}",
        f"data.sites_root={sites_root}",
        "data.prepare_demo=false",
        "federation.local_epochs=1",
        f"federation.num_rounds={args.rounds}",
        "federation.min_sites=3",
        f"output_dir={output_dir}",
    ]


def compose_config(items: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=items)


def simulation_times(
    args: argparse.Namespace, sites_root: Path, sites: list[SitePaths], work: Path
) -> list[float]:
    cfg = compose_config(overrides(args, sites_root, work / "simulation"))
    simulate(cfg, sites, work / "simulation")
    return round_wall_times(work / "simulation")[1:]


# What a site logs as it answers a message (pipeline.deployment.warm_runtime.run_task).
ANSWERED = re.compile(
    rf"(train|evaluate) {TASK_ANSWERED}: (?P<queued>[\d.]+) s queued, (?P<arriving>[\d.]+) s arriving, "
    r"(?P<handling>[\d.]+) s handling it, (?P<back>[\d.]+) s handing it back"
)


def deployment_times(
    args: argparse.Namespace, sites_root: Path, work: Path, insecure: bool
) -> tuple[list[float], list[float]]:
    """Round wall times (round 1 excluded), and each site's fixed cost per training or
    evaluation message (its first two messages, round 1's, excluded)."""
    name = "insecure" if insecure else "tls"
    deployment = LoopbackDeployment(
        work / name, overrides(args, sites_root, work / name / "run"), SITES, insecure=insecure
    )
    deployment.run()
    messages: list[dict[str, float]] = []
    for site in SITES:
        answered = ANSWERED.finditer(deployment.log(site))
        messages += [{k: float(v) for k, v in m.groupdict().items()} for m in answered][2:]
    return round_wall_times(work / name / "run")[1:], messages


def startup_s(modules: str, repeats: int = 3) -> float:
    """Median wall time of a fresh Python process importing ``modules``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], check=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def serialisation_s(cfg) -> float:
    """Median protobuf round trip of one training message carrying the model."""
    LoopbackGrid(partitions=1)  # sets Flower's task identity, as a runtime would
    state = build_classifier(cfg, seed=0).net.state_dict()
    message = Message(
        RecordDict({ARRAYS: ArrayRecord(state), CONFIG: ConfigRecord({CONFIG_KEY: experiment_yaml(cfg)})}),
        dst_node_id=1,
        message_type="train",
    )
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data = serde.message_to_proto(message).SerializeToString()
        serde.message_from_proto(ProtoMessage.FromString(data))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    sites_root = REPO / "outputs" / "bench" / f"deployment_sites_{args.image_size}px"
    sites = [SitePaths.under(sites_root, name) for name in SITES]
    prepare_demo_sites(sites_root, n_sites=len(sites))
    cfg = compose_config(overrides(args, sites_root, Path("unused")))
    for site in sites:
        preprocess_consented(site, cfg.preprocess)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        simulation = statistics.median(simulation_times(args, sites_root, sites, work))
        tls_rounds, messages = deployment_times(args, sites_root, work, insecure=False)
        plain_rounds, _ = deployment_times(args, sites_root, work, insecure=True)
    tls, plain = statistics.median(tls_rounds), statistics.median(plain_rounds)
    overhead = statistics.median(m["queued"] + m["back"] for m in messages)
    arriving = statistics.median(m["arriving"] for m in messages)
    torch.set_num_threads(1)
    startup = startup_s("pipeline.federation.client_app, pipeline.federation.site_task")
    serialise = serialisation_s(cfg)

    print(
        f"{args.model}, {len(SITES)} sites, {args.image_size} px, one local epoch, "
        f"{args.rounds} rounds per mode (round 1 excluded), {os.cpu_count()} cores"
    )
    print(f"{'mode':<26}{'round s':>10}")
    for name, value in (
        ("simulation", simulation),
        ("deployment (TLS + auth)", tls),
        ("deployment (plain text)", plain),
    ):
        print(f"{name:<26}{value:>10.2f}")
    print(
        f"fixed cost per training/evaluation message at a site (queued + handing the reply back): "
        f"median {overhead:.2f} s over {len(messages)} messages; arriving (the SuperNode "
        f"downloading it from the coordinator): median {arriving:.2f} s"
    )
    print(f"(a fresh ClientApp process per message would first pay {startup:.2f} s of start-up and imports)")
    print(
        f"TLS: {tls - plain:+.2f} s per round; model message serialisation round trip: "
        f"{serialise * 1e3:.1f} ms"
    )
    result = {
        "deployment_vs_simulation": round(tls / simulation, 3),
        "message_overhead_s": round(overhead, 3),
        "message_arriving_s": round(arriving, 3),
        "round_s_simulation": simulation,
        "round_s_deployment": tls,
        "round_s_deployment_insecure": plain,
        "tls_s_per_round": round(tls - plain, 3),
        "clientapp_startup_s": round(startup, 3),
        "serialisation_ms_per_message": round(serialise * 1e3, 3),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
