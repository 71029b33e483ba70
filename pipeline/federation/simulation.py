"""Run a whole federation on one machine with Flower's simulation engine.

Each simulated site is a Flower SuperNode running the same ClientApp a hospital would run,
on its own preprocessed cache; the coordinator is the same ServerApp.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.console import quiet_third_party
from pipeline.contracts.layout import RunLayout, SitePaths

log = logging.getLogger("fedrad.federation")


class NoModelReleased(RuntimeError):
    """The federation ended without a global model (no round was aggregated)."""


def why_no_model(output_dir: Path, cfg: DictConfig) -> str:
    """One paragraph: no site trained, what the sites answered, and what to do."""
    path = RunLayout(output_dir).rounds
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    failures = [reason for r in records for reason in r.get("failures", [])]
    text = (
        f"no global model was released in {output_dir}: no round had "
        f"federation.min_sites={cfg.federation.min_sites} sites that trained"
    )
    if failures and all("not approved" in f or "rejected job" in f for f in failures):
        return (
            text + ". Every site refused the job because its data owner has not approved it. "
            "Approve it at each site with `python scripts/review_job.py +site=<site> "
            "action=approve job=<hash>` (the hash is in the refusal above), or, when one operator "
            "plays every simulated site, set governance.auto_approve_simulated_sites=true "
            "(the experiment= presets do)"
        )
    reasons = "; ".join(dict.fromkeys(failures)) or "see the log above"
    return f"{text}. The sites answered: {reasons}"


def backend_config(cfg: DictConfig, num_sites: int) -> dict:
    """Resources per simulated site; GPUs are shared between sites when present. The sites'
    own console lines reach this console only with ``verbose=true`` (their failures always
    do, in the coordinator's log). With ``federation.ray_address`` the sites run on that Ray
    cluster instead of a private Ray instance."""
    gpus = cfg.federation.client_gpus
    if gpus is None:
        gpus = 1.0 / num_sites if torch.cuda.is_available() else 0.0
    init_args: dict[str, bool | str] = {
        "log_to_driver": bool(cfg.get("verbose", False)),
        "include_dashboard": False,
    }
    address = cfg.federation.get("ray_address")
    if address:
        init_args["address"] = str(address)
    return {
        "client_resources": {"num_cpus": int(cfg.federation.client_cpus), "num_gpus": float(gpus)},
        "init_args": init_args,
    }


def simulate(cfg: DictConfig, sites: list[SitePaths], output_dir: Path) -> None:
    """Federate ``sites`` (already preprocessed) for ``federation.num_rounds`` rounds."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Flower prints to its own console handler; don't print every line twice.
    logging.getLogger("flwr").propagate = False
    from flwr.simulation import run_simulation

    quiet_third_party(bool(cfg.get("verbose", False)))

    from pipeline.federation.client_app import app as client_app
    from pipeline.federation.server_app import make_server_app

    caches = [SiteCache(s.cache(cfg.data.image_size)) for s in sites]
    missing = [str(c.root) for c in caches if not c.manifest_path.is_file()]
    if missing:
        raise FileNotFoundError(f"sites not preprocessed (no manifest.csv): {missing}")
    log.info("simulating %d sites: %s", len(sites), ", ".join(s.name for s in sites))
    if cfg.federation.get("ray_address"):
        log.info("on the Ray cluster at %s", cfg.federation.ray_address)
    run_simulation(
        server_app=make_server_app(cfg, output_dir),
        client_app=client_app,
        num_supernodes=len(sites),
        backend_config=backend_config(cfg, len(sites)),
    )


def run(cfg: DictConfig, output_dir: Path) -> float:
    """Preprocess, federate and evaluate (``scripts/simulate.py`` after building the demo sites
    when ``data.prepare_demo``); returns the final pneumonia-vs-normal ROC-AUC."""
    from pipeline.evaluation.scoring import evaluate_checkpoint
    from pipeline.governance.revocation import preprocess_consented

    sites = SitePaths.of_data(cfg.data)
    for site in sites:
        preprocess_consented(site, cfg.preprocess)
    simulate(cfg, sites, output_dir)
    if not RunLayout(output_dir).model.is_file():
        raise NoModelReleased(why_no_model(output_dir, cfg))
    metrics = evaluate_checkpoint(
        RunLayout(output_dir).model, [s.cache(cfg.data.image_size) for s in sites], output_dir, split="test"
    )
    log.info("%s", final_summary(metrics, RunLayout(output_dir)))
    return float(metrics["pneumonia_auroc"] or 0.0)


def final_summary(metrics: dict, run: RunLayout) -> str:
    """A short table of the released model's scores on the sites' held-out test patients."""
    selection = json.loads(run.selection.read_text()) if run.selection.is_file() else None
    chosen = f"round {selection['round']}, best {selection['metric']}" if selection else "last round"
    rows = [
        ("images / patients", f"{metrics['n_images']} / {metrics['n_patients']}"),
        ("accuracy, 3 classes", _fixed(metrics["accuracy"])),
        ("ROC-AUC, 3 classes (macro)", _fixed(metrics["auroc"])),
        ("ROC-AUC, pneumonia vs normal", _fixed(metrics["pneumonia_auroc"])),
    ]
    rows += [(f"sensitivity, {name}", _fixed(m["sensitivity"])) for name, m in metrics["per_class"].items()]
    width = max(len(label) for label, _ in rows)
    lines = [f"released model ({chosen}) on the sites' test patients:"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    lines.append(f"  (classes: {metrics['decision_rule']})")
    lines.append(f"outputs in {run.root}: {', '.join(p.name for p in (run.model, run.metrics, run.rounds))}")
    return "\n".join(lines)


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
