"""Clinical utility on held-out patients: centralised vs FedAvg + SecAgg+ vs FedAvg + SecAgg+ + DP-SGD.

For developers checking or re-measuring a figure of docs/benchmarks.md (each recorded there
with its date, commit and command); no options are required.

    python scripts/bench/utility.py                       # 3 seeds per arm, defaults below (~11 min, 2 cores)
    python scripts/bench/utility.py --quick               # smoke run: 1 seed, 2 rounds, 32 px (~2 min)
    python scripts/bench/utility.py --seeds 5 --rounds 12 --work outputs/bench/utility

Data: the 602 pediatric chest X-rays of ``shared/data/kermany`` (manifest.csv), split by
patient (``personNNN`` ids group bacterial and viral files) into four disjoint parts:

* ``test``: about ``--test-fraction`` of the patients, stratified by each patient's majority
  class; the only images any arm is scored on, never seen in training or model selection;
* ``public``: about ``--public-fraction`` of the patients, held by the coordinator and used
  only to pretrain the starting weights (:func:`pipeline.training.pretraining.pretrain`);
* three non-IID sites from the rest: site k holds ``--skew`` of class k's patients and
  (1 - skew) / 2 of each other class's, so each site is heavy in one class (normal,
  bacterial, viral). Each site is a folder ``<site>/images`` + ``labels.csv``
  (file,label,patient_id), preprocessed by fedrad's own ``preprocess_site`` with
  ``preprocess.split.test_fraction=0``: fedrad's patient split gives train and val.

For every seed, the public part is first pretrained on (``--pretrain-epochs``, with that seed)
and the public model is scored on the held-out part (row ``pretrained``); the three arms of that
seed start from it, with the same model and ``--rounds`` x ``--local-epochs`` epochs of local
training each (``--no-pretrain``: all from scratch):

* ``central``: the sites' train splits pooled, trained centrally for rounds x local_epochs
  epochs (the last epoch is released);
* ``fed_secagg``: FedAvg over the three sites under SecAgg+, the real ServerApp / ClientApp
  code on an in-process grid (:class:`pipeline.support.flower_grid.LoopbackGrid`); the
  released ``model.pt`` is the best round by the sites' pooled validation metric
  (``--selection``, default ``val_min_sensitivity``: the lowest per-class sensitivity);
* ``fed_dp``: the same with DP-SGD at every site (``privacy=dp_sgd``), the site's noise
  calibrated so that the whole run spends at most ``--epsilon`` at delta = 1 / (10 N); the DP
  recipe (frozen backbone: only the head trains; batch size, clipping) is the benchmark's own
  preset, ``conf/experiment/utility_dp.yaml``, overridable with ``--dp-override key=value``;
  ``--augmentation-multiplicity K`` gives it K augmented views of every sampled image (about K
  times the compute per step, the same epsilon), ``--weight-standardisation`` weight-standardised
  convolutions (in every arm and the pretraining: the DP arm starts from the public model, which
  must be the same network).

Each arm is run for every seed (``--seeds``; fresh copies of the site caches for every
federated run, so no privacy budget carries over) and its released model is scored on the
held-out part with :func:`pipeline.evaluation.scoring.evaluate_checkpoint`: pneumonia-vs-normal
ROC-AUC, 3-class macro one-vs-rest ROC-AUC and per-class sensitivity. The table gives each
arm's mean, min and max over seeds; the last line is ``RESULT {json}`` with ``central_auc``,
``fed_secagg_auc``, ``fed_dp_auc`` (means of the pneumonia-vs-normal AUC),
``fed_secagg_macro_auc``, ``min_class_sensitivity_fed`` and ``min_class_sensitivity_dp``
(the lowest per-class sensitivity, averaged over seeds) and ``epsilon`` (the largest
cumulative epsilon any site reached in the DP arm), plus the public model's figures, per-seed
values, spreads, wall times and ``target_margins`` (how far each target is met, or missed
when negative).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

from pipeline.cli import answer_argparse_help, benchmark_parser

ARMS = ("central", "fed_secagg", "fed_dp")


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per arm (0, 1, ...)")
    parser.add_argument(
        "--rounds", type=int, default=8, help="federated rounds (central: rounds x local epochs)"
    )
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--model", default="resnet18_groupnorm", help="conf/model/ name (group norm: SecAgg+, DP)"
    )
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP arm: target epsilon per site")
    parser.add_argument("--pretrain-epochs", type=int, default=60)
    parser.add_argument("--no-pretrain", action="store_true", help="every arm from scratch")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--public-fraction", type=float, default=0.15)
    parser.add_argument(
        "--skew", type=float, default=0.6, help="share of a class's patients at its home site"
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the patient partition")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument(
        "--selection",
        default="val_min_sensitivity",
        help="federation.selection.metric of both federated arms (the round released as model.pt)",
    )
    parser.add_argument("--dp-preset", default="utility_dp", help="conf/experiment/ preset of the DP arm")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override for every arm (repeatable)",
    )
    parser.add_argument(
        "--dp-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override for the DP arm only (repeatable)",
    )
    parser.add_argument(
        "--augmentation-multiplicity",
        type=int,
        default=1,
        metavar="K",
        help="DP arm: privacy.augmentation_multiplicity (K augmented views of each sampled image)",
    )
    parser.add_argument(
        "--weight-standardisation",
        action="store_true",
        help="model.net.weight_standardisation=true in every arm and the pretraining (resnet18 models)",
    )
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 rounds x 1 epoch, 32 px")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.local_epochs, args.image_size, args.pretrain_epochs = 1, 2, 1, 32, 2
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    return args


if __name__ == "__main__":
    answer_argparse_help(parse_args)  # before torch and the pipeline are imported

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.contracts.cache import SiteCache  # noqa: E402
from pipeline.contracts.labels import CLASS_NAMES, label_index  # noqa: E402
from pipeline.contracts.layout import RunLayout, SitePaths  # noqa: E402
from pipeline.evaluation.scoring import evaluate_checkpoint  # noqa: E402
from pipeline.federation.server_app import run_federation  # noqa: E402
from pipeline.governance.revocation import preprocess_consented  # noqa: E402
from pipeline.ingestion.splits import patient_labels  # noqa: E402
from pipeline.privacy.dp import DPSettings, plan_round  # noqa: E402
from pipeline.support.flower_grid import LoopbackGrid  # noqa: E402
from pipeline.training.checkpoints import save_checkpoint  # noqa: E402
from pipeline.training.datamodule import CacheDataModule  # noqa: E402
from pipeline.training.loop import build_classifier, build_trainer, train  # noqa: E402
from pipeline.training.pretraining import pretrain  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KERMANY = REPO.parent / "shared" / "data" / "kermany"
# label_3class values of the Kermany manifest -> fedrad's label names
KERMANY_LABELS = {"NORMAL": "normal", "PNEUMONIA_bacteria": "bacterial", "PNEUMONIA_virus": "viral"}
SITES = ["site1", "site2", "site3"]  # site k is heavy in class k - 1 (normal, bacterial, viral)
INPUT_SUBDIR = "images"
MARKER = ".fedrad_utility_bench"


# ---------------------------------------------------------------------------------------------
# Data: patient-disjoint test / public / three non-IID sites, laid out and preprocessed as sites


def partition(
    manifest: pd.DataFrame, test_fraction: float, public_fraction: float, skew: float, seed: int
) -> dict[str, pd.DataFrame]:
    """The manifest's rows by part: ``test``, ``public`` and ``site1..3``, disjoint by patient.

    Patients are grouped by ``patient_id`` and stratified by their majority class; within each
    class they are shuffled with ``seed`` and cut into test, public, then the class's home
    site (``skew`` of the rest) and the two other sites (half the remainder each)."""
    rows = manifest.assign(label=manifest["label_3class"].map(KERMANY_LABELS))
    if rows["label"].isna().any():
        raise ValueError(
            f"unexpected label_3class values: {sorted(set(manifest['label_3class']) - set(KERMANY_LABELS))}"
        )
    majority = patient_labels(zip(rows["patient_id"], rows["label"].map(label_index)))
    by_class: dict[int, list[str]] = defaultdict(list)
    for patient, label in sorted(majority.items()):
        by_class[label].append(patient)
    rng = random.Random(seed)
    part_of: dict[str, str] = {}
    for label in sorted(by_class):
        patients = by_class[label]
        rng.shuffle(patients)
        n_test, n_public = round(len(patients) * test_fraction), round(len(patients) * public_fraction)
        rest = patients[n_test + n_public :]
        n_home = round(len(rest) * skew)
        n_other = (len(rest) - n_home) // 2
        home, others = SITES[label], [s for s in SITES if s != SITES[label]]
        cuts = [
            ("test", patients[:n_test]),
            ("public", patients[n_test : n_test + n_public]),
            (home, rest[:n_home]),
            (others[0], rest[n_home : n_home + n_other]),
            (others[1], rest[n_home + n_other :]),
        ]
        part_of.update({p: part for part, group in cuts for p in group})
    parts = rows.assign(part=rows["patient_id"].map(part_of))
    return {part: group.drop(columns="part") for part, group in parts.groupby("part")}


def lay_out(rows: pd.DataFrame, folder: Path, source: Path) -> SitePaths:
    """Copy the part's images to ``folder/images`` and write ``folder/labels.csv``."""
    site = SitePaths.under(folder.parent, folder.name, INPUT_SUBDIR)
    for file in rows["file"]:
        target = site.input_dir / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / file, target)
    rows[["file", "label", "patient_id"]].to_csv(site.labels_csv, index=False)
    return site


def composition(parts: dict[str, pd.DataFrame]) -> str:
    """Images (patients) per class of every part, one line each."""
    lines = []
    for name in ["test", "public", *SITES]:
        rows = parts[name]
        counts = Counter(rows["label"])
        share = max(counts.values()) / len(rows)
        lines.append(
            f"  {name:<7}{len(rows):>4} images {rows['patient_id'].nunique():>4} patients  "
            + " ".join(f"{c}={counts.get(c, 0):<4}" for c in CLASS_NAMES)
            + f" largest class {share:.0%}"
        )
    return "\n".join(lines)


def build_data(args: argparse.Namespace, work: Path, cfg: DictConfig) -> dict[str, SitePaths]:
    """Partition the Kermany set, lay out every part and preprocess the sites and the test part
    (the public part is preprocessed by the pretraining step)."""
    parts = partition(
        pd.read_csv(KERMANY / "manifest.csv"),
        args.test_fraction,
        args.public_fraction,
        args.skew,
        args.split_seed,
    )
    print(f"patient-disjoint parts (split seed {args.split_seed}):\n{composition(parts)}", flush=True)
    paths = {name: lay_out(parts[name], work / "sites" / name, KERMANY) for name in [*SITES, "test"]}
    paths["public"] = lay_out(parts["public"], work / "public", KERMANY)
    for name in SITES:
        preprocess_consented(paths[name], cfg.preprocess)
    whole_test = cfg.preprocess.copy()
    whole_test.split.val_fraction, whole_test.split.test_fraction = 0.0, 1.0
    preprocess_consented(paths["test"], whole_test)
    return paths


# ---------------------------------------------------------------------------------------------
# Configuration, arms and scoring


def compose_config(overrides: list[str]) -> DictConfig:
    """The project configuration with Hydra overrides, outside any Hydra app."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def common_overrides(args: argparse.Namespace, sites_root: Path, seed: int) -> list[str]:
    """What every arm (and the pretraining) shares: data layout, model, rounds, seed."""
    return [
        f"model={args.model}",
        f"data.image_size={args.image_size}",
        f"data.sites_root={sites_root}",
        f"data.sites=[{','.join(SITES)}]",
        f"data.input_subdir={INPUT_SUBDIR}",
        "data.prepare_demo=false",
        "preprocess.split.test_fraction=0",
        f"preprocess.workers={min(2, os.cpu_count() or 1)}",
        f"federation.num_rounds={args.rounds}",
        f"federation.local_epochs={args.local_epochs}",
        f"federation.num_sites={len(SITES)}",
        f"federation.min_sites={len(SITES)}",
        # The in-process grid trains the sites one after another: each may use every core.
        f"federation.client_cpus={os.cpu_count() or 1}",
        "model.class_balance=true",
        "governance.auto_approve_simulated_sites=true",
        "trainer.enable_progress_bar=false",
        f"seed={seed}",
        *(["model.net.weight_standardisation=true"] if args.weight_standardisation else []),
        *args.override,
    ]


def arm_config(
    args: argparse.Namespace, arm: str, sites_root: Path, seed: int, weights: Path | None
) -> DictConfig:
    overrides = common_overrides(args, sites_root, seed)
    if weights is not None:
        overrides.append(f"model.weights_path={weights}")
    if arm != "central":
        overrides += ["federation.secure_aggregation=true", f"federation.selection.metric={args.selection}"]
    if arm == "fed_dp":
        overrides = [
            f"experiment={args.dp_preset}",
            *overrides,
            f"privacy.target_epsilon={args.epsilon}",
            f"privacy.augmentation_multiplicity={args.augmentation_multiplicity}",
            *args.dp_override,
        ]
    return compose_config(overrides)


def calibrate_noise(cfg: DictConfig, sites: dict[str, SitePaths]) -> float:
    """The noise multiplier with which every site spends at most ``privacy.target_epsilon`` over
    the run: each site's calibrated sigma (its own N, sample rate and delta), the largest.

    The sites would calibrate it themselves (``privacy.noise_multiplier: null``), but each does so
    in every round, and Opacus's RDP search takes seconds per call on this machine; one sigma
    computed here, sent in the experiment, gives the same guarantee (each site's budget check
    still applies) without that cost."""
    settings = DPSettings.from_config(cfg.privacy)
    sigmas = []
    for name in SITES:
        n = int((SiteCache(sites[name].cache(cfg.data.image_size)).manifest()["split"] == "train").sum())
        sigmas.append(
            plan_round(
                settings,
                n,
                int(cfg.data.batch_size),
                int(cfg.federation.local_epochs),
                int(cfg.federation.num_rounds),
            ).noise_multiplier
        )
    return max(sigmas)


def private_sites(source: dict[str, SitePaths], root: Path) -> Path:
    """Fresh copies of the sites' caches under ``root`` (own ledgers, budgets and releases)."""
    for name in SITES:
        target = SitePaths.under(root, name, INPUT_SUBDIR)
        shutil.copytree(source[name].work.caches_dir, target.work.caches_dir)
    return root


def run_central(cfg: DictConfig, sites: dict[str, SitePaths], out: Path) -> tuple[Path, dict]:
    """The sites' train splits pooled, rounds x local_epochs epochs; the last epoch is released."""
    epochs = int(cfg.federation.num_rounds) * int(cfg.federation.local_epochs)
    datamodule = CacheDataModule.from_config(
        cfg.data, [sites[n].cache(cfg.data.image_size) for n in SITES], seed=int(cfg.seed)
    )
    classifier = build_classifier(cfg, train_labels=datamodule.dataset("train").labels)
    train(classifier, datamodule, build_trainer(cfg, max_epochs=epochs, lean=True))
    model = save_checkpoint(
        RunLayout(out).model, classifier.net, cfg, extra={"mode": "centralised", "epochs": epochs}
    )
    return model, {"epochs": epochs}


def run_federated(cfg: DictConfig, out: Path) -> tuple[Path, dict]:
    """FedAvg under SecAgg+ (and DP-SGD when configured) over the sites on an in-process grid."""
    run = out / "run"
    run_federation(LoopbackGrid(partitions=len(SITES)), cfg, run)
    layout = RunLayout(run)
    rounds = [json.loads(line) for line in layout.rounds.read_text().splitlines() if line.strip()]
    epsilons = [site.get("epsilon") for r in rounds for site in (r.get("train_per_site") or {}).values()]
    epsilons = [float(e) for e in epsilons if e is not None]
    selection = json.loads(layout.selection.read_text()) if layout.selection.is_file() else {}
    failures = [f for r in rounds for f in r.get("failures") or []]
    if not layout.model.is_file():
        raise RuntimeError(f"the federation in {run} released no model: {failures or rounds[-1:]}")
    info = {
        "rounds_done": len(rounds),
        "selected_round": selection.get("round"),
        "epsilon": max(epsilons) if epsilons else None,
        "failures": len(failures),
    }
    return RunLayout(run).model, info


def score(model: Path, test: Path, out: Path) -> dict:
    """The released model's figures on the held-out part."""
    # One rule for every arm (the central and public models store no threshold).
    metrics = evaluate_checkpoint(model, [test], out / "test", split="test", stored_rule=False)
    sensitivity = {c: metrics["per_class"][c]["sensitivity"] for c in CLASS_NAMES}
    return {
        "pneumonia_auc": metrics["pneumonia_auroc"],
        "macro_auc": metrics["auroc"],
        "sensitivity": sensitivity,
        "min_sensitivity": min(sensitivity.values()),
        "n_images": metrics["n_images"],
    }


def run_arm(args, arm: str, seed: int, data: dict[str, SitePaths], weights: Path | None, work: Path) -> dict:
    out = work / "runs" / f"{arm}_seed{seed}"
    start = time.perf_counter()
    if arm == "central":
        cfg = arm_config(args, arm, work / "sites", seed, weights)
        model, info = run_central(cfg, data, out)
    else:
        cfg = arm_config(args, arm, private_sites(data, out / "sites"), seed, weights)
        if cfg.privacy.get("enabled") and cfg.privacy.get("noise_multiplier") is None:
            cfg.privacy.noise_multiplier = calibrate_noise(cfg, data)
        model, info = run_federated(cfg, out)
        info["noise_multiplier"] = cfg.privacy.get("noise_multiplier")
    result = {
        "arm": arm,
        "seed": seed,
        **score(model, data["test"].cache(cfg.data.image_size), out),
        **info,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    report(result)
    return result


def report(result: dict, note: str = "") -> None:
    """One line per trained model."""
    sens = " ".join(f"{c}={v:.2f}" for c, v in result["sensitivity"].items())
    extra = "" if result.get("epsilon") is None else f"  epsilon={result['epsilon']:.2f}"
    chosen = "" if result.get("selected_round") is None else f"  round {result['selected_round']}"
    print(
        f"{result['arm']:<11} seed {result['seed']}  pneumonia AUC {result['pneumonia_auc']:.4f}  macro AUC "
        f"{result['macro_auc']:.4f}  sensitivity {sens}{extra}{chosen}  {result['wall_s']:.0f} s"
        + (f"  ({note})" if note else ""),
        flush=True,
    )


def public_weights(args: argparse.Namespace, data: dict[str, SitePaths], work: Path, seed: int) -> dict:
    """Pretrain on the public part (the coordinator's data) with ``seed``, as ``scripts/pretrain.py``
    does, and score the weights on the held-out part: the start of every arm of this seed."""
    public = data["public"]
    cfg = compose_config(
        [
            *common_overrides(args, work / "sites", seed),
            f"pretrain.input_dir={public.input_dir}",
            f"pretrain.labels_csv={public.labels_csv}",
            f"pretrain.work_dir={work / 'public' / f'pretrain_seed{seed}'}",
            f"pretrain.epochs={args.pretrain_epochs}",
            "preprocess.split.val_fraction=0.15",
        ]
    )
    start = time.perf_counter()
    weights, _ = pretrain(cfg)
    result = {
        "arm": "pretrained",
        "seed": seed,
        **score(weights, data["test"].cache(cfg.data.image_size), weights.parent),
        "weights": weights,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    report(result, f"public part only, {args.pretrain_epochs} epochs: every arm's start")
    return result


def summary(results: list[dict], arm: str) -> dict:
    """Mean, min, max and std over seeds of an arm's figures."""
    rows = [r for r in results if r["arm"] == arm]
    if not rows:
        return {}

    def spread(values: list[float]) -> dict:
        return {
            "mean": statistics.fmean(values),
            "min": min(values),
            "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }

    out = {key: spread([r[key] for r in rows]) for key in ("pneumonia_auc", "macro_auc", "min_sensitivity")}
    out["sensitivity"] = {c: statistics.fmean(r["sensitivity"][c] for r in rows) for c in CLASS_NAMES}
    out["wall_s"] = statistics.fmean(r["wall_s"] for r in rows)
    eps = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
    out["epsilon"] = max(eps) if eps else None
    out["seeds"] = len(rows)
    return out


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "fedrad", "flwr"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    temporary = None if args.work else tempfile.TemporaryDirectory(prefix="fedrad_utility_")
    work = Path(args.work or temporary.name)
    if args.work and work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise SystemExit(f"--work {work} exists and is not empty: name a new folder (it is rebuilt)")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("scripts/bench/utility.py working folder, rebuilt by every run\n")
    try:
        base = compose_config(common_overrides(args, work / "sites", args.split_seed))
        data = build_data(args, work, base)
        print(
            f"{args.model}, {args.image_size} px, {args.rounds} rounds x {args.local_epochs} local epochs, "
            f"seeds 0..{args.seeds - 1}, DP preset {args.dp_preset} at epsilon {args.epsilon}, "
            f"DP augmentation multiplicity {args.augmentation_multiplicity}, "
            f"weight standardisation {'on' if args.weight_standardisation else 'off'}",
            flush=True,
        )
        results = []
        for seed in range(args.seeds):
            weights = None
            if not args.no_pretrain:
                results.append(public_weights(args, data, work, seed))
                weights = results[-1]["weights"]
            results += [run_arm(args, arm, seed, data, weights, work) for arm in args.arms]
    finally:
        if temporary is not None:
            temporary.cleanup()
    shown = ([] if args.no_pretrain else ["pretrained"]) + args.arms
    arms = {arm: summary(results, arm) for arm in shown}
    print(
        f"\n{'arm':<12}{'pneumonia AUC':>26}{'macro AUC':>12}{'min sens.':>11}   sensitivity n/b/v     s/run"
    )
    for arm, s in arms.items():
        auc = s["pneumonia_auc"]
        sens = "/".join(f"{s['sensitivity'][c]:.2f}" for c in CLASS_NAMES)
        print(
            f"{arm:<12}{auc['mean']:>10.4f} [{auc['min']:.4f}, {auc['max']:.4f}]"
            f"{s['macro_auc']['mean']:>12.4f}{s['min_sensitivity']['mean']:>11.2f}   "
            f"{sens:<20}{s['wall_s']:>7.0f}"
        )

    def mean(arm: str, key: str) -> float | None:
        return round(arms[arm][key]["mean"], 4) if arms.get(arm) else None

    result = {
        "central_auc": mean("central", "pneumonia_auc"),
        "fed_secagg_auc": mean("fed_secagg", "pneumonia_auc"),
        "fed_dp_auc": mean("fed_dp", "pneumonia_auc"),
        "fed_secagg_macro_auc": mean("fed_secagg", "macro_auc"),
        "min_class_sensitivity_fed": mean("fed_secagg", "min_sensitivity"),
        "min_class_sensitivity_dp": mean("fed_dp", "min_sensitivity"),
        "epsilon": round(arms["fed_dp"]["epsilon"], 3)
        if arms.get("fed_dp") and arms["fed_dp"]["epsilon"]
        else None,
        "central_macro_auc": mean("central", "macro_auc"),
        "fed_dp_macro_auc": mean("fed_dp", "macro_auc"),
        "min_class_sensitivity_central": mean("central", "min_sensitivity"),
        "auc_spread": {
            arm: [
                round(s["pneumonia_auc"]["min"], 4),
                round(s["pneumonia_auc"]["max"], 4),
                round(s["pneumonia_auc"]["std"], 4),
            ]
            for arm, s in arms.items()
        },
        "per_seed_auc": {
            arm: [round(r["pneumonia_auc"], 4) for r in results if r["arm"] == arm] for arm in args.arms
        },
        "per_seed_min_sensitivity": {
            arm: [round(r["min_sensitivity"], 4) for r in results if r["arm"] == arm] for arm in args.arms
        },
        "seeds": args.seeds,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "image_size": args.image_size,
        "model": args.model,
        "dp_preset": args.dp_preset,
        "pretrained_auc": mean("pretrained", "pneumonia_auc"),
        "pretrained_macro_auc": mean("pretrained", "macro_auc"),
        "min_class_sensitivity_pretrained": mean("pretrained", "min_sensitivity"),
        "pretrain_epochs": None if args.no_pretrain else args.pretrain_epochs,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    result["target_margins"] = target_margins(result)
    print("RESULT " + json.dumps(result))


def target_margins(result: dict) -> dict[str, float | None]:
    """How far each target of the benchmark is met (>= 0) or missed (< 0)."""

    def margin(value: float | None, bound: float | None) -> float | None:
        return None if value is None or bound is None else round(value - bound, 4)

    central = result["central_auc"]
    return {
        "central_auc>=0.95": margin(central, 0.95),
        "fed_secagg_auc>=central_auc-0.02": margin(result["fed_secagg_auc"], central and central - 0.02),
        "fed_dp_auc>=central_auc-0.05": margin(result["fed_dp_auc"], central and central - 0.05),
        "epsilon<=8": margin(8.0, result["epsilon"]),
        "min_class_sensitivity_fed>=0.5": margin(result["min_class_sensitivity_fed"], 0.5),
        "min_class_sensitivity_dp>=0.5": margin(result["min_class_sensitivity_dp"], 0.5),
    }


if __name__ == "__main__":
    main()
