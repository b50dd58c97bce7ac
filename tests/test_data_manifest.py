"""Manifest validation: one test per error kind (file and line in the message), skip-and-count,
``validate --fix``, qa.jsonl and the CLI."""
from __future__ import annotations

import json
import logging
import os

import pytest
from data_helpers import good_dataset, record, write_dataset, write_image

from regionmed_fast.data import manifest as M
from regionmed_fast.data.validate import FIXED, validate, validate_main


def _bad_at_line3(tmp_path, bad, images=None, bad_image=None):
    """A dataset whose 3rd line is ``bad`` (lines 1, 2, 4 are good)."""
    root = str(tmp_path / "ds")
    good_dataset(root, n=3)
    recs = [json.loads(x) for x in open(os.path.join(root, "annotations.jsonl"))]
    if bad_image is not None:
        bad_image(root)
    write_dataset(root, [recs[0], recs[1], bad, recs[2]], images=images)
    return root


def _expect(root, kind, line=3):
    man = os.path.join(root, "annotations.jsonl")
    with pytest.raises(M.ManifestError) as ei:
        M.read_manifest(root)
    msg = str(ei.value)
    assert msg.startswith(f"{man}:{line}:"), msg
    assert kind in msg
    assert ei.value.problem.kind == kind
    rep, _ = validate(root)
    assert [(p.line, p.kind) for p in rep.errors] == [(line, kind)]
    return msg


def test_bad_json(tmp_path):
    root = _bad_at_line3(tmp_path, '{"image": "images/img0.jpg", "width": 64,')
    assert "not valid JSON" in _expect(root, M.BAD_JSON)


def test_not_an_object(tmp_path):
    _expect(_bad_at_line3(tmp_path, "[1, 2, 3]"), M.BAD_JSON)


def test_missing_field(tmp_path):
    rec = record("img0.jpg", 64, 48)
    del rec["text"]
    assert "'text'" in _expect(_bad_at_line3(tmp_path, rec), M.MISSING_FIELD)


def test_missing_region_field(tmp_path):
    rec = record("img0.jpg", 64, 48)
    del rec["regions"][0]["bbox"]
    _expect(_bad_at_line3(tmp_path, rec), M.MISSING_FIELD)


def test_wrong_field_type(tmp_path):
    rec = record("img0.jpg", 64, 48)
    rec["width"] = "64"
    _expect(_bad_at_line3(tmp_path, rec), M.BAD_FIELD)


def test_missing_image(tmp_path):
    rec = record("nope.jpg", 64, 48)
    assert "nope.jpg" in _expect(_bad_at_line3(tmp_path, rec), M.MISSING_IMAGE)


def test_unreadable_image(tmp_path):
    def corrupt(root):
        with open(os.path.join(root, "images", "bad.jpg"), "wb") as fh:
            fh.write(b"this is not an image")
    rec = record("bad.jpg", 64, 48)
    _expect(_bad_at_line3(tmp_path, rec, bad_image=corrupt), M.UNREADABLE_IMAGE)


def test_truncated_image_found_by_full_decode(tmp_path):
    def truncate(root):
        write_image(os.path.join(root, "images", "trunc.jpg"), 64, 48)
        p = os.path.join(root, "images", "trunc.jpg")
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])
    root = _bad_at_line3(tmp_path, record("trunc.jpg", 64, 48), bad_image=truncate)
    rep, _ = validate(root)  # validate decodes every image fully
    assert [(p.line, p.kind) for p in rep.errors] == [(3, M.UNREADABLE_IMAGE)]


def test_reversed_box(tmp_path):
    rec = record("img0.jpg", 64, 48, boxes=[(30, 5, 10, 20)])
    _expect(_bad_at_line3(tmp_path, rec), M.REVERSED_BOX)


def test_nan_box(tmp_path):
    rec = json.dumps(record("img0.jpg", 64, 48)).replace("[4, 4, 20, 20]", "[4, NaN, 20, 20]")
    _expect(_bad_at_line3(tmp_path, rec), M.NAN_BOX)


def test_zero_area_box(tmp_path):
    rec = record("img0.jpg", 64, 48, boxes=[(10, 5, 10, 20)])
    _expect(_bad_at_line3(tmp_path, rec), M.ZERO_AREA_BOX)


def test_box_outside_image(tmp_path):
    rec = record("img0.jpg", 64, 48, boxes=[(70, 5, 90, 20)])
    _expect(_bad_at_line3(tmp_path, rec), M.OUTSIDE_BOX)


def test_box_partly_outside_is_clipped_with_a_warning(tmp_path, caplog):
    rec = record("img0.jpg", 64, 48, boxes=[(50, -5, 90, 20)])
    root = _bad_at_line3(tmp_path, rec)
    with caplog.at_level(logging.WARNING, logger="regionmed_fast.data"):
        recs = M.read_manifest(root)
    assert recs[2]["regions"][0]["bbox"] == [50.0, 0.0, 64.0, 20.0]
    assert any(":3:" in r.getMessage() and M.CLIPPED_BOX in r.getMessage() for r in caplog.records)


def test_size_mismatch(tmp_path):
    rec = record("img0.jpg", 65, 48)
    assert "64x48" in _expect(_bad_at_line3(tmp_path, rec), M.SIZE_MISMATCH)


def test_skip_bad_counts_and_keeps_good(tmp_path, caplog):
    root = str(tmp_path / "ds")
    good_dataset(root, n=3)
    recs = [json.loads(x) for x in open(os.path.join(root, "annotations.jsonl"))]
    lines = [recs[0], "not json", record("nope.jpg", 64, 48), recs[1],
             record("img0.jpg", 64, 48, boxes=[(30, 5, 10, 20)]), recs[2]]
    write_dataset(root, lines)
    rep = M.ManifestReport()
    with caplog.at_level(logging.WARNING, logger="regionmed_fast.data"):
        out = M.read_manifest(root, skip_bad=True, report=rep)
    assert [r["_line"] for r in out] == [1, 4, 6]
    assert rep.skipped == 3 and rep.lines == 6
    assert any("skipped 3 bad record" in r.getMessage() for r in caplog.records)


def test_images_without_regions_and_empty_text_are_kept(tmp_path):
    root = str(tmp_path / "ds")
    write_image(os.path.join(root, "images", "a.png"), 32, 32)
    write_dataset(root, [record("a.png", 32, 32, boxes=[], text="")])
    rep, _ = validate(root)
    assert not rep.errors
    assert {p.kind for p in rep.warnings} == {M.NO_REGIONS, M.EMPTY_TEXT}
    assert M.read_manifest(root)[0]["regions"] == []


def test_fix_writes_clean_manifest_next_to_original(tmp_path, capsys):
    root = str(tmp_path / "ds")
    good_dataset(root, n=2)
    recs = [json.loads(x) for x in open(os.path.join(root, "annotations.jsonl"))]
    two = record("img0.jpg", 64, 48, boxes=[(4, 4, 20, 20), (30, 5, 10, 20), (50, 1, 70, 9)])
    write_dataset(root, [recs[0], "garbage", two, record("nope.jpg", 64, 48), recs[1]])
    original = open(os.path.join(root, "annotations.jsonl")).read()
    assert validate_main([root, "--fix"]) == 1
    out = capsys.readouterr().out
    assert f"{os.path.join(root, 'annotations.jsonl')}:2: error: bad_json" in out
    assert "5 record(s): 2 usable, 3 with errors" in out
    assert open(os.path.join(root, "annotations.jsonl")).read() == original  # never overwritten
    fixed = os.path.join(root, FIXED)
    assert validate_main([fixed]) == 0
    got = M.read_manifest(fixed)
    assert len(got) == 3
    assert [r["bbox"] for r in got[1]["regions"]] == [[4.0, 4.0, 20.0, 20.0], [50.0, 1.0, 64.0, 9.0]]


def test_qa_problems_reported(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=1)
    with open(os.path.join(root, "qa.jsonl"), "w") as fh:
        fh.write(json.dumps({"image": "images/img0.jpg", "question": "q?", "answer": "a"}) + "\n")
        fh.write(json.dumps({"image": "images/img0.jpg", "question": "q?"}) + "\n")
    rep, _ = validate(root)
    assert [(os.path.basename(p.file), p.line, p.kind) for p in rep.errors] == [("qa.jsonl", 2, "missing_field")]
    with pytest.raises(M.ManifestError, match=r"qa.jsonl:2:"):
        M.read_qa(root)


def test_missing_manifest(tmp_path, capsys):
    assert validate_main([str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().out
