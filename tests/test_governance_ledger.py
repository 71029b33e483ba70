"""The site ledger: tampering of each kind is caught; a federated round and a consent
revocation are recorded in it; a revoked patient leaves the cache and every later round."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.contracts.cache import MANIFEST_NAME, SiteCache
from pipeline.contracts.layout import RunLayout, SitePaths
from pipeline.federation.site_task import train_site
from pipeline.governance.budget import PrivacyLedger
from pipeline.governance.code_hash import code_hash
from pipeline.governance.heads import coordinator_heads, verify_site_ledger
from pipeline.governance.keys import (
    KeyFileError,
    load_public_key,
    private_key_path,
    public_key_path,
    site_public_key,
    site_signing_key,
)
from pipeline.governance.revocation import preprocess_consented, revoke_patient
from pipeline.governance.rounds import experiment_sha256, rows_sha256, state_sha256, trained_patients
from pipeline.governance.site_ledger import (
    GENESIS,
    LedgerCorrupted,
    SiteLedger,
    _signed,
    canonical_json,
    entry_hash,
)
from pipeline.ingestion.preprocess import CONSENT_REVOKED
from pipeline.ingestion.pseudonym import load_secret, patient_key
from pipeline.training.checkpoints import load_checkpoint
from pipeline.training.datamodule import CacheDataModule
from pipeline.training.loop import build_classifier
from tests.conftest import DEMO_IMAGE_SIZE, FAST_FEDERATION, compose_config, dp_config

pytestmark = pytest.mark.governance

REPO = Path(__file__).resolve().parents[1]
Lines = list[str]


@pytest.fixture
def ledger(tmp_path) -> SiteLedger:
    """A site ledger with five entries."""
    ledger = SiteLedger.for_site(tmp_path)
    for n in range(1, 6):
        ledger.append("note", {"n": n})
    return ledger


def rewrite(ledger: SiteLedger, change: Callable[[Lines], Lines]) -> None:
    """Tamper with the ledger file: replace its lines with ``change(lines)``."""
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(change(lines)))


def resigned(lines: Lines, key: Ed25519PrivateKey, start: int, body: dict) -> Lines:
    """The lines with entry ``start`` given ``body`` and it and every later entry re-hashed,
    re-linked and re-signed with ``key``: a forgery that is consistent apart from the key."""
    entries = [json.loads(line) for line in lines]
    entries[start - 1]["body"] = body
    prev = entries[start - 2]["hash"] if start > 1 else GENESIS
    for entry in entries[start - 1 :]:
        entry["prev"] = prev
        entry["hash"] = prev = entry_hash(entry)
        entry["signature"] = key.sign(bytes.fromhex(entry["hash"])).hex()
    return [canonical_json(e).decode() + "\n" for e in entries]


def edit_body(lines: Lines) -> Lines:
    entry = json.loads(lines[2])
    entry["body"]["n"] = 99
    return lines[:2] + [canonical_json(entry).decode() + "\n"] + lines[3:]


TAMPERING = {
    "edited body": (edit_body, ["entry 3 (note, line 3): its hash does not match its contents"]),
    "reordered": (
        lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
        [
            "entry 3 (note, line 2): sequence number 3 where 2",
            "entry 3 (note, line 2): does not link",
            "entry 2 (note, line 3): sequence number 2 where 4",
            "entry 2 (note, line 3): does not link",
            "entry 4 (note, line 4): sequence number 4 where 3",
            "entry 4 (note, line 4): does not link",
        ],
    ),
    "middle entry removed": (
        lambda lines: lines[:2] + lines[3:],
        ["entry 4 (note, line 3): sequence number 4 where 3", "entry 4 (note, line 3): does not link"],
    ),
    "forged with another key": (
        lambda lines: resigned(lines, Ed25519PrivateKey.generate(), 3, {"n": 99}),
        [f"entry {n} (note, line {n}): signature is not the site key's" for n in (3, 4, 5)],
    ),
    "line not JSON": (
        lambda lines: lines[:1] + ["{garbage\n"] + lines[2:],
        ["line 2 (expected entry 2): not a ledger entry", "entry 3 (note, line 3): does not link"],
    ),
}


def test_intact_ledger_verifies(ledger):
    entries = ledger.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == GENESIS and entries[1]["prev"] == entries[0]["hash"]
    assert ledger.head() == (5, entries[-1]["hash"])
    assert ledger.verify([(5, entries[-1]["hash"])]) == []
    assert SiteLedger.for_reading(ledger.path.parent).verify() == []  # with the published key
    assert private_key_path(ledger.path.parent).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("kind", TAMPERING)
def test_tampering_is_detected_and_named(ledger, kind):
    change, expected = TAMPERING[kind]
    rewrite(ledger, change)
    problems = ledger.verify()
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == len(expected), problems


def test_a_signature_is_checked_once_per_process_and_a_forgery_still_fails(ledger):
    """A site reads its ledger at every message: the Ed25519 check of an entry already verified
    is remembered, and an entry re-signed with another key is a new check, which fails."""
    ledger.verify()
    before = _signed.cache_info()
    assert ledger.verify() == []
    after = _signed.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (5, 0)
    rewrite(ledger, lambda lines: resigned(lines, Ed25519PrivateKey.generate(), 3, {"n": 3}))
    problems = ledger.verify()
    assert [p.split(":")[0] for p in problems] == [f"entry {n} (note, line {n})" for n in (3, 4, 5)]
    assert all("signature is not the site key's" in p for p in problems)

def test_truncated_or_rewritten_tail_is_caught_by_the_reported_heads(ledger):
    heads = [(e["seq"], e["hash"]) for e in ledger.entries()]
    rewrite(ledger, lambda lines: lines[:3])
    assert ledger.verify() == []  # a shortened chain is still a valid chain ...
    problems = ledger.verify(heads)  # ... but not the one the coordinator was told about
    assert [p.split(" was")[0] for p in problems] == ["entry 4", "entry 5"]
    assert "its tail was removed" in problems[-1]

    ledger.append("note", {"n": 40})  # a new tail, signed with the site's own key
    ledger.append("note", {"n": 50})
    assert ledger.verify() == []
    problems = ledger.verify(heads)
    assert problems == [
        f"entry {n} differs from the head reported to the coordinator ({heads[n - 1][1][:12]}...): "
        "history was rewritten"
        for n in (4, 5)
    ]


def test_torn_last_line_stops_appends(ledger):
    with ledger.path.open("a") as handle:
        handle.write('{"seq": 6, "ti')
    with pytest.raises(LedgerCorrupted, match="last line is not a whole entry"):
        ledger.append("note", {"n": 6})
    assert any(p.startswith("line 6 (expected entry 6): not a ledger entry") for p in ledger.verify())


def with_field(lines: Lines, index: int, **fields) -> Lines:
    """Line ``index`` (0-based) with ``fields`` added to its entry, still canonical JSON."""
    entry = json.loads(lines[index]) | fields
    return lines[:index] + [canonical_json(entry).decode() + "\n"] + lines[index + 1 :]


def test_an_unsigned_field_added_to_an_entry_is_named(ledger):
    rewrite(ledger, lambda lines: with_field(lines, 2, approved_by="coordinator"))
    assert json.loads(ledger.path.read_text().splitlines()[2])["approved_by"] == "coordinator"
    # Hash, signature and links are all still right: only the extra field is wrong.
    assert ledger.verify() == [
        "entry 3 (note, line 3): unsigned field 'approved_by' that neither its hash nor its "
        "signature covers (added after signing)"
    ]


def test_entries_not_in_canonical_json_are_caught(ledger):
    lines = ledger.path.read_text().splitlines(keepends=True)
    # A duplicate key: Python reads the last value (the signed one), another reader the first.
    duplicate = lines[2].replace('"body":{"n":3}', '"body":{"n":7,"n":3}')
    assert json.loads(duplicate) == json.loads(lines[2]) and duplicate != lines[2]
    spaced = json.dumps(json.loads(lines[3]), sort_keys=True) + "\n"  # same content, re-serialised
    ledger.path.write_text("".join([*lines[:2], duplicate, spaced, *lines[4:]]))
    assert ledger.verify() == [
        f"entry {n} (note, line {n}): not in the canonical JSON the site writes (re-serialised, "
        "a duplicate key, or edited)"
        for n in (3, 4)
    ]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e400"])
def test_a_body_value_that_does_not_round_trip_is_caught(ledger, value):
    lines = ledger.path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"body":{"n":2}', f'"body":{{"n":{value}}}')
    ledger.path.write_text("".join(lines))
    problems = ledger.verify()
    assert problems[0].startswith("entry 2 (note, line 2): its body is not plain JSON that round-trips")
    assert all(p.startswith("entry 2 ") for p in problems), problems


def test_append_refuses_what_verify_would_reject(ledger):
    before = ledger.path.read_bytes()
    for body in ({"epsilon": float("nan")}, {"epsilon": float("inf")}):
        with pytest.raises(ValueError, match="must be plain JSON"):
            ledger.append("note", body)
    assert ledger.path.read_bytes() == before
    ledger.append("note", {"steps": (1, 2)})  # a tuple is stored as the list JSON holds
    assert ledger.verified_entries()[-1]["body"] == {"steps": [1, 2]}


def test_verified_entries_are_the_signed_fields_of_an_intact_ledger(ledger):
    entries = ledger.verified_entries()
    assert entries == ledger.entries() and [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert all(set(e) == {"seq", "time", "kind", "body", "prev", "hash", "signature"} for e in entries)
    ledger.append("round", {"run": "r", "round": 1})
    assert [e["body"] for e in ledger.verified_entries(kind="round")] == [{"run": "r", "round": 1}]
    assert ledger.verified_entries(kind="evaluation") == []
    heads = [(e["seq"], e["hash"]) for e in ledger.entries()]
    assert len(ledger.verified_entries(expected_heads=heads)) == 6
    assert SiteLedger.for_site(ledger.path.parent / "elsewhere").verified_entries() == []  # no ledger


@pytest.mark.parametrize(
    "change, first_problem",
    [
        (edit_body, "entry 3 (note, line 3): its hash does not match its contents (edited)"),
        (lambda lines: with_field(lines, 1, epsilon=0.0), "entry 2 (note, line 2): unsigned field 'epsilon'"),
        (
            lambda lines: lines[:1] + ["{garbage\n"] + lines[2:],
            "line 2 (expected entry 2): not a ledger entry",
        ),
    ],
)
def test_verified_entries_refuse_a_ledger_that_does_not_verify(ledger, change, first_problem):
    rewrite(ledger, change)
    with pytest.raises(LedgerCorrupted) as refused:
        ledger.verified_entries()
    message = str(refused.value)
    assert message.startswith(f"{ledger.path} does not verify: {first_problem}")
    assert "\n" not in message and "scripts/ledger.py" in message


def test_verified_entries_check_the_expected_heads(ledger):
    heads = [(e["seq"], e["hash"]) for e in ledger.entries()]
    rewrite(ledger, lambda lines: lines[:3])  # a shorter chain is still a valid chain
    assert len(ledger.verified_entries()) == 3
    with pytest.raises(LedgerCorrupted, match=r"does not verify: entry 4 was reported .* \(and 1 more\)"):
        ledger.verified_entries(expected_heads=heads)


def test_a_site_verifies_its_own_ledger_with_its_private_key_not_the_published_one(ledger):
    """Someone re-signs the whole ledger with their own key and replaces ledger_signing.pub."""
    work_dir, forger = ledger.path.parent, Ed25519PrivateKey.generate()
    rewrite(ledger, lambda lines: resigned(lines, forger, 1, {"n": 1}))
    public_key_path(work_dir).write_bytes(
        forger.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert SiteLedger.for_reading(work_dir).verify() == []  # the published key is the forger's
    with pytest.raises(LedgerCorrupted, match="entry 1 \\(note, line 1\\): signature is not the site key's"):
        SiteLedger.for_site(work_dir).verified_entries()


# --- key files: one line naming the file and the fix, never a traceback -----------------------


def test_missing_or_garbage_public_key_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "site" / "ledger_signing.pub"
    with pytest.raises(KeyFileError, match=f"no ledger public key at {missing}: .*public_key="):
        site_public_key(missing.parent)
    with pytest.raises(KeyFileError, match=f"no ledger public key at {missing}: give a copy"):
        load_public_key(missing)
    garbage = tmp_path / "garbage.pub"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    folder = tmp_path / "a_folder.pub"
    folder.mkdir()
    for path, problem in [
        (garbage, "is not a PEM public key"),
        (rsa_pub, "is not an Ed25519 public key"),
        (folder, "cannot read the ledger public key"),
    ]:
        with pytest.raises(KeyFileError) as refused:
            load_public_key(path)
        message = str(refused.value)
        assert isinstance(refused.value, ValueError) and "\n" not in message
        assert message.startswith(f"{path} {problem}" if "cannot" not in problem else f"{problem} {path}")
        assert "ledger_signing.pub" in message  # the fix


def test_a_garbage_signing_key_is_one_line_and_is_never_replaced(tmp_path):
    path = private_key_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    for open_ledger in (site_signing_key, SiteLedger.for_site):
        with pytest.raises(
            KeyFileError, match=f"^{path} is not a PEM private key .*: restore the site's key"
        ):
            open_ledger(tmp_path)
    assert path.read_bytes() == b"garbage" and not public_key_path(tmp_path).exists()


def test_ledger_script_prints_one_line_for_a_bad_key_file(tmp_path):
    garbage = tmp_path / "copy.pub"
    garbage.write_text("not a key\n")
    runs = {
        "garbage": (
            run_script(
                "ledger.py",
                "+site=demo_site1",
                f"data.sites_root={tmp_path}",
                "action=verify",
                f"public_key={garbage}",
                cwd=tmp_path,
            ),
            garbage,
        ),
        "missing": (
            run_script(
                "ledger.py", "+site=demo_site1", f"data.sites_root={tmp_path}", "action=verify", cwd=tmp_path
            ),
            public_key_path(tmp_path / "site1" / "fedrad"),
        ),
    }
    for name, (done, path) in runs.items():
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        assert "Traceback" not in done.stdout + done.stderr, name
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("ledger.py: ") and str(path) in line, (name, line)


def _append_many(work_dir: Path, count: int) -> None:
    ledger = SiteLedger.for_site(work_dir)
    for n in range(count):
        ledger.append("note", {"writer": os.getpid(), "n": n})


def test_concurrent_appends_from_threads_and_processes_keep_the_chain(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [threading.Thread(target=_append_many, args=(tmp_path, 25)) for _ in range(3)]
    workers += [context.Process(target=_append_many, args=(tmp_path, 25)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ledger = SiteLedger.for_site(tmp_path)
    assert [e["seq"] for e in ledger.entries()] == list(range(1, 126))
    assert ledger.verify() == []


# --- a real federated round and a consent revocation on the demo sites -----------------------


def run_id_of(demo_run: Path) -> str:
    return json.loads((demo_run / "run.json").read_text())["run_id"]


def round_entries(work_dir: Path, run_id: str) -> list[dict]:
    entries = SiteLedger.for_reading(work_dir).entries()
    return [e for e in entries if e["kind"] == "round" and e["body"]["run"] == run_id]


@pytest.mark.slow  # shares the session's demo federation (tests/conftest.py demo_run)
def test_federated_round_is_signed_into_each_site_ledger_and_heads_reach_the_coordinator(
    demo_run, demo_sites
):
    run_id = run_id_of(demo_run)
    heads_file = RunLayout(demo_run).ledger_heads
    aggregate, _ = load_checkpoint(demo_run / "checkpoints" / "round_001.pt")
    cfg = compose_config(
        *FAST_FEDERATION,
        f"data.sites_root={demo_sites.root}",
        "data.prepare_demo=false",
        "federation.num_rounds=1",
    )  # as demo_run ran
    received, reported = set(), []
    for site in demo_sites.sites:
        [entry] = round_entries(site.work_dir, run_id)
        body = entry["body"]
        manifest = SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
        train_rows = manifest[manifest["split"] == "train"]
        assert body["round"] == 1 and body["images"] == len(train_rows)
        assert body["data_sha256"] == rows_sha256(train_rows)
        assert body["patients"] == train_rows["patient_key"].nunique()
        assert body["code_sha256"] == code_hash()
        assert body["config_sha256"] == experiment_sha256(cfg)
        received.add(body["global_model_sha256"])
        patients = trained_patients(site.work_dir)[f"{run_id}:1"]
        assert patients == sorted(set(train_rows["patient_key"]))
        # The site entered the aggregate it evaluated, and reported that entry as its head.
        ledger = SiteLedger.for_reading(site.work_dir)
        [evaluation] = [
            e for e in ledger.entries() if e["kind"] == "evaluation" and e["body"]["run"] == run_id
        ]
        assert evaluation["body"] == {
            "run": run_id,
            "round": 1,
            "global_model_sha256": state_sha256(aggregate),
        }
        assert coordinator_heads(heads_file, ledger.key_id) == [(evaluation["seq"], evaluation["hash"])]
        assert evaluation["seq"] > entry["seq"]
        reported.append(evaluation["hash"])
        assert verify_site_ledger(site.work_dir, heads_file) == []
    assert len(received) == 1  # every site received the same global model
    rounds = [json.loads(line) for line in (demo_run / "rounds.jsonl").read_text().splitlines()]
    assert sorted(h["head"] for h in rounds[0]["ledger_heads"].values()) == sorted(reported)


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def trained_patient_id(site: SitePaths) -> tuple[str, str]:
    """(source PatientID, key) of a patient in the site's train split, from its DICOM headers."""
    secret = load_secret(site.secret_file)
    manifest = SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
    train_keys = set(manifest.loc[manifest["split"] == "train", "patient_key"])
    for path in sorted(site.input_dir.glob("*.dcm")):
        patient_id = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
        if patient_key(secret, patient_id) in train_keys:
            return patient_id, patient_key(secret, patient_id)
    raise AssertionError(f"no train patient found in {site.input_dir}")


@pytest.mark.slow  # shares the session's demo federation (tests/conftest.py demo_run)
def test_revoked_patient_leaves_the_cache_and_every_later_round(demo_run, demo_sites, tmp_path):
    site = SitePaths.under(tmp_path / "sites", demo_sites.sites[0].name)  # this test's own copy
    shutil.copytree(demo_sites.sites[0].work_dir.parent, site.work_dir.parent)
    run_id = run_id_of(demo_run)
    patient_id, key = trained_patient_id(site)
    before = SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
    images = before.loc[before["patient_key"] == key, "image_key"].tolist()
    assert images and key in trained_patients(site.work_dir)[f"{run_id}:1"]
    # Other tests also train this shared demo site, so more rounds than the demo run's may name the patient.
    rounds = [r for r, patients in trained_patients(site.work_dir).items() if key in patients]

    done = run_script(
        "revoke_patient.py",
        "+site=demo_site1",
        f"data.sites_root={tmp_path / 'sites'}",
        f"patient_id={patient_id}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"patient {key}: {len(images)} images removed" in done.stdout
    assert f"rounds that trained on this patient: {', '.join(rounds)}\n" in done.stdout
    [round_one] = round_entries(site.work_dir, run_id)
    assert f"{run_id}:1  site update sent  {round_one['body']['update_sha256']}" in done.stdout
    state, _ = load_checkpoint(demo_run / "checkpoints" / "round_001.pt")  # the released aggregate
    assert f"{run_id}:1  global model received  {state_sha256(state)}" in done.stdout

    after = SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()
    assert key not in set(after["patient_key"]) and len(after) == len(before) - len(images)
    assert not any(SiteCache(site.cache(DEMO_IMAGE_SIZE)).array_path(k).exists() for k in images)
    revocation = SiteLedger.for_site(site.work_dir).entries()[-1]
    assert revocation["kind"] == "revocation"
    assert revocation["body"] == {"patient_key": key, "images_removed": len(images), "rounds": rounds}

    # The next round trains without the patient.
    cfg = compose_config(*FAST_FEDERATION, f"data.sites_root={tmp_path / 'sites'}")
    datamodule = CacheDataModule.from_config(cfg.data, [site.cache(DEMO_IMAGE_SIZE)], seed=0)
    train_rows = after[after["split"] == "train"]
    assert datamodule.num_train_examples == len(train_rows)
    _, metrics = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), state, server_round=2, run_id=run_id)
    assert metrics["num-examples"] == len(train_rows)
    round_two = trained_patients(site.work_dir)[f"{run_id}:2"]
    assert round_two and key not in round_two
    assert round_entries(site.work_dir, run_id)[-1]["body"]["global_model_sha256"] == state_sha256(state)

    # Preprocessing again never adds the patient back, and moves no other patient's split.
    manifest_after_revocation = site.cache(DEMO_IMAGE_SIZE).joinpath(MANIFEST_NAME).read_bytes()
    preprocess_consented(
        site,
        compose_config(
            f"data.sites_root={tmp_path / 'sites'}",
            f"data.image_size={DEMO_IMAGE_SIZE}",
            "preprocess.workers=1",
        ).preprocess,
    )
    assert site.cache(DEMO_IMAGE_SIZE).joinpath(MANIFEST_NAME).read_bytes() == manifest_after_revocation
    assert not any(SiteCache(site.cache(DEMO_IMAGE_SIZE)).array_path(k).exists() for k in images)
    report = (site.work_dir / "report.csv").read_text()
    assert report.count(CONSENT_REVOKED) == len(images)

    # The source id is nowhere in what fedrad wrote (nor in Hydra's run folder: there is none).
    assert SiteLedger.for_reading(site.work_dir).verify() == []
    written = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and site.input_dir not in p.parents and p != site.labels_csv
    ]
    assert site.work_dir / "ledger.jsonl" in written
    assert not [p for p in written if patient_id.encode() in p.read_bytes()]


@pytest.mark.slow  # shares the session's demo federation (tests/conftest.py demo_run)
def test_ledger_script_names_tampering_against_the_coordinator_heads(demo_run, demo_sites, tmp_path):
    site = SitePaths.under(tmp_path / "sites", demo_sites.sites[1].name)
    shutil.copytree(demo_sites.sites[1].work_dir.parent, site.work_dir.parent)
    assert verify_site_ledger(site.work_dir, RunLayout(demo_run).ledger_heads) == []
    [entry] = round_entries(site.work_dir, run_id_of(demo_run))
    ledger = SiteLedger.for_reading(site.work_dir)
    [(reported, _)] = coordinator_heads(RunLayout(demo_run).ledger_heads, ledger.key_id)
    rewrite(ledger, lambda lines: lines[: entry["seq"] - 1])  # the round never happened, locally
    assert ledger.verify() == []
    tampered = run_script(
        "ledger.py",
        "+site=demo_site2",
        f"data.sites_root={tmp_path / 'sites'}",
        "action=verify",
        f"heads={RunLayout(demo_run).ledger_heads}",
        cwd=tmp_path,
    )
    assert tampered.returncode == 1, tampered.stderr[-3000:]
    assert f"TAMPERED: entry {reported} was reported to the coordinator" in tampered.stdout


def test_privacy_budget_is_read_from_the_signed_round_entries(private_site, tmp_path):
    site = private_site
    cfg = dp_config(tmp_path, "privacy.noise_multiplier=1.0", "data.augment.prob=0")
    initial = build_classifier(cfg, seed=0).net.state_dict()
    first = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial, 1, run_id="run-a")[1]["epsilon"]
    again = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial, 1, run_id="run-a")[1]["epsilon"]  # same request
    signed = round_entries(site.work_dir, "run-a")
    assert [e["body"]["round"] for e in signed] == [1]  # released once, not trained again
    assert signed[0]["body"]["epsilon"] == first == again
    accounting = PrivacyLedger.for_cache(site.cache(DEMO_IMAGE_SIZE), "rdp")
    assert accounting.entries == [signed[0]["body"]]
    assert accounting.history() == signed[0]["body"]["history"]
    assert accounting.spent(signed[0]["body"]["delta"]) == pytest.approx(first)

    # A field added to the signed round entry is covered by no signature: no accounting from it.
    ledger = SiteLedger.for_site(site.work_dir)
    index = next(i for i, e in enumerate(ledger.entries()) if e["seq"] == signed[0]["seq"])
    rewrite(ledger, lambda lines: with_field(lines, index, history_override=[]))
    with pytest.raises(LedgerCorrupted, match="unsigned field 'history_override'"):
        PrivacyLedger.for_cache(site.cache(DEMO_IMAGE_SIZE), "rdp")


def test_revocation_removes_the_patient_from_the_cache_of_every_image_size(demo_sites, tmp_path):
    site = SitePaths.under(tmp_path / "sites", demo_sites.sites[0].name)  # this test's own copy
    shutil.copytree(demo_sites.sites[0].work_dir.parent, site.work_dir.parent)
    small = compose_config(f"data.sites_root={tmp_path / 'sites'}", "data.image_size=32", "preprocess.workers=1")
    preprocess_consented(site, small.preprocess)
    assert site.work.caches() == [site.cache(32), site.cache(DEMO_IMAGE_SIZE)]
    patient_id, key = trained_patient_id(site)
    revocation = revoke_patient(site, patient_id)
    for cache in (site.cache(32), site.cache(DEMO_IMAGE_SIZE)):
        manifest = SiteCache(cache).manifest()
        assert key not in set(manifest["patient_key"]) and len(manifest) > 0
        assert sorted(p.stem for p in (cache / "arrays").glob("*.npy")) == sorted(manifest["image_key"])
    assert revocation.images_removed > 0  # image keys are the same at every size: counted once
