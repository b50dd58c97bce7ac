"""Converter presets on the published files' real headers and real-format rows (ChestX-ray14
BBox_List_2017.csv, VinDr-CXR train.csv, RSNA Pneumonia stage_2_train_labels.csv) with blank
images of the published sizes, and the --columns mapping; each output passes validate."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from regionmed_fast.cli import main as cli
from regionmed_fast.data.convert import convert
from regionmed_fast.data.manifest import read_manifest
from regionmed_fast.data.split import record_split
from regionmed_fast.data.validate import validate

CXR14 = """Image Index,Finding Label,Bbox [x,y,w,h],,,
00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,
00014716_007.png,Atelectasis,686.101694915254,131.543606684746,185.491525423729,313.491525423729,,,
00013118_008.png,Effusion,691.8,500.1,140.4,160.9,,,
"""
VINDR = """image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max
50a418190bc3fb1ef1633bf9678929b3,No finding,14,R11,,,,
9a5094b2563a1ef3ff50dc5c7ff71345,Cardiomegaly,3,R10,691.0,1375.0,1653.0,1831.0
9a5094b2563a1ef3ff50dc5c7ff71345,Aortic enlargement,0,R10,1264.0,743.0,1611.0,1019.0
9a5094b2563a1ef3ff50dc5c7ff71345,Cardiomegaly,3,R8,701.0,1390.0,1660.0,1820.0
"""
RSNA = """patientId,x,y,width,height,Target
0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0
00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1
00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1
"""


def _blank(folder, names, size):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.new("L", size).save(os.path.join(folder, n))
    return str(folder)


def _convert(tmp_path, kind, text, images, **kw):
    src = tmp_path / f"{kind}.csv"
    src.write_text(text)
    out = str(tmp_path / f"out-{kind}")
    dest, n, problems = convert(kind, str(src), images=images, out=out, **kw)
    rep, _ = validate(out)
    assert not rep.errors, [str(p) for p in rep.errors]
    return read_manifest(out), problems, str(src)


def test_chestxray14_bbox_list(tmp_path):
    imgs = _blank(tmp_path / "images", ["00013118_008.png", "00014716_007.png"], (1024, 1024))
    recs, problems, _ = _convert(tmp_path, "chestxray14", CXR14, imgs)
    assert problems == []
    a, b = recs
    assert a["image"].endswith("00013118_008.png") and (a["width"], a["height"]) == (1024, 1024)
    assert a["labels"] == ["Atelectasis", "Effusion"] and a["patient_id"] == "00013118"
    x, y, w, h = 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661
    assert a["regions"][0]["bbox"] == pytest.approx([x, y, x + w, y + h])
    assert [r["label"] for r in a["regions"]] == ["Atelectasis", "Effusion"]
    assert a["text"] == "medical image showing Atelectasis and Effusion."
    assert b["patient_id"] == "00014716" and len(b["regions"]) == 1


def test_vindr_several_radiologists(tmp_path):
    imgs = _blank(tmp_path / "images", ["50a418190bc3fb1ef1633bf9678929b3.png",
                                         "9a5094b2563a1ef3ff50dc5c7ff71345.png"], (2000, 2000))
    (normal, sick), problems, _ = _convert(tmp_path, "vindr", VINDR, imgs)
    assert problems == []
    assert normal["regions"] == [] and normal["labels"] == ["No finding"]
    assert normal["text"] == "medical image with no annotated finding."
    assert [(r["label"], r["rad_id"]) for r in sick["regions"]] == [
        ("Cardiomegaly", "R10"), ("Aortic enlargement", "R10"), ("Cardiomegaly", "R8")]
    assert sick["regions"][0]["bbox"] == [691.0, 1375.0, 1653.0, 1831.0]
    assert sick["labels"] == ["Cardiomegaly", "Aortic enlargement"]


def test_rsna_ids_without_extension(tmp_path):
    imgs = _blank(tmp_path / "images", ["0004cfab-14fd-4e49-80ba-63a80b6bddd6.jpg",
                                         "00436515-870c-4b36-a041-de91049b9ab4.jpg"], (1024, 1024))
    (normal, sick), problems, _ = _convert(tmp_path, "rsna", RSNA, imgs)
    assert problems == []
    assert normal["image"].endswith("0004cfab-14fd-4e49-80ba-63a80b6bddd6.jpg")
    assert normal["regions"] == [] and normal["labels"] == []
    assert [r["bbox"] for r in sick["regions"]] == [[264.0, 152.0, 477.0, 531.0],
                                                   [562.0, 152.0, 818.0, 605.0]]
    assert sick["labels"] == ["lung opacity"]
    assert sick["patient_id"] == "00436515-870c-4b36-a041-de91049b9ab4"
    # the split groups by patient (one film per patient in RSNA: its own group)
    assert record_split(sick) == record_split({"patient_id": sick["patient_id"], "image": "x"})


def test_preset_checks_the_header_and_plain_csv_suggests_it(tmp_path):
    imgs = _blank(tmp_path / "images", ["00013118_008.png"], (1024, 1024))
    src = tmp_path / "v.csv"
    src.write_text(VINDR)
    with pytest.raises(ValueError, match=r"v.csv:1: --from chestxray14 expects a header starting "
                                         r"Image Index,Finding Label,Bbox \[x, got image_id,.*"
                                         r"it looks like the vindr format: use --from vindr"):
        convert("chestxray14", str(src), images=imgs, out=str(tmp_path / "o"))
    src.write_text(CXR14)
    with pytest.raises(ValueError, match=r"use --from chestxray14"):
        convert("csv", str(src), images=imgs, out=str(tmp_path / "o"))


def test_columns_mapping_and_cli(tmp_path, capsys):
    imgs = _blank(tmp_path / "images", ["p1.png", "p2.png"], (100, 80))
    src = tmp_path / "own.csv"
    src.write_text("file,left,top,width,height,finding,reader,pid\n"
                   "p1,10,10,20,20,nodule,A,P9\n"
                   "p2,5,5,x,10,mass,B,P9\n")
    out = str(tmp_path / "o")
    assert cli(["convert", "--from", "csv", str(src), "--images", imgs, "--out", out,
                "--columns", "image=file,x=#1,y=top,w=width,h=height,label=finding,"
                             "patient_id=pid,reader=reader"]) == 0
    printed = capsys.readouterr().out
    assert f"{src}:3: non-numeric box" in printed
    p1, p2 = read_manifest(out)
    assert p1["regions"] == [{"bbox": [10.0, 10.0, 30.0, 30.0], "text": "nodule",
                              "label": "nodule", "reader": "A"}]
    assert p1["patient_id"] == p2["patient_id"] == "P9" and p2["regions"] == []
    assert cli(["convert", "--from", "csv", str(src), "--images", imgs, "--out", out,
                "--columns", "image=name"]) == 2
    assert "own.csv:1: no image column 'name'" in capsys.readouterr().out
