"""Validation of the reads CSV: the documented errors and warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.clinical.cases import Cases, SiteIndex
from pipeline.evaluation.clinical.reads import ReadsError, load_reads

pytestmark = pytest.mark.report

# Two sites; both have a file img_0001.dcm. Evaluated (test) images: a1, a2 at siteA, b1 at siteB.
SITES = [
    SiteIndex(
        "siteA",
        {
            "img_0001.dcm": ("a1", "accepted", ""),
            "img_0002.dcm": ("a2", "accepted", ""),
            "img_0003.dcm": ("a3", "accepted", ""),
            "img_0004.dcm": ("", "rejected", "view LL"),
        },
        frozenset({"a1", "a2", "a3"}),
    ),
    SiteIndex("siteB", {"img_0001.dcm": ("b1", "accepted", "")}, frozenset({"b1"})),
]
CASES = Cases(
    np.array(["siteA", "siteA", "siteB"]),
    np.array(["a1", "a2", "b1"]),
    np.array(["siteA/p1", "siteA/p2", "siteB/p3"]),
    np.array([0, 1, 2]),
    np.full((3, 3), 1 / 3),
)


def reads(tmp_path: Path, text: str):
    path = tmp_path / "reads.csv"
    path.write_text(text)
    return load_reads(path, CASES, SITES, "test")


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ReadsError) as error:
        reads(tmp_path, text)
    assert str(tmp_path / "reads.csv") in str(error.value)
    return error.value.problems


def test_valid_reads_by_file_name_and_image_key(tmp_path):
    result = reads(
        tmp_path,
        "Site,Image,Reader,Label,Confidence\n"
        "siteA,img_0001.dcm,R1,Normal,0.9\nsiteA,a2,R1,bacterial,0.6\nsiteB,img_0001.dcm,R1,viral,1\n"
        "siteA,img_0001.dcm,R2,normal,\nsiteA,img_0002.dcm,R2,pneumonia,\nsiteB,b1,R2,pneumonia,\n",
    )
    assert result.warnings == []
    first, second = result.readers
    assert first.name == "R1" and first.three_class and first.cases.tolist() == [0, 1, 2]
    assert first.labels.tolist() == ["normal", "bacterial", "viral"]
    np.testing.assert_allclose(first.pneumonia_score, [0.1, 0.6, 1.0])
    assert (
        not second.three_class
        and second.confidence is None
        and second.says_pneumonia.tolist() == [False, True, True]
    )


def test_every_bad_row_is_listed_with_its_line(tmp_path):
    found = problems(
        tmp_path,
        "site,image,reader,label,confidence\n"
        "siteA,img_0001.dcm,R1,effusion,\n"  # 2: unknown label
        "siteA,img_9999.dcm,R1,normal,\n"  # 3: unknown image
        "siteC,img_0002.dcm,R1,normal,\n"  # 4: unknown site
        "siteA,img_0002.dcm,R1,normal,1.5\n"  # 5: confidence out of range
        "siteA,img_0002.dcm,R1,normal,high\n"  # 6: confidence not a number
        "siteA,a2,R1,normal,\n"  # 7: duplicate of line 5 (same image)
        "siteA,,R1,normal,\n",
    )  # 8: empty image
    assert found == [
        "line 2: unknown label 'effusion' (expected one of normal, bacterial, viral, pneumonia)",
        "line 3: unknown image 'img_9999.dcm': not a source file or image key of site siteA",
        "line 4: unknown site 'siteC' (evaluated sites: siteA, siteB)",
        "line 5: confidence '1.5' is not a number from 0 to 1",
        "line 6: confidence 'high' is not a number from 0 to 1",
        "line 6: reader 'R1' already read image 'img_0002.dcm' on line 5",
        "line 7: reader 'R1' already read image 'a2' on line 5",
        "line 8: empty image",
    ]


def test_ambiguous_file_name_needs_a_site_column(tmp_path):
    assert problems(tmp_path, "image,reader,label\nimg_0001.dcm,R1,normal\n") == [
        "line 2: image 'img_0001.dcm' exists at sites siteA, siteB: add a site column"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("image,label\nimg_0002.dcm,normal\n", "missing column(s) reader: found image, label"),
        ("image,reader,label\n", "the file holds no reads"),
    ],
)
def test_unusable_files(tmp_path, text, message):
    (problem,) = problems(tmp_path, text)
    assert problem.startswith(message)


def test_warnings_for_missing_reads_rejected_and_out_of_split_images(tmp_path):
    result = reads(
        tmp_path,
        "site,image,reader,label,confidence,comment\n"
        "siteA,img_0001.dcm,R1,normal,0.8,\nsiteA,img_0002.dcm,R1,bacterial,,\n"
        "siteA,img_0003.dcm,R1,normal,0.7,train image\nsiteA,img_0004.dcm,R1,normal,0.9,\n"
        "siteA,img_0002.dcm,R2,pneumonia,,\nsiteB,img_0001.dcm,R2,viral,,\n",
    )
    assert result.warnings == [
        "column(s) comment ignored",
        "line 5: image 'img_0004.dcm' was not evaluated: siteA rejected it in preprocessing (view LL)",
        "1 read(s) of images outside the test split ignored",
        "reader 'R1' has no read for 1 of the 3 evaluated images: their comparisons use the 2 images they read",
        "reader 'R1' gave a confidence for only some reads: no ROC-AUC for this reader",
        "reader 'R2' has no read for 1 of the 3 evaluated images: their comparisons use the 2 images they read",
        "reader 'R2' mixes 'pneumonia' with bacterial / viral: compared on pneumonia vs normal only",
    ]
    assert [r.three_class for r in result.readers] == [True, False]


def test_reads_of_no_evaluated_image_give_a_warning(tmp_path):
    result = reads(tmp_path, "site,image,reader,label\nsiteA,img_0003.dcm,R1,normal\n")
    assert result.readers == []
    assert (
        result.warnings[-1] == "no read is of an image of the test split: the report has no reader comparison"
    )


def test_simulated_reads_are_marked_per_reader(tmp_path):
    result = reads(
        tmp_path,
        "site,image,reader,label,simulated\n"
        "siteA,img_0001.dcm,R1,normal,yes\nsiteA,img_0002.dcm,R1,bacterial,YES\n"
        "siteA,img_0001.dcm,R2,normal,\nsiteA,img_0002.dcm,R2,viral,no\n",
    )
    assert [(r.name, r.simulated) for r in result.readers] == [("R1", True), ("R2", False)]
    assert problems(tmp_path, "image,reader,label,simulated\na1,R1,normal,maybe\n") == [
        "line 2: simulated 'maybe' is not yes or no"
    ]
