"""Training throughput on a GPU in the study's setting, and one federated round of three sites
sharing it.

For developers checking or re-measuring a figure of docs/benchmarks.md (each recorded there
with its date, commit and command); no options are required.

    python scripts/bench/gpu.py                  # on a GPU: a few minutes
    python scripts/bench/gpu.py --steps 50 --batch-size 64

The study's network, the group-norm ResNet-18 (``conf/model/resnet18_groupnorm.yaml``), at 224 px
on real chest X-rays (``shared/data/kermany`` when present, else ``data/demo/kermany``), with
bf16 autocast where the device supports it (fp32 otherwise):

* images per second of a non-private training step and of the DP-SGD step sites run
  (:mod:`pipeline.privacy.dp`: per-sample clipping in one backward pass, then noise), each
  ``--steps`` steps of a fixed batch after ``--warmup`` steps, interleaved;
* one federated round of three demo sites sharing the device: Flower's simulation engine with
  ``federation.client_gpus`` = 1/3 (fedrad's default with a GPU), one local epoch, Lightning's
  ``bf16-mixed`` precision where supported; the second of two rounds (the first includes start-up).

The script never requires a GPU: without one it says so and runs a tiny CPU version (64 px,
batch 8, 3 steps, fp32, a 32 px round) that checks the script end to end; those are not GPU
figures. The last line is ``RESULT {json}`` with ``device``, ``device_name``, ``precision``,
``images_per_s_non_dp``, ``images_per_s_dp``, ``dp_slowdown``, ``federated_round_s`` and
``federated_images_per_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from pipeline.cli import answer_argparse_help, benchmark_parser


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--round-image-size", type=int, default=224, help="the federated round's")
    parser.add_argument("--no-round", action="store_true", help="skip the federated round")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU visible to torch: running a tiny CPU version (not GPU figures)", flush=True)
        args.image_size, args.batch_size, args.steps, args.warmup, args.round_image_size = 64, 8, 3, 1, 32
    return args


if __name__ == "__main__":
    answer_argparse_help(parse_args)  # before torch and the pipeline are imported

import torch  # noqa: E402
from dp import build_net, plain_step, private_step  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from train_loop import IMAGE_DIRS, REPO, load_images, synchronize  # noqa: E402

from pipeline.contracts.cache import SiteCache  # noqa: E402


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Images per second of the non-private and the DP-SGD step (medians of interleaved steps)."""
    cfg = config(["model=resnet18_groupnorm"])
    folder = next(d for d in IMAGE_DIRS if (d / "manifest.csv").is_file())
    images, labels = load_images(folder, args.image_size)
    repeat = -(-args.batch_size // len(labels))
    images = images.repeat(repeat, 1, 1, 1)[: args.batch_size].to(device)
    labels = labels.repeat(repeat)[: args.batch_size].to(device)
    optimizer = instantiate(cfg.model.optimizer)
    steps = {
        "non_dp": plain_step(build_net(cfg.model).to(device), optimizer, images, labels),
        "dp": private_step(build_net(cfg.model).to(device), optimizer, images, labels),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16_supported(device) else nullcontext()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(args.warmup + args.steps):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            with autocast:
                step()
            synchronize(device)
            if index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: args.batch_size / statistics.median(values) for name, values in times.items()}


def federated_round(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """The second round's wall time of three demo sites sharing ``device``, and the training
    images per second it implies (one local epoch per site)."""
    from pipeline.federation.resume import round_wall_times
    from pipeline.federation.simulation import simulate
    from pipeline.governance.revocation import preprocess_consented
    from pipeline.support.demo_sites import prepare_demo_sites

    size = args.round_image_size
    sites_root = REPO / "outputs" / "bench" / f"gpu_sites_{size}px"
    cfg = config(
        [
            "experiment=demo",
            "model=resnet18_groupnorm",
            f"data.image_size={size}",
            f"data.sites_root={sites_root}",
            "data.prepare_demo=false",
            "federation.local_epochs=1",
            "federation.num_rounds=2",
            "federation.min_sites=3",
            f"federation.client_cpus={max(1, (os.cpu_count() or 1) // 3)}",
            f"trainer.precision={'bf16-mixed' if bf16_supported(device) else '32-true'}",
            "trainer.enable_progress_bar=false",
        ]
    )
    sites = prepare_demo_sites(sites_root, n_sites=3)
    for site in sites:
        preprocess_consented(site, cfg.preprocess)
    train_images = sum((SiteCache(s.cache(size)).manifest()["split"] == "train").sum() for s in sites)
    with tempfile.TemporaryDirectory() as out:
        simulate(cfg, sites, Path(out))
        wall = round_wall_times(Path(out))[-1]
    return {"round_s": wall, "images_per_s": float(train_images) / wall}


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU)"
    precision = "bf16 autocast" if bf16_supported(device) else "fp32"
    print(
        f"{name}: GroupNorm ResNet-18, {args.image_size} px, batch {args.batch_size}, {precision}", flush=True
    )
    rates = throughput(args, device)
    print(f"images/s  non-DP {rates['non_dp']:.1f}  DP-SGD {rates['dp']:.1f}", flush=True)
    round_ = None if args.no_round else federated_round(args, device)
    if round_ is not None:
        print(
            f"federated round, 3 sites sharing the {device.type.upper()}, {args.round_image_size} px: "
            f"{round_['round_s']:.2f} s ({round_['images_per_s']:.1f} training images/s)"
        )
    result = {
        "device": device.type,
        "device_name": name,
        "precision": precision,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "images_per_s_non_dp": round(rates["non_dp"], 2),
        "images_per_s_dp": round(rates["dp"], 2),
        "dp_slowdown": round(rates["non_dp"] / rates["dp"], 3),
        "federated_round_s": None if round_ is None else round(round_["round_s"], 3),
        "federated_images_per_s": None if round_ is None else round(round_["images_per_s"], 2),
        "round_image_size": args.round_image_size,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
