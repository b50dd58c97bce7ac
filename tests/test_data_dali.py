"""The DALI backend on DALI's CPU pipeline (device_id=None; the GPU case is in
test_data_transforms.py under -m gpu): a batch without boxes, bad image bodies raised as
file:line or skipped and counted, resume at any j, and one clear line when DALI or webdataset
is missing."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from data_helpers import good_dataset, write_dataset
from test_data_loader import _fake_tok as fake_tok, _same as same_batch

from regionmed_fast.data.loader import make_loader
from regionmed_fast.data.manifest import ManifestError
from regionmed_fast.errors import MissingDependency

DALI = dict(backend="dali", device="cpu", num_workers=1)


def _needs_dali():
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")


def test_dali_batch_without_boxes(tmp_path):
    _needs_dali()
    root = str(tmp_path / "ds")
    good_dataset(root, n=4)
    recs = [dict(json.loads(x), regions=[]) for x in open(os.path.join(root, "annotations.jsonl"))]
    write_dataset(root, recs)
    (b,) = list(make_loader(root, image_size=16, batch_size=4, train=True, tokenizer=fake_tok, **DALI))
    assert b["images"].shape == (4, 3, 16, 16) and b["images"].dtype == torch.float32
    assert b["boxes"].shape == (4, 0, 4) and b["box_counts"].tolist() == [0] * 4
    assert b["region_texts"] == [[]] * 4 and b["region_text_ids"].shape == (0, 2)


def test_dali_bad_body_raised_or_skipped(tmp_path):
    _needs_dali()
    root = good_dataset(str(tmp_path / "ds"), n=5)
    p = os.path.join(root, "images", "img2.jpg")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])  # header intact: only decoding finds it
    kw = dict(image_size=16, batch_size=3, train=False, **DALI)
    with pytest.raises(ManifestError, match=r"annotations.jsonl:3: error: unreadable_image: .*img2.jpg"):
        list(make_loader(root, **kw))
    dl = make_loader(root, skip_bad=True, **kw)
    got = [t for b in dl for t in b["texts"]]
    assert got == [f"image number {i}" for i in (0, 1, 3, 4)] and dl.bad_counts == {0: 1}
    for b in make_loader(root, skip_bad=True, **kw):
        assert b["images"].shape[0] == len(b["texts"]) == len(b["indices"])


def test_dali_resume_equals_uninterrupted(tmp_path):
    _needs_dali()
    root = good_dataset(str(tmp_path / "ds"), n=7)
    kw = dict(image_size=16, batch_size=2, train=True, seed=2, **DALI)
    full = list(make_loader(root, **kw).iterate(0, 7))
    for (_, x), (_, y) in zip(full[4:], make_loader(root, **kw).iterate(4, 7)):
        same_batch(x, y)


@pytest.mark.parametrize("module,source_kind", [("nvidia.dali", "dali"), ("webdataset", "shards")])
def test_missing_optional_dependency_is_one_line(tmp_path, monkeypatch, module, source_kind):
    root = good_dataset(str(tmp_path / "ds"), n=2)
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    if source_kind == "dali":
        call = lambda: make_loader(root, image_size=8, batch_size=2, train=False, backend="dali")
        extra = "dali"
    else:
        call = lambda: make_loader(os.path.join(root, "x-{0..1}.tar"), image_size=8, batch_size=2,
                                   train=False)
        extra = "data"
    with pytest.raises(MissingDependency) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and f"pip install 'regionmed-fast[{extra}]'" in msg
