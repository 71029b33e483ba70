"""Job approval: a site trains only in a job its data owner approved with the site's own key."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pipeline.federation.client_app import app as client_app
from pipeline.federation.loopback import LoopbackGrid
from pipeline.federation.run_config import CONFIG_KEY, experiment_yaml
from pipeline.federation.server_app import run_federation
from pipeline.federation.site_task import train_site
from pipeline.governance.approval import JobDecision, JobNotApproved, decide, decision_path
from pipeline.governance.job import Job
from pipeline.governance.keys import site_signing_key
from pipeline.governance.ledger import SiteLedger
from pipeline.governance.review import job_status, review, submit_job
from pipeline.sites import SitePaths
from pipeline.training import build_classifier

from tests.conftest import FAST_FEDERATION, compose_config

pytestmark = pytest.mark.governance


@pytest.fixture
def sites_root(demo_sites, tmp_path) -> Path:
    """Private copies of the demo sites' caches: no key, approval or ledger of other tests."""
    for site in demo_sites.sites:
        shutil.copytree(site.cache_dir, SitePaths.under(tmp_path, site.name).cache_dir)
    return tmp_path


def strict_config(root: Path, *overrides: str):
    """The fast demo federation with approval required and nobody approving automatically."""
    return compose_config(
        *FAST_FEDERATION, f"data.sites_root={root}", "federation.num_rounds=1",
        "governance.auto_approve_simulated_sites=false", *overrides,
    )


def initial_state(cfg) -> dict[str, torch.Tensor]:
    return build_classifier(cfg, seed=0).net.state_dict()


def trained_rounds(work_dir: Path) -> list[dict]:
    return [e for e in SiteLedger.for_site(work_dir).entries() if e["kind"] == "round"]


def test_unapproved_job_does_not_train(sites_root, caplog):
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    job_hash = Job.from_config(cfg).job_hash
    with caplog.at_level(logging.ERROR, "fedrad.governance"):
        with pytest.raises(JobNotApproved, match=f"has not approved job {job_hash}.*review_job.py"):
            train_site(cfg, site.cache_dir, initial_state(cfg), server_round=1)
    assert f"site site1 refuses to train: this site has not approved job {job_hash}" in caplog.text
    assert trained_rounds(site.work_dir) == []


def test_rejected_job_does_not_train(sites_root):
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    decide(site.work_dir, Job.from_config(cfg), "rejection", "data owner of site1")
    with pytest.raises(JobNotApproved, match="data owner rejected job"):
        train_site(cfg, site.cache_dir, initial_state(cfg), server_round=1)
    assert trained_rounds(site.work_dir) == []
    assert [e["kind"] for e in SiteLedger.for_site(site.work_dir).entries()] == ["rejection"]


@pytest.mark.parametrize("changed", [
    ["federation.num_rounds=5"],
    ["model.optimizer.lr=0.1"],
    ["privacy=dp_sgd", "privacy.epsilon_budget=50"],
])
def test_approval_of_another_job_does_not_count(sites_root, changed):
    """The data owner approved the 1-round, non-private job; the coordinator sends another."""
    site = SitePaths.under(sites_root, "site1")
    approved = Job.from_config(strict_config(sites_root))
    decide(site.work_dir, approved, "approval", "data owner of site1")
    cfg = strict_config(sites_root, *changed)
    assert Job.from_config(cfg).job_hash != approved.job_hash
    with pytest.raises(JobNotApproved, match="has not approved job"):
        train_site(cfg, site.cache_dir, initial_state(cfg), server_round=1)
    assert trained_rounds(site.work_dir) == []


def test_forged_or_altered_decision_does_not_count(sites_root):
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    job = Job.from_config(cfg)
    site_signing_key(site.work_dir)  # the site has its own key
    other_key = Ed25519PrivateKey.generate()
    forged = JobDecision(
        job_hash=job.job_hash, decision="approval", summary=job.summary(), decided_by="someone",
        decided_at="2026-01-01T00:00:00+00:00",
        signature=other_key.sign(JobDecision.signed_bytes(job.job_hash, "approval")).hex(),
    )
    path = decision_path(site.work_dir, job.job_hash)
    path.parent.mkdir(parents=True)
    path.write_text(forged.to_json())
    with pytest.raises(JobNotApproved, match="not a decision signed by this site's key"):
        train_site(cfg, site.cache_dir, initial_state(cfg), server_round=1)
    # The site's own rejection, edited into an approval, is no approval either.
    decide(site.work_dir, job, "rejection", "data owner of site1")
    record = json.loads(path.read_text()) | {"decision": "approval"}
    path.write_text(json.dumps(record))
    with pytest.raises(JobNotApproved, match="not a decision signed by this site's key"):
        train_site(cfg, site.cache_dir, initial_state(cfg), server_round=1)
    assert trained_rounds(site.work_dir) == []


def test_approved_job_trains(sites_root):
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    decide(site.work_dir, Job.from_config(cfg), "approval", "data owner of site1")
    initial = initial_state(cfg)
    state, metrics = train_site(cfg, site.cache_dir, initial, server_round=1)
    assert metrics["num-examples"] > 0
    assert any(not torch.equal(state[k], initial[k]) for k in initial)
    assert [e["kind"] for e in SiteLedger.for_site(site.work_dir).entries()] == ["approval", "round"]


def test_coordinator_cannot_switch_a_deployed_sites_gate_off(sites_root, monkeypatch):
    """A deployed site (cache-dir in its node config) ignores the governance the coordinator sends."""
    for attribute in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    site = SitePaths.under(sites_root, "site1")
    sent = strict_config(
        sites_root, "governance.require_approval=false", "governance.auto_approve_simulated_sites=true"
    )
    message = Message(
        RecordDict({
            "arrays": ArrayRecord(initial_state(sent)),
            "config": ConfigRecord({CONFIG_KEY: experiment_yaml(sent), "server-round": 1}),
        }),
        dst_node_id=1, message_type="train",
    )
    context = Context(
        run_id=1, node_id=1, node_config={"cache-dir": str(site.cache_dir)},
        state=RecordDict(), run_config={},
    )
    with pytest.raises(JobNotApproved, match="has not approved job"):
        client_app(message, context)
    assert not decision_path(site.work_dir, Job.from_config(sent).job_hash).exists()
    assert trained_rounds(site.work_dir) == []


def test_federation_stops_when_sites_have_not_approved(sites_root, tmp_path, caplog):
    """Only site1 approved: the other two refuse, fewer than min_sites train, the run stops.

    The real ServerApp logic and ClientApp, in process (:class:`LoopbackGrid`, no Ray)."""
    cfg = strict_config(sites_root, "federation.min_sites=2")
    sites = [SitePaths.under(sites_root, name) for name in cfg.data.sites]
    decide(sites[0].work_dir, Job.from_config(cfg), "approval", "data owner of site1")
    grid = LoopbackGrid(partitions=3)
    with caplog.at_level(logging.INFO):
        run_federation(grid, cfg, tmp_path / "run")
    refusals = [r for r in caplog.records if r.name == "fedrad.governance" and "refuses to train" in r.message]
    assert sorted(r.getMessage().split()[1] for r in refusals) == ["site2", "site3"]
    failed = [r.getMessage() for r in caplog.records if r.name == "fedrad.federation" and "failed" in r.getMessage()]
    assert len(failed) == 2 and all("has not approved job" in line for line in failed)
    assert "only 1 sites trained in round 1 but federation.min_sites=2: the federation stops" in caplog.text
    assert not (tmp_path / "run" / "model.pt").exists()
    assert len(trained_rounds(sites[0].work_dir)) == 1
    assert trained_rounds(sites[1].work_dir) == trained_rounds(sites[2].work_dir) == []


def test_data_owner_reviews_through_the_request_folder(sites_root):
    """The coordinator's request, the data owner's review and decision, the decision read back."""
    def tool(*overrides: str):
        return compose_config(
            *FAST_FEDERATION, f"data.sites_root={sites_root}", "federation.num_rounds=1",
            "+job_requests=folder", *overrides,
        )

    job = Job.from_config(strict_config(sites_root, "governance.auto_approve_simulated_sites=true"))
    assert Job.from_config(tool()).job_hash == job.job_hash
    submit_job(tool())
    site = SitePaths.under(sites_root, "site2")
    listing = review(tool("+action=list"), "site2", site.work_dir)
    assert job.job_hash[:16] in listing and "1 rounds x 1 local epochs" in listing
    shown = review(tool("+action=show", f"+job={job.job_hash[:10]}"), "site2", site.work_dir)
    assert "non-private" in shown and job.code_hash in shown and "SmallCNN" in shown
    assert "approval" in review(tool("+action=approve", f"+job={job.job_hash[:10]}"), "site2", site.work_dir)
    status = job_status(tool())
    assert "site2: approval" in status and "site1: pending" in status
    assert "no job waits" in review(tool("+action=list"), "site2", site.work_dir)
    train_site(tool(), site.cache_dir, initial_state(tool()), server_round=1)


def test_syft_request_review_and_decision_round_trip(sites_root, tmp_path):
    """Through syft datasites on syft's in-memory Google Drive mock (offline)."""
    from syft_rds.client import SyftRDSClient

    from pipeline.governance.keys import site_public_key
    from pipeline.governance.syft_channel import SyftChannel

    # (data scientist, data owner); email1 / base_path1 are the data owner's. The data owner's
    # datasite must be on disk (use_in_memory_cache=False): syft jobs are listed from files.
    coordinator_client, site_client = SyftRDSClient.pair_with_mock_drive_service_connection(
        email1="data-owner@site1.example", email2="coordinator@fedrad.example",
        base_path1=str(tmp_path / "syft_site1"), base_path2=str(tmp_path / "syft_coordinator"),
        use_in_memory_cache=False,
    )
    coordinator = SyftChannel(coordinator_client, "data-owner@site1.example")
    data_owner = SyftChannel(site_client, "data-owner@site1.example")
    site = SitePaths.under(sites_root, "site1")
    cfg = strict_config(sites_root)
    job, bigger = Job.from_config(cfg), Job.from_config(strict_config(sites_root, "federation.num_rounds=9"))

    coordinator.submit(job)
    coordinator.submit(bigger)
    assert {j.job_hash for j in data_owner.pending()} == {job.job_hash, bigger.job_hash}
    assert coordinator.decision(job.job_hash) is None
    data_owner.answer(site.work_dir, job.job_hash, "approval", "data owner of site1")
    data_owner.answer(site.work_dir, bigger.job_hash, "rejection", "data owner of site1")
    assert data_owner.pending() == []

    approval, rejection = coordinator.decision(job.job_hash), coordinator.decision(bigger.job_hash)
    assert (approval.decision, rejection.decision) == ("approval", "rejection")
    approval.verify(site_public_key(site.work_dir))  # the coordinator checks the site's signature
    rejection.verify(site_public_key(site.work_dir))
    train_site(cfg, site.cache_dir, initial_state(cfg), server_round=1)
    bigger_cfg = strict_config(sites_root, "federation.num_rounds=9")
    with pytest.raises(JobNotApproved, match="rejected"):
        train_site(bigger_cfg, site.cache_dir, initial_state(bigger_cfg), server_round=1)


def test_simulated_data_owner_approves_but_never_overrides_a_rejection(sites_root):
    cfg = strict_config(sites_root, "governance.auto_approve_simulated_sites=true")
    approving, rejecting = (SitePaths.under(sites_root, name) for name in ("site1", "site2"))
    decide(rejecting.work_dir, Job.from_config(cfg), "rejection", "data owner of site2")
    train_site(cfg, approving.cache_dir, initial_state(cfg), server_round=1)
    entries = SiteLedger.for_site(approving.work_dir).entries()
    assert [e["kind"] for e in entries] == ["approval", "round"]
    assert entries[0]["body"]["decided_by"] == "simulated data owner of site1 (auto-approve)"
    with pytest.raises(JobNotApproved, match="rejected"):
        train_site(cfg, rejecting.cache_dir, initial_state(cfg), server_round=1)


def test_deployed_site_passes_its_own_policy_to_its_supernode(sites_root):
    from pipeline.deployment.site import supernode_command

    site = SitePaths.under(sites_root, "site1")
    for overrides, expected in [
        ((), "require-approval=true auto-approve=false"),
        (("governance.require_approval=false",), "require-approval=false auto-approve=false"),
    ]:
        cfg = compose_config("+site=demo_site1", "deployment.insecure=true", *overrides)
        command = supernode_command(cfg.deployment, site.cache_dir, cfg.governance)
        node_config = command[command.index("--node-config") + 1]
        assert node_config == f"cache-dir='{site.cache_dir.resolve()}' {expected}"
