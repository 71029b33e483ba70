"""Time a training step of the Lightning path against a bare PyTorch loop.

For developers checking or re-measuring a figure of docs/benchmarks.md (each recorded there
with its date, commit and command); no options are required.

    python scripts/bench/train_loop.py                      # ResNet-18, 64 px, batch 32
    python scripts/bench/train_loop.py --image-size 128 --model resnet18_groupnorm

Both loops train the same architecture from the same initialisation, with the same
optimizer, on the same real chest X-rays (a PNG folder with manifest.csv, such as
data/demo/kermany) at the same batch size. The Lightning path is
``build_classifier`` + ``build_trainer(lean=True)`` from :mod:`pipeline.training.loop`; the bare
loop is forward, cross-entropy, zero_grad, backward, step. They run interleaved in one
process: inside one Lightning fit, every ``--steps`` Lightning steps a callback runs
``--steps`` bare steps, so both see the same machine state. Per-step times are medians
over ``--repeats`` blocks (after one warm-up block each). The last line printed is
``RESULT {json}`` with ``ratio``, the median over blocks of Lightning / bare time (each
Lightning block paired with the bare block that follows it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pipeline.cli import answer_argparse_help, benchmark_parser

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIRS = (REPO.parent / "shared" / "data" / "kermany", REPO / "data" / "demo" / "kermany")


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--images",
        type=Path,
        default=next((d for d in IMAGE_DIRS if d.is_dir()), None),
        help="PNG folder with manifest.csv (default: the shared Kermany copy, else data/demo/kermany)",
    )
    parser.add_argument("--model", default="resnet18", help="conf/model entry (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per loop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.images is None or not (args.images / "manifest.csv").is_file():
        parser.error("no image folder with manifest.csv: pass --images data/demo/kermany")
    return args


if __name__ == "__main__":
    answer_argparse_help(parse_args)  # before torch and the pipeline are imported

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from PIL import Image  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from pipeline.contracts.labels import label_index  # noqa: E402
from pipeline.training.loop import build_classifier, build_trainer  # noqa: E402
from transforms.image import resize_square  # noqa: E402

# label_3class values of the full Kermany copy (the demo sample has a "label" column instead)
KERMANY_LABELS = {"NORMAL": "normal", "PNEUMONIA_bacteria": "bacterial", "PNEUMONIA_virus": "viral"}


def load_images(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every PNG listed in ``folder/manifest.csv``, resized to (N, 1, size, size) in [0, 1]."""
    table = pd.read_csv(folder / "manifest.csv")
    names = table["label"] if "label" in table else table["label_3class"].map(KERMANY_LABELS)
    images = []
    for file in table["file"]:
        with Image.open(folder / file) as png:
            pixels = np.asarray(png.convert("L"), np.float32) / 255.0
        images.append(resize_square(pixels, size))
    labels = [label_index(name) for name in names]
    return torch.from_numpy(np.stack(images)[:, None]), torch.tensor(labels)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InterleavedBench(pl.Callback):
    """Times each block of ``steps`` Lightning steps, then runs and times ``steps`` bare steps
    of an identically initialised copy of the network."""

    def __init__(self, bare_net: torch.nn.Module, optimizer_factory, loader: DataLoader, steps: int):
        self.bare_net = bare_net
        self.optimizer_factory = optimizer_factory
        self.loader = loader
        self.steps = steps
        self.lightning_s: list[float] = []
        self.bare_s: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.device = pl_module.device
        self.bare_net.to(self.device).train()
        self.optimizer = self.optimizer_factory(self.bare_net.parameters())
        self.batches = iter(self._forever())
        self.mark = time.perf_counter()

    def _forever(self):
        while True:
            yield from self.loader

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.steps:
            return
        synchronize(self.device)
        self.lightning_s.append(time.perf_counter() - self.mark)
        self.bare_s.append(self._bare_block())
        self.mark = time.perf_counter()

    def _bare_block(self) -> float:
        start = time.perf_counter()
        for _ in range(self.steps):
            images, labels = next(self.batches)
            images, labels = images.to(self.device), labels.to(self.device)
            loss = F.cross_entropy(self.bare_net(images), labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        synchronize(self.device)
        return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    images, labels = load_images(args.images, args.image_size)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"seed={args.seed}"])

    def loader() -> DataLoader:
        return DataLoader(
            TensorDataset(images, labels),
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(args.seed),
        )

    bare_net = build_classifier(cfg, seed=args.seed).net
    classifier = build_classifier(cfg, seed=args.seed)  # same seed: same initial weights
    bench = InterleavedBench(bare_net, hydra.utils.instantiate(cfg.model.optimizer), loader(), args.steps)
    blocks = args.repeats + 1  # the first block of each loop is warm-up
    trainer = build_trainer(cfg, max_epochs=-1, lean=True, max_steps=blocks * args.steps, callbacks=[bench])
    trainer.fit(classifier, train_dataloaders=loader())

    lightning_ms = [1000 * s / args.steps for s in bench.lightning_s[1:]]
    bare_ms = [1000 * s / args.steps for s in bench.bare_s[1:]]
    print(f"{'block':>5} {'lightning ms/step':>18} {'bare ms/step':>13} {'ratio':>6}")
    for i, (lit, bare) in enumerate(zip(lightning_ms, bare_ms), 1):
        print(f"{i:>5} {lit:>18.1f} {bare:>13.1f} {lit / bare:>6.3f}")
    lit, bare = statistics.median(lightning_ms), statistics.median(bare_ms)
    # Paired: each Lightning block against the bare block right after it (same machine load).
    ratio = statistics.median(a / b for a, b in zip(lightning_ms, bare_ms))
    print(f"{'median':>5} {lit:>18.1f} {bare:>13.1f} {ratio:>6.3f}")
    result = {
        "ratio": round(ratio, 4),
        "ratio_of_medians": round(lit / bare, 4),
        "lightning_step_ms": round(lit, 2),
        "bare_step_ms": round(bare, 2),
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps_per_block": args.steps,
        "repeats": args.repeats,
        "images": len(labels),
        "device": str(bench.device),
        "torch_threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
