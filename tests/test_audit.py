"""The privacy audit attacks real demo images: membership inference, gradient inversion,
the release policy and the report."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from models.small_cnn import SmallCNN
from pipeline.contracts.cache import SiteCache
from pipeline.evaluation.audit.inversion import (
    DPUpdate,
    InversionSettings,
    chance_similarity,
    inversion_attack,
    resize,
)
from pipeline.evaluation.audit.membership import (
    membership_audit,
    membership_data,
    shadow_assignment,
    train_like_run,
)
from pipeline.evaluation.audit.release import (
    ReleasePolicy,
    ReleaseRefused,
    check_release,
    release_metrics,
    release_model,
)
from pipeline.evaluation.audit.report import AUDIT_HTML, AUDIT_JSON, write_audit_report
from pipeline.evaluation.audit.run import run_audit
from pipeline.evaluation.provenance import HYDRA_CONFIG
from pipeline.ingestion.pseudonym import file_sha256
from pipeline.privacy.dp import DPSettings, plan_round
from pipeline.training.checkpoints import save_checkpoint
from tests.conftest import REPO, compose_config, DEMO_IMAGE_SIZE

pytestmark = pytest.mark.audit

# A deliberately overfit recipe: small CNN, no augmentation, a high learning rate, many epochs.
OVERFIT = (
    "experiment=demo",
    "model=small_cnn",
    "model.net.width=32",
    "model.optimizer.lr=0.01",
    "data.augment.prob=0",
)
OVERFIT_EPOCHS = 100
INVERSION = InversionSettings(iterations=300)


@pytest.fixture(scope="module")
def site_data(demo_sites):
    """Members and non-members of the three demo sites, at 32 px to keep training fast."""
    data = membership_data([site.cache(DEMO_IMAGE_SIZE) for site in demo_sites.sites])
    return dataclasses.replace(data, images=resize(torch.from_numpy(data.images), 32).numpy())


@pytest.fixture(scope="module")
def trained(site_data):
    """The overfit model and its DP-SGD twin (same data, recipe and epochs), with their loss attacks."""
    models = {}
    for name, privacy in (("overfit", "privacy=none"), ("dp", "privacy=dp_sgd")):
        cfg = compose_config(*OVERFIT, privacy)
        net = train_like_run(cfg, site_data.subset(site_data.member), OVERFIT_EPOCHS, seed=0).net
        models[name] = (cfg, net, membership_audit(net, cfg, site_data, n_shadows=0, shadow_epochs=0))
    return models


@pytest.fixture(scope="module")
def inversion(demo_sites):
    """The inversion of one real training image's update, without protection and under the
    demo's DP-SGD (noise multiplier calibrated for the site as in experiment=demo_private)."""
    site = demo_sites.sites[0]
    cache, manifest = SiteCache(site.cache(DEMO_IMAGE_SIZE)), SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
    # The site's first DICOM file (its pseudonymous key from the site-private source index).
    index = pd.read_csv(site.private_dir / "source_index.csv", dtype=str)
    key = index.loc[index["file"] == "img_0001.dcm", "image_key"].item()
    keys = [key] + [k for k in manifest["image_key"] if k != key]
    pixels = resize(torch.from_numpy(np.stack([np.load(cache.array_path(k)) for k in keys]))[:, None], 32)
    image = pixels[:1]
    label = torch.tensor([int(manifest.loc[manifest["image_key"] == key, "label"].item())])
    cfg = compose_config("experiment=demo_private")
    plan = plan_round(
        DPSettings.from_config(cfg.privacy),
        int((manifest["split"] == "train").sum()),
        int(cfg.data.batch_size),
        int(cfg.federation.local_epochs),
        int(cfg.federation.num_rounds),
    )
    results, images = {}, {"original": image.numpy()}
    for name, dp in (("none", None), ("dp-sgd", DPUpdate(plan.noise_multiplier, cfg.privacy.max_grad_norm))):
        torch.manual_seed(0)
        results[name], reconstructed = inversion_attack(SmallCNN(width=64), image, label, dp, INVERSION)
        images[name] = reconstructed.numpy()
    return results, images, chance_similarity(image, pixels[1:])


def test_members_are_the_training_patients(demo_sites, site_data):
    manifest = pd.concat([SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest() for site in demo_sites.sites])
    assert site_data.member.sum() == (manifest["split"] == "train").sum()
    assert (~site_data.member).sum() == manifest["split"].isin(["val", "test"]).sum()
    members = {k for k, m in zip(site_data.patient_keys, site_data.member) if m}
    others = {k for k, m in zip(site_data.patient_keys, site_data.member) if not m}
    assert members == set(manifest.loc[manifest["split"] == "train", "patient_key"])
    assert not members & others


def test_membership_attack_finds_overfit_training_patients_not_dp_ones(trained):
    overfit = trained["overfit"][2]["loss"]
    dp = trained["dp"][2]["loss"]
    assert overfit["auc"] > 0.65, overfit["auc"]
    assert overfit["auc"] > dp["auc"] + 0.1, (overfit["auc"], dp["auc"])
    # With n non-members the FPR resolution is 1/n: the 0.1% figure is the TPR at zero false positives.
    assert overfit["fpr_resolution"] == pytest.approx(1 / overfit["n_non_members"])
    assert overfit["tpr_at_fpr"]["0.001"] <= overfit["tpr_at_fpr"]["0.01"]


def test_lira_finds_overfit_training_patients(trained, site_data):
    cfg, net, _ = trained["overfit"]
    lira = membership_audit(net, cfg, site_data, n_shadows=4, shadow_epochs=OVERFIT_EPOCHS)["lira"]
    assert lira["auc"] > 0.65, lira["auc"]
    assert lira["shadow_models"] == 4


def test_every_image_is_outside_exactly_half_the_shadows():
    assignment = shadow_assignment(4, 50, seed=3)
    assert (assignment.sum(0) == 2).all()
    assert 0 < assignment.sum(1).min() and assignment.sum(1).max() < 50
    with pytest.raises(ValueError, match="even number"):
        shadow_assignment(3, 50, seed=3)


def test_gradient_inversion_recovers_an_unprotected_image_and_fails_under_dp(inversion):
    results, _, chance = inversion
    guess = max(chance["uniform_noise"]["ssim"], chance["flat_mean_intensity"]["ssim"])
    assert results["none"]["labels_correct"]
    assert results["none"]["ssim"] > guess + 0.3, (results["none"], chance)
    assert results["dp-sgd"]["ssim"] < guess + 0.05, (results["dp-sgd"], chance)
    assert results["none"]["psnr"] > results["dp-sgd"]["psnr"] + 5


def test_release_policy_refuses_the_overfit_model_and_accepts_the_dp_one(trained, inversion, tmp_path):
    policy = ReleasePolicy.from_config(
        compose_config(
            "audit.release.max_membership_auc=0.65",
            "audit.release.max_tpr_at_1pct_fpr=0.2",
            "audit.release.max_reconstruction_ssim=0.3",
        ).audit.release
    )
    assert policy.max_membership_auc == 0.65
    results = inversion[0]
    entries = {}
    for name, own in (("overfit", "none"), ("dp", "dp-sgd")):
        cfg, net, membership = trained[name]
        model = save_checkpoint(tmp_path / name / "model.pt", net, cfg)
        entries[name] = {
            "name": name,
            "sha256": file_sha256(model),
            "membership": membership,
            "release_metrics": release_metrics(membership, results[own]),
        }
    audit_json = tmp_path / AUDIT_JSON
    audit_json.write_text(json.dumps({"models": list(entries.values())}))

    violations = check_release(entries["overfit"], policy)
    assert any("max_membership_auc" in v for v in violations), violations
    assert any("max_reconstruction_ssim" in v for v in violations), violations
    assert check_release(entries["dp"], policy) == []

    releases = tmp_path / "releases"
    with pytest.raises(ReleaseRefused, match="max_membership_auc"):
        release_model(tmp_path / "overfit" / "model.pt", audit_json, policy, releases)
    dp_bytes = (tmp_path / "dp" / "model.pt").read_bytes()
    released = release_model(tmp_path / "dp" / "model.pt", audit_json, policy, releases)
    assert released.read_bytes() == dp_bytes
    assert (releases / AUDIT_JSON).is_file()

    (tmp_path / "dp" / "model.pt").write_bytes(b"changed after the audit")
    with pytest.raises(ReleaseRefused, match="does not audit this model file"):
        release_model(tmp_path / "dp" / "model.pt", audit_json, policy, releases)

    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "release_model.py"),
            f"release.model={tmp_path / 'overfit' / 'model.pt'}",
            f"release.audit={audit_json}",
            f"audit.release.folder={releases}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "max_membership_auc" in done.stdout + done.stderr
    assert (releases / "model.pt").read_bytes() == dp_bytes  # the refused model was not copied


def test_audit_report_holds_its_figures_and_tables(demo_sites, trained, tmp_path):
    checkpoints = []
    for name in ("overfit", "dp"):
        cfg, net, _ = trained[name]
        checkpoints.append(save_checkpoint(tmp_path / name / "model.pt", net, cfg))
        (tmp_path / name / HYDRA_CONFIG).parent.mkdir()
        OmegaConf.save(cfg, tmp_path / name / HYDRA_CONFIG)  # what Hydra records for every run
    cfg = compose_config(
        f"data.sites_root={demo_sites.root}",
        "data.sites=[site1]",
        f"audit.checkpoint={checkpoints[0]}",
        f"audit.compare_checkpoint={checkpoints[1]}",
        "audit.membership.shadow_models=2",
        "audit.membership.shadow_epochs=3",
        "audit.inversion.iterations=20",
    )
    audit, images = run_audit(cfg)
    html = write_audit_report(audit, images, tmp_path / "audit")

    page = html.read_text()
    assert page.count('src="data:image/png;base64,') == 3
    for section in ("summary-table", "models-table", "inversion-table", "secure-aggregation"):
        assert f'id="{section}"' in page
    assert "never holds a single site" in page
    saved = json.loads((tmp_path / "audit" / AUDIT_JSON).read_text())
    assert [m["name"] for m in saved["models"]] == ["SmallCNN at 64 px", "SmallCNN at 64 px, DP-SGD"]
    assert [m["private"] for m in saved["models"]] == [False, True]
    for model in saved["models"]:
        assert set(model["membership"]) >= {"loss", "lira"}
        assert f"{model['membership']['loss']['auc']:.3f}" in page
    assert f"{saved['inversion']['results']['none']['ssim']:.3f}" in page
    assert sorted(p.name for p in (tmp_path / "audit").glob("*.png")) == sorted(saved["figures"])
    assert (tmp_path / "audit" / AUDIT_HTML) == html
