"""Converters (COCO, CSV, triplets) on small hand-written inputs: the output passes validate and
loads; input problems are reported with file and line; the shard CLI."""
from __future__ import annotations

import json
import os

import pytest
from data_helpers import write_image

from regionmed_fast.cli import main as cli
from regionmed_fast.data.manifest import read_manifest
from regionmed_fast.data.validate import validate


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    write_image(str(d / "a.jpg"), 64, 48)
    write_image(str(d / "b.png"), 40, 40)
    return str(d)


def _ok(out):
    rep, _ = validate(out)
    assert not rep.errors, [str(p) for p in rep.errors]
    return read_manifest(out)


def test_coco(tmp_path, images, capsys):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "missing.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [10, 5, 20, 10], "category_id": 7},
            {"id": 2, "image_id": 1, "bbox": [50, 40, 30, 30], "category_id": 8},  # clipped
            {"id": 3, "image_id": 2, "bbox": [1, 1, 0, 5], "category_id": 7},     # empty: skipped
            {"id": 4, "image_id": 1, "caption": "A chest film with a nodule."},
        ],
        "categories": [{"id": 7, "name": "nodule"}, {"id": 8, "name": "pleural effusion"}],
    }
    src = tmp_path / "coco.json"
    src.write_text(json.dumps(coco))
    out = str(tmp_path / "out")
    assert cli(["convert", "--from", "coco", str(src), "--images", images, "--out", out,
                "--region-template", "a {name}"]) == 0
    printed = capsys.readouterr().out
    assert "images[2] (missing.jpg): image not found" in printed
    assert "annotations[2]" in printed and "annotations[1]" in printed  # skipped / clipped
    recs = _ok(out)
    assert [r["image"] for r in recs] == ["../imgs/a.jpg", "../imgs/b.png"]
    a, b = recs
    assert a["text"] == "A chest film with a nodule."
    assert [(r["text"], r["label"]) for r in a["regions"]] == [("a nodule", "nodule"),
                                                              ("a pleural effusion", "pleural effusion")]
    assert a["regions"][0]["bbox"] == [10.0, 5.0, 30.0, 15.0]
    assert a["regions"][1]["bbox"] == [50.0, 40.0, 64.0, 48.0]
    assert b["regions"] == [] and b["text"] == "medical image with no annotated finding."


def test_csv(tmp_path, images):
    src = tmp_path / "boxes.csv"
    src.write_text("image,x1,y1,x2,y2,label,text\n"
                   "a.jpg,1,2,11,12,Nodule,\n"
                   "a.jpg,20,20,40,30,Mass,a large mass\n"
                   "b.png,,,,,No Finding,\n"
                   "gone.png,1,1,2,2,Mass,\n")
    out = str(tmp_path / "out")
    from regionmed_fast.data.convert import convert

    dest, n, problems = convert("csv", str(src), images=images, out=out)
    assert n == 2 and problems == [f"{src}:5: image not found: {os.path.join(images, 'gone.png')} (skipped)"]
    a, b = _ok(out)
    assert [r["text"] for r in a["regions"]] == ["Nodule", "a large mass"]
    assert a["labels"] == ["Nodule", "Mass"] and a["text"] == "medical image showing Nodule and Mass."
    assert b["regions"] == [] and b["labels"] == ["No Finding"]


def test_csv_xywh_and_bad_header(tmp_path, images):
    from regionmed_fast.data.convert import convert

    src = tmp_path / "xywh.csv"
    src.write_text("image,x,y,w,h,label\na.jpg,1,2,10,10,cyst\n")
    convert("csv", str(src), images=images, out=str(tmp_path / "o"), box_format="xywh")
    assert _ok(str(tmp_path / "o"))[0]["regions"][0]["bbox"] == [1.0, 2.0, 11.0, 12.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,x1\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: no image column 'image' in the header file,x1; name the columns with --columns"):
        convert("csv", str(bad), images=images, out=str(tmp_path / "o2"))


def test_triplets_jsonl(tmp_path, images):
    src = tmp_path / "trip.jsonl"
    lines = [{"image": "a.jpg", "bbox": [5, 5, 25, 25], "caption": "Round opacity in the left upper zone."},
             {"image": "a.jpg", "bbox": [30, 10, 60, 40], "text": "Blunted costophrenic angle.", "label": "effusion"},
             {"image": "b.png", "bbox": [30, 30, 20, 35], "text": "reversed box"}]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    from regionmed_fast.data.convert import convert

    _, n, problems = convert("triplets", str(src), images=images, out=str(tmp_path / "o"))
    assert any(p.startswith(f"{src}:3: box") for p in problems)
    assert any(p.startswith(f"{src}:4: not valid JSON") for p in problems)
    a, b = _ok(str(tmp_path / "o"))
    assert a["text"] == "Round opacity in the left upper zone. Blunted costophrenic angle."
    assert [r["label"] for r in a["regions"]] == ["Round opacity in the left upper zone.", "effusion"]
    assert b["regions"] == [] and b["text"] == "reversed box"


def test_triplets_csv(tmp_path, images):
    src = tmp_path / "trip.csv"
    src.write_text("image,x1,y1,x2,y2,text\nb.png,0,0,40,40,whole lesion\n")
    from regionmed_fast.data.convert import convert

    convert("triplets", str(src), images=images, out=str(tmp_path / "o"))
    (b,) = _ok(str(tmp_path / "o"))
    assert b["regions"][0]["text"] == "whole lesion" and b["regions"][0]["bbox"] == [0.0, 0.0, 40.0, 40.0]


def test_shard_cli(tmp_path, images, capsys):
    from data_helpers import good_dataset

    root = good_dataset(str(tmp_path / "ds"), n=3)
    assert cli(["shard", root, "--out", str(tmp_path / "sh"), "--size", "4KB"]) == 0
    assert "3 sample(s)" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "sh" / "shards.json")
    assert cli(["shard", root, "--out", str(tmp_path / "sh2"), "--size", "lots"]) == 1
