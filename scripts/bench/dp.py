"""Time a DP-SGD training step against the same model's non-private step.

For developers checking or re-measuring a figure of docs/benchmarks.md (each recorded there
with its date, commit and command); no options are required.

    python scripts/bench/dp.py                               # GroupNorm ResNet-18, 224 px, batch 32
    python scripts/bench/dp.py --image-size 64 --opacus-modes ""

Both steps train the group-norm ResNet-18 (``conf/model/resnet18_groupnorm.yaml``) from the
same initialisation with Adam on the same real chest X-rays (``data/demo/kermany`` PNGs),
batch 32. The private step is the one sites run (:mod:`pipeline.privacy.dp`): per-sample
clipping in one backward pass (:mod:`pipeline.privacy.clipping`), then Opacus's
``DPOptimizerFastGradientClipping`` adds the Gaussian noise. ``--opacus-modes`` adds Opacus's
own per-sample-gradient modes (``make_private(grad_sample_mode=...)``) for comparison. All
steps run interleaved in one process (one of each per repeat, after a warm-up), on a fixed
batch of 32 (Poisson sampling changes the batch size, not the cost per example). Medians are
reported; the last line is ``RESULT {json}`` with ``ratio`` = private / non-private median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from pipeline.cli import answer_argparse_help, benchmark_parser


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's own thread count")
    parser.add_argument(
        "--opacus-modes",
        default="hooks,ghost",
        help="comma-separated Opacus grad_sample_mode values to time as well",
    )
    args = parser.parse_args()
    if args.threads is None:
        args.threads = torch.get_num_threads()  # imported below, before main() parses
    return args


if __name__ == "__main__":
    answer_argparse_help(parse_args)  # before torch and the pipeline are imported

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from train_loop import REPO, load_images  # noqa: E402

from pipeline.privacy.dp import PrivateTraining, RoundPlan  # noqa: E402
from pipeline.privacy.randomness import SecureRandom  # noqa: E402

Step = Callable[[], None]
DEMO_IMAGES = REPO / "data" / "demo" / "kermany"


def build_net(model_cfg) -> nn.Module:
    torch.manual_seed(0)
    return instantiate(model_cfg.net)


def plain_step(net: nn.Module, optimizer_factory, images, labels) -> Step:
    optimizer = optimizer_factory(net.parameters())

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()

    return step


def private_step(net: nn.Module, optimizer_factory, images, labels) -> Step:
    plan = RoundPlan(
        noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5, expected_batch_size=len(labels)
    )
    private = PrivateTraining(plan, max_grad_norm=1.0, accountant="rdp", source=SecureRandom())
    optimizer = private.optimizer(net, optimizer_factory(net.parameters()))

    def step() -> None:
        optimizer.zero_grad()
        private.backward(F.cross_entropy(net(images), labels))
        optimizer.step()

    return step


def opacus_step(mode: str, net: nn.Module, optimizer_factory, images, labels) -> Step:
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(labels))
    wrapped = PrivacyEngine().make_private(
        module=net,
        optimizer=optimizer_factory(net.parameters()),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),
        poisson_sampling=False,
    )
    module, optimizer = wrapped[0], wrapped[1]
    criterion = wrapped[2] if mode == "ghost" else nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad()
        criterion(module(images), labels).backward()
        optimizer.step()

    return step


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=resnet18_groupnorm"])
    folder = DEMO_IMAGES
    images, labels = load_images(folder, args.image_size)
    images, labels = images[: args.batch_size], labels[: args.batch_size]
    optimizer_factory = instantiate(cfg.model.optimizer)
    steps = {
        "non-private": plain_step(build_net(cfg.model), optimizer_factory, images, labels),
        "DP-SGD (fedrad)": private_step(build_net(cfg.model), optimizer_factory, images, labels),
    }
    for mode in filter(None, args.opacus_modes.split(",")):
        steps[f"Opacus {mode}"] = opacus_step(mode, build_net(cfg.model), optimizer_factory, images, labels)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if repeat:
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["non-private"])
    print(
        f"GroupNorm ResNet-18, {args.image_size} px, batch {args.batch_size}, "
        f"{args.threads} threads, {args.repeats} interleaved repeats, images from {folder}"
    )
    print(f"{'step':<20}{'median s':>10}{'ratio':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<20}{median:>10.3f}{median / base:>8.2f}")
    result = {
        "ratio": round(statistics.median(times["DP-SGD (fedrad)"]) / base, 3),
        "private_s": round(statistics.median(times["DP-SGD (fedrad)"]), 4),
        "non_private_s": round(base, 4),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "per_sample_gradients": "one-pass per-sample clipping (pipeline.privacy.clipping)",
        **{
            f"ratio_{n.split()[1]}": round(statistics.median(v) / base, 3)
            for n, v in times.items()
            if n.startswith("Opacus")
        },
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
