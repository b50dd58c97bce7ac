"""The synthetic phantom dataset: determinism, manifest validity, size spread, the CLI."""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from regionmed_fast.data import synthetic


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("synth")
    synthetic.write_dataset(root, n=120, size=96, seed=3)
    return root


def _records(root: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines()]


def test_same_seed_gives_identical_files(dataset, tmp_path):
    synthetic.write_dataset(tmp_path, n=120, size=96, seed=3)
    assert _digest(tmp_path) == _digest(dataset)


def test_other_seed_differs_and_prefix_is_stable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthetic.write_dataset(a, n=6, size=64, seed=0)
    synthetic.write_dataset(b, n=6, size=64, seed=1)
    assert _digest(a) != _digest(b)
    # image i depends on (seed, i) only, not on n
    img4, rec4 = synthetic.make_example(4, size=64, seed=0)
    assert np.array_equal(np.asarray(Image.open(a / "images" / "000004.png")), img4)
    assert _records(a)[4]["text"] == rec4["text"]


def test_manifest_fields_and_boxes(dataset):
    recs = _records(dataset)
    assert len(recs) == 120
    for line, r in enumerate(recs, 1):
        where = f"annotations.jsonl:{line}"
        for key in ("image", "width", "height", "text", "regions", "labels", "source",
                    "modality", "split"):
            assert key in r, f"{where} lacks {key}"
        assert r["modality"] in synthetic.MODALITIES, where
        assert r["split"] in ("train", "test"), where
        assert r["text"].strip(), where
        img = Image.open(dataset / r["image"])
        assert img.size == (r["width"], r["height"]) == (96, 96), where
        assert img.mode == "RGB", where
        kinds = set(synthetic.KINDS[r["modality"]])
        for reg in r["regions"]:
            x1, y1, x2, y2 = reg["bbox"]
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"], where
            assert reg["text"].strip() and reg["label"] == reg["kind"] in kinds, where
            assert reg["size_px"] > 0 and reg["size_mm"] > 0 and reg["location"], where
            assert reg["size_class"] == synthetic.size_class(reg["size_px"], 96), where
            # the image text is built from what was drawn
            assert reg["text"] in r["text"], where
        want = sorted({reg["kind"] for reg in r["regions"]}) or [synthetic.NORMAL]
        assert r["labels"] == want, where
    assert {r["modality"] for r in recs} == set(synthetic.MODALITIES)
    splits = [r["split"] for r in recs]
    assert 0.05 < splits.count("test") / len(splits) < 0.4


def test_sizes_span_small_to_large_and_kinds_are_varied(dataset):
    regs = [reg for r in _records(dataset) for reg in r["regions"]]
    sizes = np.array([reg["size_px"] for reg in regs])
    assert sizes.min() <= 4.0 and sizes.max() >= 20.0  # a few pixels to a fifth of the image
    assert {reg["size_class"] for reg in regs} == {"small", "medium", "large"}
    kinds = {reg["kind"] for reg in regs}
    assert kinds == set(synthetic.KINDS["chest_xray"]) | set(synthetic.KINDS["dermoscopy"])
    sides = {reg["location"].split()[0] for reg in regs if reg["kind"] in ("nodule", "mass")}
    assert sides == {"left", "right"}
    # texts separate images: most images have a text no other image has
    texts = [r["text"] for r in _records(dataset) if r["regions"]]
    assert len(set(texts)) > 0.9 * len(texts)


def test_lesion_is_drawn_where_its_box_is():
    # a small finding changes the pixels inside its box: it is really in the image
    for i in range(40):
        img, rec = synthetic.make_example(i, size=128, seed=11)
        for reg in rec["regions"]:
            if reg["size_class"] != "small":
                continue
            x1, y1, x2, y2 = (int(round(v)) for v in reg["bbox"])
            inside = img[y1:y2, x1:x2].astype(np.float32).mean()
            ring = img[max(y1 - 4, 0):y2 + 4, max(x1 - 4, 0):x2 + 4].astype(np.float32)
            assert abs(inside - ring.mean()) > 3.0, (i, reg)
            return
    pytest.fail("no small finding in 40 phantoms")


def test_qa_and_prompts(dataset):
    qa = [json.loads(line) for line in (dataset / "qa.jsonl").read_text().splitlines()]
    images = {r["image"] for r in _records(dataset)}
    assert qa and all(q["image"] in images and q["question"] and q["answer"] for q in qa)
    for m in synthetic.MODALITIES:
        for k in (*synthetic.KINDS[m], synthetic.NORMAL):
            assert synthetic.class_prompt(k, m)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="n must"):
        synthetic.write_dataset(tmp_path, n=0)
    with pytest.raises(ValueError, match="size"):
        synthetic.make_example(0, size=8)
    with pytest.raises(ValueError, match="modality"):
        synthetic.make_example(0, modality="mri")


def test_cli_writes_dataset(tmp_path, capsys):
    from regionmed_fast.cli import main
    assert main(["synth", "--out", str(tmp_path / "d"), "--n", "5", "--size", "64",
                 "--seed", "2"]) == 0
    assert len(_records(tmp_path / "d")) == 5
    assert "wrote 5 images" in capsys.readouterr().out
