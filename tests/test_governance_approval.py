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

from pipeline.contracts.experiment import experiment_yaml
from pipeline.contracts.layout import SitePaths
from pipeline.contracts.messages import CONFIG_KEY, NodeConfig
from pipeline.federation.client_app import app as client_app
from pipeline.federation.server_app import run_federation
from pipeline.federation.simulation import why_no_model
from pipeline.federation.site_task import train_site
from pipeline.governance import review as review_module
from pipeline.governance.approval import (
    JobDecision,
    JobNotApproved,
    current_decision,
    decide,
    decision_history,
    decision_path,
    enforce_approval,
    require_approval,
    withdraw,
)
from pipeline.governance.code_hash import (
    CODE_HASH_COVERS,
    code_files,
    code_hash,
    digest_of,
    installed_distributions,
    scripts_folder,
)
from pipeline.governance.job import Job
from pipeline.governance.keys import site_signing_key
from pipeline.governance.review import job_status, review, submit_job
from pipeline.governance.site_ledger import SiteLedger
from pipeline.support.flower_grid import LoopbackGrid
from pipeline.training.loop import build_classifier
from tests.conftest import FAST_FEDERATION, compose_config, DEMO_IMAGE_SIZE

pytestmark = pytest.mark.governance


@pytest.fixture
def sites_root(demo_sites, tmp_path) -> Path:
    """Private copies of the demo sites' caches: no key, approval or ledger of other tests."""
    for site in demo_sites.sites:
        shutil.copytree(site.cache(DEMO_IMAGE_SIZE), SitePaths.under(tmp_path, site.name).cache(DEMO_IMAGE_SIZE))
    return tmp_path


def strict_config(root: Path, *overrides: str):
    """The fast demo federation with approval required and nobody approving automatically."""
    return compose_config(
        *FAST_FEDERATION,
        f"data.sites_root={root}",
        "federation.num_rounds=1",
        "governance.auto_approve_simulated_sites=false",
        *overrides,
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
            train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)
    assert f"site site1 refuses to train: this site has not approved job {job_hash}" in caplog.text
    assert trained_rounds(site.work_dir) == []


def test_a_federation_no_site_approved_says_why_and_how_to_approve(sites_root, tmp_path):
    """Custom sites without a preset: every site refuses, and the run says so plainly (not a
    missing model.pt)."""
    cfg = strict_config(sites_root)
    run_federation(LoopbackGrid(partitions=3), cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "model.pt").exists()
    message = why_no_model(tmp_path / "run", cfg)
    assert "no round had federation.min_sites=2 sites that trained" in message
    assert "Every site refused the job because its data owner has not approved it" in message
    assert "review_job.py" in message and "governance.auto_approve_simulated_sites=true" in message


def test_rejected_job_does_not_train(sites_root):
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    decide(site.work_dir, Job.from_config(cfg), "rejection", "data owner of site1")
    with pytest.raises(JobNotApproved, match="data owner rejected job"):
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)
    assert trained_rounds(site.work_dir) == []
    assert [e["kind"] for e in SiteLedger.for_site(site.work_dir).entries()] == ["rejection"]


@pytest.mark.parametrize(
    "changed",
    [
        ["federation.num_rounds=5"],
        ["model.optimizer.lr=0.1"],
        ["privacy=dp_sgd", "privacy.epsilon_budget=50"],
    ],
)
def test_approval_of_another_job_does_not_count(sites_root, changed):
    """The data owner approved the 1-round, non-private job; the coordinator sends another."""
    site = SitePaths.under(sites_root, "site1")
    approved = Job.from_config(strict_config(sites_root))
    decide(site.work_dir, approved, "approval", "data owner of site1")
    cfg = strict_config(sites_root, *changed)
    assert Job.from_config(cfg).job_hash != approved.job_hash
    with pytest.raises(JobNotApproved, match="has not approved job"):
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)
    assert trained_rounds(site.work_dir) == []


def test_forged_or_altered_decision_does_not_count(sites_root):
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    job = Job.from_config(cfg)
    site_signing_key(site.work_dir)  # the site has its own key
    other_key = Ed25519PrivateKey.generate()
    forged = JobDecision(
        job_hash=job.job_hash,
        decision="approval",
        summary=job.summary(),
        decided_by="someone",
        decided_at="2026-01-01T00:00:00+00:00",
        signature=other_key.sign(JobDecision.signed_bytes(job.job_hash, "approval")).hex(),
    )
    path = decision_path(site.work_dir, job.job_hash)
    path.parent.mkdir(parents=True)
    path.write_text(forged.to_json())
    with pytest.raises(JobNotApproved, match="not a decision signed by this site's key"):
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)
    # The site's own rejection, edited into an approval, is no approval either.
    decide(site.work_dir, job, "rejection", "data owner of site1")
    record = json.loads(path.read_text()) | {"decision": "approval"}
    path.write_text(json.dumps(record))
    with pytest.raises(JobNotApproved, match="not a decision signed by this site's key"):
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)
    assert trained_rounds(site.work_dir) == []


def test_approved_job_trains(sites_root):
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    decide(site.work_dir, Job.from_config(cfg), "approval", "data owner of site1")
    initial = initial_state(cfg)
    state, metrics = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial, server_round=1)
    assert metrics["num-examples"] > 0
    assert any(not torch.equal(state[k], initial[k]) for k in initial)
    assert [e["kind"] for e in SiteLedger.for_site(site.work_dir).entries()] == ["approval", "round"]


def test_coordinator_cannot_switch_a_deployed_sites_gate_off(sites_root, monkeypatch):
    """A deployed site (work-dir in its node config) ignores the governance the coordinator sends."""
    for attribute in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    site = SitePaths.under(sites_root, "site1")
    sent = strict_config(
        sites_root, "governance.require_approval=false", "governance.auto_approve_simulated_sites=true"
    )
    message = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(initial_state(sent)),
                "config": ConfigRecord({CONFIG_KEY: experiment_yaml(sent), "server-round": 1}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config=NodeConfig(site.work_dir).as_node_config(),
        state=RecordDict(),
        run_config={},
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
    refusals = [
        r for r in caplog.records if r.name == "fedrad.governance" and "refuses to train" in r.message
    ]
    assert sorted(r.getMessage().split()[1] for r in refusals) == ["site2", "site3"]
    failed = [
        r.getMessage() for r in caplog.records if r.name == "fedrad.federation" and "failed" in r.getMessage()
    ]
    assert len(failed) == 2 and all("has not approved job" in line for line in failed)
    assert "only 1 sites trained in round 1 but federation.min_sites=2: the federation stops" in caplog.text
    assert not (tmp_path / "run" / "model.pt").exists()
    assert len(trained_rounds(sites[0].work_dir)) == 1
    assert trained_rounds(sites[1].work_dir) == trained_rounds(sites[2].work_dir) == []


def test_data_owner_reviews_through_the_request_folder(sites_root):
    """The coordinator's request, the data owner's review and decision, the decision read back."""

    def tool(*overrides: str):
        return compose_config(
            *FAST_FEDERATION,
            f"data.sites_root={sites_root}",
            "federation.num_rounds=1",
            "+job_requests=folder",
            *overrides,
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
    train_site(tool(), site.cache(DEMO_IMAGE_SIZE), initial_state(tool()), server_round=1)


def test_syft_request_review_and_decision_round_trip(sites_root, tmp_path):
    """Through syft datasites on syft's in-memory Google Drive mock (offline)."""
    from syft_rds.client import SyftRDSClient

    from pipeline.governance.keys import site_public_key
    from pipeline.governance.syft_channel import SyftChannel

    # (data scientist, data owner); email1 / base_path1 are the data owner's. The data owner's
    # datasite must be on disk (use_in_memory_cache=False): syft jobs are listed from files.
    coordinator_client, site_client = SyftRDSClient.pair_with_mock_drive_service_connection(
        email1="data-owner@site1.example",
        email2="coordinator@fedrad.example",
        base_path1=str(tmp_path / "syft_site1"),
        base_path2=str(tmp_path / "syft_coordinator"),
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
    train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)
    bigger_cfg = strict_config(sites_root, "federation.num_rounds=9")
    with pytest.raises(JobNotApproved, match="rejected"):
        train_site(bigger_cfg, site.cache(DEMO_IMAGE_SIZE), initial_state(bigger_cfg), server_round=1)


def test_simulated_data_owner_approves_but_never_overrides_a_rejection(sites_root):
    cfg = strict_config(sites_root, "governance.auto_approve_simulated_sites=true")
    approving, rejecting = (SitePaths.under(sites_root, name) for name in ("site1", "site2"))
    decide(rejecting.work_dir, Job.from_config(cfg), "rejection", "data owner of site2")
    train_site(cfg, approving.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)
    entries = SiteLedger.for_site(approving.work_dir).entries()
    assert [e["kind"] for e in entries] == ["approval", "round"]
    assert entries[0]["body"]["decided_by"] == "simulated data owner of site1 (auto-approve)"
    with pytest.raises(JobNotApproved, match="rejected"):
        train_site(cfg, rejecting.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)


def test_deployed_site_passes_its_own_policy_to_its_supernode(sites_root):
    from pipeline.deployment.site import node_config, supernode_command

    site = SitePaths.under(sites_root, "site1")
    for overrides, expected in [
        ((), "require-approval=true auto-approve=false"),
        (("governance.require_approval=false",), "require-approval=false auto-approve=false"),
    ]:
        cfg = compose_config("+site=demo_site1", "deployment.insecure=true", *overrides)
        command = supernode_command(cfg.deployment, node_config(site, cfg), site.work.runtime_secret)
        flag = command[command.index("--node-config") + 1]
        assert flag == (
            f"work-dir='{site.work_dir.resolve()}' site-name='site1' {expected} "
            "allow-seeded-noise=false retrain-round='refuse'"
        )


# --- withdrawal: the latest decision in the site's signed ledger counts ------------------------


def test_withdrawn_approval_stands_even_when_the_old_approval_file_is_restored(sites_root):
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    job = Job.from_config(cfg)
    approval = decide(site.work_dir, job, "approval", "data owner of site1")
    assert require_approval(site.work_dir, job) == approval
    approval_file = decision_path(site.work_dir, job.job_hash).read_bytes()

    record = withdraw(site.work_dir, job.job_hash, "data owner of site1 (Dr Rossi)")
    assert record.decision == "withdrawal"
    record.verify(site_signing_key(site.work_dir).public_key())  # signed over the withdrawal
    assert (
        JobDecision.signed_bytes(job.job_hash, "withdrawal")
        == f"fedrad job withdrawal\n{job.job_hash}".encode()
    )
    entries = SiteLedger.for_site(site.work_dir).entries()
    assert [e["kind"] for e in entries] == ["approval", "withdrawal"]
    when = entries[-1]["time"]
    refusal = f"withdrew the approval of job {job.job_hash} on {when} \\(data owner of site1 \\(Dr Rossi\\)"
    with pytest.raises(JobNotApproved, match=refusal):
        require_approval(site.work_dir, job)

    decision_path(site.work_dir, job.job_hash).write_bytes(approval_file)  # rolled back
    assert JobDecision.from_json(approval_file.decode()).decision == "approval"
    with pytest.raises(JobNotApproved, match=refusal):
        require_approval(site.work_dir, job)
    with pytest.raises(JobNotApproved, match="withdrew the approval"):
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial_state(cfg), server_round=1)
    assert trained_rounds(site.work_dir) == []
    with pytest.raises(LookupError, match="no approval to withdraw"):
        withdraw(site.work_dir, job.job_hash, "data owner of site1")

    # The simulated data owner never approves a withdrawn job again ...
    auto = strict_config(sites_root, "governance.auto_approve_simulated_sites=true")
    with pytest.raises(JobNotApproved, match="withdrew the approval"):
        enforce_approval(auto, site.work_dir)
    assert [d.decision for d in decision_history(site.work_dir, job.job_hash)] == ["approval", "withdrawal"]
    # ... only an explicit new approval does, and it is then the latest decision.
    decide(site.work_dir, job, "approval", "data owner of site1")
    assert current_decision(site.work_dir, job.job_hash).decision == "approval"
    require_approval(site.work_dir, job)
    enforce_approval(auto, site.work_dir)


def test_approval_counts_only_with_both_the_ledger_entry_and_the_signed_file(sites_root):
    cfg = strict_config(sites_root, "governance.auto_approve_simulated_sites=true")
    site = SitePaths.under(sites_root, "site1")
    job = Job.from_config(cfg)
    decide(site.work_dir, job, "approval", "data owner of site1")
    path = decision_path(site.work_dir, job.job_hash)
    approval_file = path.read_bytes()

    path.unlink()  # the ledger approves, the signed file is gone
    with pytest.raises(JobNotApproved, match=f"ledger approves job {job.job_hash} .* is missing"):
        require_approval(site.work_dir, job)
    path.write_bytes(approval_file)
    require_approval(site.work_dir, job)

    ledger = SiteLedger.for_site(site.work_dir)
    ledger.path.write_text("")  # the signed file is there, the ledger's decision is gone
    with pytest.raises(
        JobNotApproved,
        match="has not approved job .*the site's ledger, which is the authority, has no decision on this job",
    ):
        require_approval(site.work_dir, job)
    with pytest.raises(JobNotApproved, match="has no decision on this job"):
        enforce_approval(cfg, site.work_dir)  # and no automatic approval over an existing file
    assert ledger.entries() == []


def test_a_ledger_that_does_not_verify_blocks_every_approval(sites_root):
    """Approved, then rejected; someone turns the signed rejection back into an approval."""
    cfg = strict_config(sites_root)
    site = SitePaths.under(sites_root, "site1")
    job = Job.from_config(cfg)
    decide(site.work_dir, job, "approval", "data owner of site1")
    approval_file = decision_path(site.work_dir, job.job_hash).read_bytes()
    decide(site.work_dir, job, "rejection", "data owner of site1")
    ledger = SiteLedger.for_site(site.work_dir)
    lines = ledger.path.read_text().splitlines(keepends=True)
    assert lines[1].count('"kind":"rejection"') == 1
    ledger.path.write_text(lines[0] + lines[1].replace('"kind":"rejection"', '"kind":"approval"'))
    decision_path(site.work_dir, job.job_hash).write_bytes(approval_file)
    with pytest.raises(
        JobNotApproved,
        match=f"while this site's ledger does not verify.*{ledger.path} does not "
        r"verify: entry 2 \(approval, line 2\): its hash does not match",
    ):
        require_approval(site.work_dir, job)
    # An unsigned field claiming an approval is refused the same way.
    ledger.path.write_text(lines[0] + lines[1][:-2] + ',"decision_override":"approval"}\n')
    with pytest.raises(JobNotApproved, match="unsigned field 'decision_override'"):
        require_approval(site.work_dir, job)


def test_a_ledger_cut_back_to_before_a_withdrawal_is_caught_by_the_reported_heads(sites_root):
    from pipeline.governance.rounds import evaluation_head

    site = SitePaths.under(sites_root, "site1")
    job = Job.from_config(strict_config(sites_root))
    decide(site.work_dir, job, "approval", "data owner of site1")
    approval_file = decision_path(site.work_dir, job.job_hash).read_bytes()
    ledger = SiteLedger.for_site(site.work_dir)
    before_withdrawal = ledger.path.read_bytes()
    withdraw(site.work_dir, job.job_hash, "data owner of site1")
    evaluation_head(site.work_dir, "run-a", 1, {"w": torch.zeros(1)})  # a head reported after it
    ledger.path.write_bytes(before_withdrawal)  # rolled back: a valid chain, approved
    decision_path(site.work_dir, job.job_hash).write_bytes(approval_file)
    assert ledger.verify() == []
    with pytest.raises(JobNotApproved, match=r"does not verify: entry 3 was reported .*its tail was removed"):
        require_approval(site.work_dir, job)


def tool_config(sites_root: Path, *overrides: str):
    return compose_config(
        *FAST_FEDERATION,
        f"data.sites_root={sites_root}",
        "federation.num_rounds=1",
        "+job_requests=folder",
        *overrides,
    )


def test_data_owner_withdraws_and_approves_again_through_review(sites_root):
    job = Job.from_config(strict_config(sites_root))
    submit_job(tool_config(sites_root))
    site = SitePaths.under(sites_root, "site2")
    prefix = f"+job={job.job_hash[:10]}"

    def act(action: str) -> str:
        return review(tool_config(sites_root, f"+action={action}", prefix), "site2", site.work_dir)

    with pytest.raises(LookupError, match="no approval to withdraw"):
        act("withdraw")  # pending, never approved
    assert "approval of job" in act("approve")
    assert "already approved" in act("approve")  # nothing signed twice
    # A rejection of an approved job withdraws the approval; it reaches the coordinator.
    assert f"site2: withdrawal of job {job.job_hash} signed with the site's key and sent" == act("reject")
    assert "site2: withdrawal (" in job_status(tool_config(sites_root))
    with pytest.raises(JobNotApproved, match="withdrew the approval .*data owner of site2"):
        require_approval(site.work_dir, job)
    assert "withdrawal on" in act("show") and "Approve it again with action=approve" in act("show")
    listing = review(tool_config(sites_root, "+action=list"), "site2", site.work_dir)
    assert "no job waits" in listing and f"{job.job_hash[:16]}  withdrawal on" in listing
    with pytest.raises(LookupError, match="no approval to withdraw"):
        act("withdraw")

    assert "approval of job" in act("approve")  # an explicit new approval
    require_approval(site.work_dir, job)
    assert "withdrawal of job" in act("withdraw")
    with pytest.raises(JobNotApproved, match="withdrew the approval"):
        require_approval(site.work_dir, job)
    kinds = [e["kind"] for e in SiteLedger.for_site(site.work_dir).entries()]
    assert kinds == ["approval", "withdrawal", "approval", "withdrawal"]


class _NoReturnChannel:
    """A channel that cannot carry a decision on a request that is no longer pending (as syft)."""

    def pending(self) -> list[Job]:
        return []

    def answer(self, work_dir, job_hash, decision, decided_by):
        raise LookupError(f"job {job_hash} is not a pending request (status approved)")


def test_withdrawal_is_signed_at_the_site_when_the_channel_cannot_carry_it(sites_root, monkeypatch):
    site = SitePaths.under(sites_root, "site1")
    job = Job.from_config(strict_config(sites_root))
    decide(site.work_dir, job, "approval", "data owner of site1")
    monkeypatch.setattr(review_module, "open_channel", lambda *args, **kwargs: _NoReturnChannel())
    report = review(
        tool_config(sites_root, "+action=reject", f"+job={job.job_hash[:12]}"), "site1", site.work_dir
    )
    assert report.startswith(
        f"site1: withdrawal of job {job.job_hash} signed with the site's key at this site"
    )
    assert "status approved" in report
    with pytest.raises(JobNotApproved, match="withdrew the approval"):
        require_approval(site.work_dir, job)


def test_review_script_withdraws_and_prints_one_line_errors(sites_root):
    from tests.test_governance_ledger import run_script

    site = SitePaths.under(sites_root, "site1")
    job = Job.from_config(strict_config(sites_root))
    decide(site.work_dir, job, "approval", "data owner of site1")
    args = ("+site=demo_site1", f"data.sites_root={sites_root}")
    done = run_script("review_job.py", *args, "action=withdraw", f"job={job.job_hash[:16]}", cwd=sites_root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"site1: withdrawal of job {job.job_hash} signed with the site's key" in done.stdout
    assert current_decision(site.work_dir, job.job_hash).decision == "withdrawal"

    again = run_script("review_job.py", *args, "action=withdraw", f"job={job.job_hash[:16]}", cwd=sites_root)
    private = site.work_dir / "private" / "ledger_signing.key"
    private.write_bytes(b"garbage")
    bad_key = run_script("review_job.py", *args, "action=list", cwd=sites_root)
    for done, text in [(again, "no approval to withdraw"), (bad_key, f"{private} is not a PEM private key")]:
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("review_job.py: ") and text in line, line


# --- the code hash covers everything that runs at the site ---------------------------------------


def test_code_hash_covers_packages_scripts_and_installed_versions(tmp_path):
    from importlib.metadata import version

    names = [name for name, _ in code_files()]
    assert "pipeline/governance/approval.py" in names and "models/__init__.py" in names
    assert "scripts/review_job.py" in names and "scripts/ledger.py" in names  # a checkout
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    distributions = installed_distributions()
    assert distributions == sorted(distributions) and len(distributions) == len(set(distributions))
    for package in ("fedrad", "cryptography", "torch", "flwr"):
        assert f"{package}=={version(package)}" in distributions
    # What code_hash() computes (uncached: others may edit the tree while a session runs).
    files = code_files()
    baseline = digest_of(files, distributions)
    assert code_hash.__wrapped__() == baseline
    first = code_hash()
    hits = code_hash.cache_info().hits
    assert code_hash() == code_hash() == first and code_hash.cache_info().hits == hits + 2  # cached

    # Any script, any package version changes the hash.
    copy = tmp_path / "review_job.py"
    copy.write_bytes(dict(files)["scripts/review_job.py"].read_bytes())
    with_copy = [(name, copy if name == "scripts/review_job.py" else path) for name, path in files]
    assert digest_of(with_copy, distributions) == baseline
    copy.write_bytes(copy.read_bytes() + b"\n# edited\n")
    assert digest_of(with_copy, distributions) != baseline
    bumped = [line + ".post1" if line.startswith("torch==") else line for line in distributions]
    assert digest_of(files, bumped) != baseline
    assert digest_of([f for f in files if not f[0].startswith("scripts/")], distributions) != baseline


def test_scripts_are_found_only_next_to_a_checkouts_package(tmp_path):
    package = tmp_path / "site-packages" / "pipeline"
    package.mkdir(parents=True)
    (tmp_path / "site-packages" / "scripts").mkdir()  # no pyproject.toml: not a checkout
    assert scripts_folder(package) is None
    (tmp_path / "site-packages" / "pyproject.toml").write_text("[project]\nname = 'fedrad'\n")
    assert scripts_folder(package) == (tmp_path / "site-packages" / "scripts").resolve()
    assert scripts_folder() == Path(__file__).resolve().parents[1] / "scripts"


def test_job_text_says_what_the_code_hash_covers(sites_root):
    text = Job.from_config(strict_config(sites_root)).render()
    code = text[text.index("\nCode\n") : text.index("Full experiment configuration")]
    for covered in (
        "pipeline/, models/ and transforms/ sources",
        "scripts/",
        "name==version of every",
        "installed Python distribution",
    ):
        assert covered in " ".join(code.split()), code
    assert "scripts/" in CODE_HASH_COVERS and "name==version" in CODE_HASH_COVERS
