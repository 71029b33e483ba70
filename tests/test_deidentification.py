"""De-identification proof: no planted identifying DICOM value reaches any site output.

The demo sites' DICOM headers carry invented patient names, patient ids, birth dates,
accession numbers, study ids, institution and physician names, and study / series / SOP
instance UIDs (``pipeline.support.demo_sites.PLANTED_KEYWORDS``). After preprocessing and one
federated round, every byte of every artifact is scanned for every one of those values:

- what may leave a site: ``cache/`` (``manifest.csv``, ``arrays/*.npy``) and what the
  federation writes (checkpoints ``*.pt``, ``model.pt``, ``rounds.jsonl``,
  ``metrics.json``, plots ``*.png``, logs and captured stdout);
- what stays on site (site-private): ``report.csv`` and ``private/source_index.csv``, which
  name source files by path; they are scanned too, since the demo's file names
  (``img_NNNN.dcm``) hold no identifier.

What a site sends over the wire is scanned at message level by
``tests/test_federation.py::test_site_reply_holds_only_parameters_count_scalars_and_its_name``.
"""

from __future__ import annotations

import inspect

import pytest

from pipeline.support.deid_scan import files_under, find_values


def test_scanner_finds_a_planted_value_in_any_encoding(tmp_path):
    (tmp_path / "clean.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "utf8.csv").write_text("key,name\nab12,Fakename^Site1Patient0001\n")
    (tmp_path / "utf16.txt").write_bytes("S1MRN00001".encode("utf-16-le"))
    (tmp_path / "spaced.log").write_text("patient Fakename Site1Patient0001 done")
    found = find_values(files_under([tmp_path]), ["Fakename^Site1Patient0001", "S1MRN00001"])
    assert found == {
        str(tmp_path / "spaced.log"): ["Fakename^Site1Patient0001"],
        str(tmp_path / "utf16.txt"): ["S1MRN00001"],
        str(tmp_path / "utf8.csv"): ["Fakename^Site1Patient0001"],
    }


def test_site_replies_are_scanned_at_message_level():
    from tests import test_federation

    scan = inspect.getsource(test_federation.test_site_reply_holds_only_parameters_count_scalars_and_its_name)
    assert "planted_identifiers" in scan and "not in payload" in scan


@pytest.mark.slow
def test_no_planted_identifier_in_any_site_or_federation_artifact(demo_sites, demo_run, planted_identifiers):
    kinds = {"PatientName": "Fakename^", "PatientID": "MRN", "AccessionNumber": "ACC", "UID": "1.2.826."}
    for keyword, marker in kinds.items():
        assert any(marker in value for value in planted_identifiers), f"no planted {keyword}"
    files = files_under([demo_run, *(site.work_dir for site in demo_sites.sites)])
    suffixes = {path.suffix for path in files}
    assert {".npy", ".csv", ".pt", ".png", ".json", ".jsonl", ".txt"} <= suffixes, suffixes
    names = {path.name for path in files}
    assert {"manifest.csv", "report.csv", "source_index.csv", "rounds.jsonl", "metrics.json"} <= names
    assert find_values(files, planted_identifiers) == {}
