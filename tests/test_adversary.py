"""A malicious coordinator against real demo sites: each attack is played and must fail.

The coordinator is the adversary here: it chooses the global model, the run id, the round, the
experiment and the SecAgg+ participants, and may send any message in any order. The sites are
copies of the demo sites (their real cached images); nothing here trusts the coordinator's config.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity
from torch.nn import functional as F

from models.registry import ForbiddenComponent
from pipeline.contracts.cache import SiteCache
from pipeline.contracts.experiment import InvalidExperiment, experiment_yaml
from pipeline.contracts.layout import SitePaths
from pipeline.contracts.messages import CONFIG_KEY, RUN_ID_KEY, NodeConfig
from pipeline.federation import site_task
from pipeline.federation.client_app import app as client_app
from pipeline.federation.releases import MASKING_NEIGHBOURS, ReleaseRefused, ReleaseStore
from pipeline.federation.secure_aggregation import STAMP, secure_aggregation_mod
from pipeline.federation.site_policy import SitePolicy
from pipeline.federation.site_task import evaluate_round, train_site
from pipeline.governance.approval import Job, JobNotApproved, decide
from pipeline.governance.budget import PrivacyLedger
from pipeline.governance.revocation import revoke_patient
from pipeline.governance.rounds import trained_patients
from pipeline.governance.site_ledger import LedgerCorrupted, SiteLedger
from pipeline.privacy.secagg import MODULUS_RANGE, SecAggSettings
from pipeline.training.loop import build_classifier
from tests.conftest import FAST_FEDERATION, compose_config, DEMO_IMAGE_SIZE
from tests.test_governance_ledger import trained_patient_id

pytestmark = pytest.mark.adversary

CLIP = 1.0


@pytest.fixture
def site(demo_sites, tmp_path) -> SitePaths:
    """A private copy of demo site 1 (images, secret, cache): its ledger is this test's own."""
    source = demo_sites.sites[0]
    bookkeeping = (
        "ledger.jsonl",
        "approvals",
        "releases",
        "trained_patients.jsonl",
        "reported_heads.jsonl",
        "revoked_patients.txt",
        "round.lock",
    )
    shutil.copytree(
        source.work_dir.parent, tmp_path / "sites" / source.name, ignore=shutil.ignore_patterns(*bookkeeping)
    )
    return SitePaths.under(tmp_path / "sites", source.name)


@pytest.fixture
def flower_identity(monkeypatch) -> None:
    """Outside a Flower runtime, say which run this process serves (as the SuperNode does)."""
    for attribute in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


def dp_job(site: SitePaths, *overrides: str):
    """A DP-SGD job whose local round is exactly one step of plain SGD over every training
    image (Poisson rate 1), so that an update is ``-(clipped gradient sum + noise) / n``."""
    return compose_config(
        *FAST_FEDERATION,
        f"data.sites_root={site.work_dir.parent.parent}",
        "data.sites=[site1]",
        "privacy=dp_sgd",
        "privacy.noise_multiplier=1.0",
        f"privacy.max_grad_norm={CLIP}",
        "privacy.epsilon_budget=1000",
        "data.augment.prob=0",
        "data.batch_size=4096",
        "model.optimizer._target_=torch.optim.SGD",
        "model.optimizer.weight_decay=0.0",
        "model.optimizer.lr=1.0",
        *overrides,
    )


def zero_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def flat_step(
    update: dict[str, torch.Tensor], received: dict[str, torch.Tensor], names: list[str]
) -> torch.Tensor:
    """The site's released step, received - update = (clipped sum + noise) / n, over ``names``."""
    return torch.cat([(received[k] - update[k]).flatten() for k in names])


def clipped_gradient_sum(
    cfg, site: SitePaths, state: dict[str, torch.Tensor], names: list[str]
) -> torch.Tensor:
    """The true sum of the per-sample gradients clipped to ``CLIP`` (one image at a time),
    over the parameters ``names``."""
    net = build_classifier(cfg, seed=0, load_pretrained=False).net
    net.load_state_dict(state)
    split = SiteCache(site.cache(DEMO_IMAGE_SIZE)).load_split("train")
    params = dict(net.named_parameters())
    total = None
    for image, label in zip(torch.tensor(split.images), torch.tensor(split.labels)):
        net.zero_grad()
        F.cross_entropy(net(image[None]), label[None]).backward()
        grad = torch.cat([p.grad.flatten() for p in params.values()])
        grad = grad * min(1.0, CLIP / (float(grad.norm()) + 1e-6))
        total = grad if total is None else total + grad
    offsets = dict(zip(params, torch.tensor([0] + [p.numel() for p in params.values()]).cumsum(0).tolist()))
    return torch.cat([total[offsets[k] : offsets[k] + params[k].numel()] for k in names])


def zero_model_attack(cfg, site: SitePaths, runs: tuple[str, str], policy: SitePolicy) -> float:
    """Cosine between the true clipped gradient sum and what the coordinator recovers by
    subtracting the release for a zero model from the release for the real model.

    At the zero model every gradient but the head's bias is zero, so that release is noise
    alone; the comparison leaves the head's bias out."""
    real = build_classifier(cfg, seed=0, load_pretrained=False).net.state_dict()
    zero = zero_model(real)
    from_zero, _ = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), zero, 1, runs[0], policy)
    from_real, _ = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), real, 1, runs[1], policy)
    n = len(SiteCache(site.cache(DEMO_IMAGE_SIZE)).load_split("train").labels)
    names = list(real)[:-1]  # every parameter but the head's bias
    recovered = (flat_step(from_real, real, names) - flat_step(from_zero, zero, names)) * n
    truth = clipped_gradient_sum(cfg, site, real, names)
    return float(F.cosine_similarity(recovered, truth, dim=0))


def test_zero_model_replay_in_one_run_is_refused_and_charges_once(site):
    cfg = dp_job(site)
    real = build_classifier(cfg, seed=0, load_pretrained=False).net.state_dict()
    train_site(cfg, site.cache(DEMO_IMAGE_SIZE), zero_model(real), 1, "run-a")
    charged = PrivacyLedger(site.work_dir, "rdp").spent(1e-5)
    with pytest.raises(ReleaseRefused, match="already released round 1 of run run-a"):
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), real, 1, "run-a")
    assert PrivacyLedger(site.work_dir, "rdp").spent(1e-5) == charged  # nothing replaced a charge


def test_zero_model_replay_across_runs_recovers_nothing(site):
    cfg = dp_job(site)
    cosine = zero_model_attack(cfg, site, ("run-a", "run-b"), SitePolicy())
    assert abs(cosine) < 0.5, cosine
    rounds = PrivacyLedger(site.work_dir, "rdp").entries
    assert [(r["run"], r["noise_source"]) for r in rounds] == [("run-a", "csprng"), ("run-b", "csprng")]


def test_the_attack_succeeds_with_seeded_noise_which_sites_refuse(site, tmp_path):
    """The same measurement with noise drawn from the job's seed recovers the gradient sum: the
    test above can fail. Sites refuse such a job unless their own policy allows it."""
    cfg = dp_job(site, "privacy.debug_seeded_noise=true")
    with pytest.raises(PermissionError, match="debug_seeded_noise"):
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), build_classifier(cfg, seed=0).net.state_dict(), 1, "run-a")
    cosine = zero_model_attack(cfg, site, ("run-b", "run-c"), SitePolicy(allow_seeded_noise=True))
    assert cosine > 0.99, cosine


def test_same_round_with_another_model_is_charged_in_full_when_the_site_allows_it(site):
    cfg = dp_job(site)
    real = build_classifier(cfg, seed=0, load_pretrained=False).net.state_dict()
    charge = SitePolicy(retrain_round="charge")
    _, first = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), zero_model(real), 1, "run-a", charge)
    _, second = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), real, 1, "run-a", charge)
    _, replayed = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), real, 1, "run-a", charge)
    assert second["epsilon"] > first["epsilon"] and replayed == second
    assert len(PrivacyLedger(site.work_dir, "rdp").entries) == 2


def message(
    cfg,
    state,
    kind: str,
    server_round: int = 1,
    run: str = "run-a",
    text: str | None = None,
    extra: dict | None = None,
) -> Message:
    config = {CONFIG_KEY: text or experiment_yaml(cfg), RUN_ID_KEY: run, "server-round": server_round}
    records = {"arrays": ArrayRecord(state), "config": ConfigRecord(config)} | (extra or {})
    return Message(RecordDict(records), dst_node_id=1, message_type=kind)


def deployed(site: SitePaths) -> Context:
    """The context of a deployed site that requires approval and approves nothing by itself."""
    return Context(
        run_id=1, node_id=1, node_config=NodeConfig(site.work_dir).as_node_config(), state=RecordDict(), run_config={}
    )


def test_evaluation_and_secagg_stages_of_an_unapproved_job_are_refused(site, flower_identity):
    cfg = dp_job(site)
    state = build_classifier(cfg, seed=0).net.state_dict()
    with pytest.raises(JobNotApproved, match="has not approved job"):
        client_app(message(cfg, state, "evaluate"), deployed(site))
    decide(site.work_dir, Job.from_config(cfg), "rejection", "data owner of site1")
    with pytest.raises(JobNotApproved, match="rejected job"):
        client_app(message(cfg, state, "evaluate"), deployed(site))
    stamp = ConfigRecord({CONFIG_KEY: experiment_yaml(cfg), RUN_ID_KEY: "run-a", "server-round": 1})
    setup = Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP}), STAMP: stamp}),
        dst_node_id=1,
        message_type="train",
    )
    with pytest.raises(JobNotApproved, match="rejected job"):
        client_app(setup, deployed(site))
    bare = Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP})}),
        dst_node_id=1,
        message_type="train",
    )
    with pytest.raises(InvalidExperiment, match="carries no experiment"):
        client_app(bare, deployed(site))
    assert [e["kind"] for e in SiteLedger.for_site(site.work_dir).entries()] == ["rejection"]


def test_a_message_carrying_two_experiments_is_refused(site, flower_identity):
    cfg = dp_job(site)
    decide(site.work_dir, Job.from_config(cfg), "approval", "data owner of site1")
    other = dp_job(site, "privacy.max_grad_norm=100")
    state = build_classifier(cfg, seed=0).net.state_dict()
    smuggled = {"fitins.config": ConfigRecord({CONFIG_KEY: experiment_yaml(other), "server-round": 1})}
    with pytest.raises(InvalidExperiment, match="different experiments"):
        client_app(message(cfg, state, "train", extra=smuggled), deployed(site))


def test_a_secure_aggregation_job_is_never_answered_in_the_clear(site, flower_identity):
    cfg = dp_job(site, "federation.secure_aggregation=true", "federation.num_sites=3")
    decide(site.work_dir, Job.from_config(cfg), "approval", "data owner of site1")
    state = build_classifier(cfg, seed=0).net.state_dict()
    with pytest.raises(InvalidExperiment, match="requires secure aggregation"):
        client_app(message(cfg, state, "train"), deployed(site))
    assert PrivacyLedger(site.work_dir, "rdp").entries == []


FORBIDDEN = {
    "model.net": lambda e, p: e["model"]["net"].update(_target_="pathlib.Path.write_text", self=p, data="x"),
    "model.optimizer": lambda e, p: e["model"]["optimizer"].update(_target_="shutil.copyfile", src=p, dst=p),
    "model.net option": lambda e, p: e["model"]["net"].update(
        width={"_target_": "torch.save", "obj": 1, "f": p}
    ),
    "model": lambda e, p: e["model"].update(writer={"_target_": "numpy.save", "file": p, "arr": [1]}),
    "trainer": lambda e, p: e["trainer"].update(callbacks=[{"_target_": "torch.save", "obj": 1, "f": p}]),
    "data": lambda e, p: e["data"].update(_target_="pathlib.Path.write_text", self=p, data="x"),
    "data.augment": lambda e, p: e["data"]["augment"].update(writer={"_target_": "numpy.save", "file": p}),
    "federation": lambda e, p: e["federation"]["secagg"].update(_target_="shutil.copyfile", src=p, dst=p),
    "privacy": lambda e, p: e["privacy"].update(_target_="torch.save", obj=1, f=p),
    "governance": lambda e, p: e["governance"].update(_target_="pathlib.Path.write_text", self=p, data="x"),
    "seed": lambda e, p: e.update(seed={"_target_": "pathlib.Path.write_text", "self": p, "data": "x"}),
    "top level": lambda e, p: e.update(_target_="pathlib.Path.write_text", self=p, data="x"),
    "interpolation": lambda e, p: e["data"].update(batch_size="${oc.env:HOME}"),
    "hydra call key": lambda e, p: e["model"]["net"].update(_args_=[p]),
    "trainer option": lambda e, p: e["trainer"].update(default_root_dir=p),
}


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_file_writing_targets_are_refused_in_every_part_of_the_config(site, flower_identity, where, kind):
    cfg = dp_job(site, "governance.auto_approve_simulated_sites=true")
    target = site.work_dir / "privacy_ledger.json"
    experiment = json.loads(experiment_yaml(cfg))
    FORBIDDEN[where](experiment, str(target))
    state = build_classifier(cfg, seed=0).net.state_dict()
    simulated = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    with pytest.raises(ForbiddenComponent):
        client_app(message(cfg, state, kind, text=json.dumps(experiment)), simulated)
    assert not target.exists()
    assert not (site.work.ledger).exists()  # nothing was approved, trained or logged


def test_the_spent_budget_cannot_be_lowered(site):
    cfg = dp_job(site)
    state = build_classifier(cfg, seed=0).net.state_dict()
    train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 1, "run-a")
    evaluate_round(cfg, site.cache(DEMO_IMAGE_SIZE), state, 1, "run-a")  # the site reports its ledger head
    train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 2, "run-a")
    spent = PrivacyLedger(site.work_dir, "rdp").spent(1e-5)
    # the old side file that listed the charged rounds no longer counts for anything
    (site.work_dir / "privacy_ledger.json").write_text('{"rounds": []}')
    assert PrivacyLedger(site.work_dir, "rdp").spent(1e-5) == spent
    # a lost release store makes the same request a new, fully charged training
    shutil.rmtree(site.private_dir / "releases")
    train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 2, "run-a")
    assert PrivacyLedger(site.work_dir, "rdp").spent(1e-5) > spent

    ledger_path = site.work.ledger
    signed = ledger_path.read_text()
    lines = signed.splitlines(keepends=True)
    tampered = {
        "last rounds removed": "".join(lines[:2]),
        "epsilon edited": signed.replace('"epsilon":', '"epsilon":0.0,"was":', 1),
        "unsigned field added": signed.replace('{"body"', '{"extra":{"rounds":[]},"body"', 1),
        "emptied": "",
    }
    for name, text in tampered.items():
        ledger_path.write_text(text)
        with pytest.raises((LedgerCorrupted, JobNotApproved), match="does not verify|has no decision"):
            train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 3, "run-a")
    ledger_path.write_text(signed)
    train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 3, "run-a")


def test_secagg_update_enters_a_second_aggregation_only_with_the_same_participants(site):
    cfg = dp_job(site)
    state = build_classifier(cfg, seed=0).net.state_dict()
    token = MASKING_NEIGHBOURS.set([11, 12, 13])
    try:
        first, _ = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 1, "run-a")
        again, _ = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 1, "run-a")  # a resumed round
        assert all(torch.equal(first[k], again[k]) for k in first)
        MASKING_NEIGHBOURS.set([11, 12])
        with pytest.raises(ReleaseRefused, match="same participants"):
            train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 1, "run-a")
    finally:
        MASKING_NEIGHBOURS.reset(token)
    with pytest.raises(ReleaseRefused, match="secure"):  # the same update in the clear
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 1, "run-a")
    store = ReleaseStore(site.work)
    store.unmasking("run-a", 1, [11, 12, 13], [])
    store.unmasking("run-a", 1, [11, 12, 13], [])
    with pytest.raises(ReleaseRefused, match="already unmasked"):
        store.unmasking("run-a", 1, [12, 13], [11])  # a site declared dropped the second time


def test_unmasking_is_checked_by_the_sites_mod(site, flower_identity):
    cfg = dp_job(site, "governance.auto_approve_simulated_sites=true")
    state = build_classifier(cfg, seed=0).net.state_dict()
    token = MASKING_NEIGHBOURS.set([1, 2, 3])
    try:
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 1, "run-a")
    finally:
        MASKING_NEIGHBOURS.reset(token)
    ReleaseStore(site.work).unmasking("run-a", 1, [1, 2, 3], [])
    stamp = ConfigRecord({CONFIG_KEY: experiment_yaml(cfg), RUN_ID_KEY: "run-a", "server-round": 1})
    unmask = Message(
        RecordDict(
            {
                RECORD_KEY_CONFIGS: ConfigRecord(
                    {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]}
                ),
                STAMP: stamp,
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ReleaseRefused, match="already unmasked"):
        secure_aggregation_mod(unmask, context, lambda m, c: m)


def test_a_revocation_during_a_round_lists_that_round(site, monkeypatch):
    cfg = dp_job(site)
    state = build_classifier(cfg, seed=0).net.state_dict()
    patient_id, key = trained_patient_id(site)
    started = threading.Event()
    real_train = site_task.train

    def slow_train(*args, **kwargs):
        started.set()
        time.sleep(2.0)  # the revocation arrives while the round trains
        return real_train(*args, **kwargs)

    monkeypatch.setattr(site_task, "train", slow_train)
    round_in_flight = threading.Thread(target=train_site, args=(cfg, site.cache(DEMO_IMAGE_SIZE), state, 5, "run-a"))
    round_in_flight.start()
    assert started.wait(timeout=120)
    revocation = revoke_patient(site, patient_id)
    round_in_flight.join(timeout=300)
    assert key in trained_patients(site.work_dir)["run-a:5"]  # the round did train on them
    assert revocation.rounds == ["run-a:5"]
    kinds = [e["kind"] for e in SiteLedger.for_site(site.work_dir).entries()]
    assert kinds.index("round") < kinds.index("revocation")
    # and the released round is never sent again
    with pytest.raises(ReleaseRefused, match="consent has since been revoked"):
        train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, 5, "run-a")


def test_a_job_naming_code_can_be_neither_proposed_nor_approved(site):
    job = json.loads(Job.from_config(dp_job(site)).to_json())
    job["experiment"]["model"]["optimizer"]["_target_"] = "shutil.copyfile"
    with pytest.raises(ForbiddenComponent, match="not on the allow-list"):
        Job.from_json(json.dumps(job))
    with pytest.raises(ForbiddenComponent, match="not on the allow-list"):
        Job.from_config(dp_job(site, "model.net._target_=pathlib.Path.write_text"))


def test_the_validation_split_cannot_be_probed_beyond_one_model_per_approved_round(site, flower_identity):
    cfg = dp_job(site, "governance.auto_approve_simulated_sites=true")
    state = build_classifier(cfg, seed=0).net.state_dict()
    simulated = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    rounds = int(cfg.federation.num_rounds)
    for outside in (0, rounds + 1, 10**6):
        with pytest.raises(InvalidExperiment, match="outside the approved job's rounds"):
            client_app(message(cfg, state, "evaluate", server_round=outside), simulated)
    first = client_app(message(cfg, state, "evaluate", server_round=rounds), simulated)
    again = client_app(message(cfg, state, "evaluate", server_round=rounds), simulated)
    assert dict(first.content["metrics"]) == dict(again.content["metrics"])  # answered once
    with pytest.raises(ReleaseRefused, match="does not score another one"):
        client_app(message(cfg, zero_model(state), "evaluate", server_round=rounds), simulated)


@pytest.mark.parametrize(
    "change",
    [
        {Key.THRESHOLD: 1},
        {Key.SHARE_NUMBER: 2},
        {Key.CLIPPING_RANGE: 1e6},
        {Key.MAX_WEIGHT: 1.0},
        {Key.SAMPLE_NUMBER: 1},
    ],
)
def test_secagg_setup_with_other_parameters_than_the_job_is_refused(site, flower_identity, change):
    cfg = dp_job(
        site,
        "governance.auto_approve_simulated_sites=true",
        "federation.secure_aggregation=true",
        "federation.num_sites=3",
    )
    settings = SecAggSettings.from_config(cfg.federation, 3)
    honest = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: 3,
        Key.SHARE_NUMBER: settings.num_shares,
        Key.THRESHOLD: settings.reconstruction_threshold,
        Key.CLIPPING_RANGE: settings.clipping_range,
        Key.TARGET_RANGE: settings.quantization_range,
        Key.MOD_RANGE: MODULUS_RANGE,
        Key.MAX_WEIGHT: settings.max_weight,
    }
    stamp = ConfigRecord({CONFIG_KEY: experiment_yaml(cfg), RUN_ID_KEY: "run-a", "server-round": 1})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    def setup(configs: dict) -> Message:
        return Message(
            RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs), STAMP: stamp}),
            dst_node_id=1,
            message_type="train",
        )

    reply = client_app(setup(honest), context)  # the job's own parameters: keys come back
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]
    with pytest.raises(InvalidExperiment, match="other than the approved job's"):
        client_app(
            setup(honest | change),
            Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}),
        )
