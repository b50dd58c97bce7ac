"""make_loader: batch format, tokenizer hook, skip-and-count at decode, shard round trip,
rank splitting, and the two real datasets (shared_data fixture)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from data_helpers import good_dataset, record, write_dataset

from regionmed_fast.data.loader import EpochSampler, make_loader
from regionmed_fast.data.manifest import ManifestError
from regionmed_fast.data.shards import ShardDataset, read_index, write_shards


def _fake_tok(texts):
    ids = torch.tensor([[len(t), len(t.split())] for t in texts], dtype=torch.int64).reshape(-1, 2)
    return ids, torch.ones_like(ids)


def _check_batch(b, size):
    B = len(b["texts"])
    assert b["images"].shape == (B, 3, size, size) and b["images"].dtype == torch.float32
    assert b["images"].is_contiguous()
    assert b["boxes"].dtype == torch.float32 and b["boxes"].shape[0] == B and b["boxes"].shape[2] == 4
    assert b["box_counts"].dtype == torch.int64 and b["box_counts"].shape == (B,)
    for i in range(B):
        k = int(b["box_counts"][i])
        assert len(b["region_texts"][i]) == k == len(b["region_labels"][i])
        assert (b["boxes"][i, k:] == 0).all()
        bx = b["boxes"][i, :k]
        assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 3] > bx[:, 1]).all()
        assert bx.min() >= 0 and bx.max() <= size
    assert len(b["labels"]) == len(b["meta"]) == B


def test_batch_format_and_tokenizer(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=6)
    dl = make_loader(root, image_size=32, batch_size=4, train=False, tokenizer=_fake_tok,
                     num_workers=0)
    assert len(dl) == 2
    batches = list(dl)
    assert [len(b["texts"]) for b in batches] == [4, 2]
    b = batches[0]
    _check_batch(b, 32)
    assert b["texts"][1] == "image number 1" and b["meta"][1]["idx"] == 1
    assert b["box_counts"].tolist() == [1, 2, 1, 2]
    assert b["text_ids"].shape == (4, 2) and b["text_ids"][1, 0] == len("image number 1")
    n = int(b["box_counts"].sum())
    assert b["region_text_ids"].shape == (n, 2) and b["region_text_mask"].shape == (n, 2)
    flat = [t for rs in b["region_texts"] for t in rs]
    assert b["region_text_ids"][:, 0].tolist() == [len(t) for t in flat]


def test_train_epochs_differ_and_are_reproducible(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=8)
    kw = dict(image_size=32, batch_size=4, train=True, num_workers=0, seed=1)
    a = make_loader(root, **kw)
    e0 = [m["crop"] for b in a for m in b["meta"]]
    e1 = [m["crop"] for b in a for m in b["meta"]]
    assert e0 != e1 and len(e0) == 8
    b = make_loader(root, **kw)
    b.set_epoch(1)
    assert [m["crop"] for x in b for m in x["meta"]] == e1


def test_flip_off_and_scale(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=8)
    dl = make_loader(root, image_size=32, batch_size=8, train=True, num_workers=0, flip_p=0.0,
                     scale=(0.9, 1.0))
    crops = [m["crop"] for _ in range(3) for b in dl for m in b["meta"]]
    assert not any(c[4] for c in crops)
    assert all(c[2] * c[3] >= 0.85 * 64 * 48 for c in crops)
    with pytest.raises(ValueError, match="flip_p"):
        make_loader(root, image_size=32, batch_size=8, train=True, flip_p=2.0)


def test_split_filter(tmp_path):
    root = str(tmp_path / "ds")
    good_dataset(root, n=4)
    recs = [json.loads(x) for x in open(os.path.join(root, "annotations.jsonl"))]
    recs[1]["split"] = recs[3]["split"] = "test"
    write_dataset(root, recs)
    kw = dict(image_size=16, batch_size=4, train=False, num_workers=0)
    assert [t for b in make_loader(root, split="test", **kw) for t in b["texts"]] == ["image number 1", "image number 3"]
    assert len(list(make_loader(root, split="train", **kw))[0]["texts"]) == 2
    with pytest.raises(ValueError, match="split='val'"):
        make_loader(root, split="val", **kw)


def test_workers_give_the_same_batches(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=8)
    kw = dict(image_size=32, batch_size=4, train=True, seed=2)
    a = list(make_loader(root, num_workers=0, **kw))
    b = list(make_loader(root, num_workers=2, **kw))
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["boxes"], y["boxes"])


def test_bad_image_body_error_and_skip(tmp_path, caplog):
    root = good_dataset(str(tmp_path / "ds"), n=4)
    p = os.path.join(root, "images", "img2.jpg")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])  # header intact, body cut: passes the header check
    with pytest.raises(ManifestError, match=r"annotations.jsonl:3: error: unreadable_image"):
        list(make_loader(root, image_size=32, batch_size=2, train=False, num_workers=0))
    dl = make_loader(root, image_size=32, batch_size=2, train=False, num_workers=0, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="regionmed_fast.data"):
        got = [t for b in dl for t in b["texts"]]
    assert got == ["image number 0", "image number 1", "image number 3"]
    assert dl.skipped == 1 and dl.manifest_skipped == 0  # found at decode time
    assert any("skipped 1 bad record" in r.getMessage() for r in caplog.records)


def test_skip_bad_manifest_records_counted(tmp_path):
    root = str(tmp_path / "ds")
    good_dataset(root, n=3)
    recs = [json.loads(x) for x in open(os.path.join(root, "annotations.jsonl"))]
    write_dataset(root, [recs[0], "{oops", recs[1], record("gone.jpg", 64, 48), recs[2]])
    with pytest.raises(ManifestError, match=r":2: error: bad_json"):
        make_loader(root, image_size=32, batch_size=2, train=False)
    dl = make_loader(root, image_size=32, batch_size=8, train=False, skip_bad=True, num_workers=0)
    assert [len(b["texts"]) for b in dl] == [3] and dl.skipped == 2


def test_shard_round_trip_equals_folder(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=7)
    index = write_shards(root, str(tmp_path / "sh"), max_bytes=3000)
    assert len(index["shards"]) >= 3 and index["total"] == 7
    for train in (False, True):
        kw = dict(image_size=32, batch_size=3, train=train, num_workers=0, seed=4, shuffle=False)
        a = list(make_loader(root, **kw))
        b = list(make_loader(str(tmp_path / "sh"), **kw))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x["images"], y["images"]) and torch.equal(x["boxes"], y["boxes"])
            assert x["texts"] == y["texts"] and x["region_texts"] == y["region_texts"]
            assert x["meta"] == y["meta"]
    # two workers split the shards; together they still yield every sample once
    got = sorted(t for bt in make_loader(str(tmp_path / "sh"), image_size=32, batch_size=2,
                                         train=True, num_workers=2, drop_last=False)
                 for t in bt["texts"])
    assert got == sorted(f"image number {i}" for i in range(7))


def test_shards_split_by_rank(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=10)
    files, counts = read_index(write_shards(root, str(tmp_path / "sh"), max_bytes=3000) and str(tmp_path / "sh"))
    seen = []
    for rank in range(3):
        ds = ShardDataset(files, counts, image_size=16, train=False, seed=0, skip_bad=False,
                          shuffle=False, rank=rank, world=3)
        got = [s["text"] for s in ds]
        assert len(got) == 10 // 3  # equal steps per rank
        seen += got
    assert len(set(seen)) == len(seen)


def test_shards_skip_bad_image_body(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=4)
    p = os.path.join(root, "images", "img1.jpg")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])  # header intact: only decoding finds it
    write_shards(root, str(tmp_path / "sh"))
    kw = dict(image_size=16, batch_size=4, train=False, num_workers=0)
    with pytest.raises(ManifestError, match=r"annotations.jsonl:2: error: unreadable_image"):
        list(make_loader(str(tmp_path / "sh"), **kw))
    dl = make_loader(str(tmp_path / "sh"), skip_bad=True, **kw)
    assert [len(b["texts"]) for b in dl] == [3] and dl.skipped == 1


def test_distributed_true_needs_a_process_group(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=2)
    with pytest.raises(RuntimeError, match="not initialised"):
        make_loader(root, image_size=8, batch_size=2, train=False, distributed=True)


def test_epoch_sampler_ranks_partition():
    parts = [list(EpochSampler(10, shuffle=True, seed=0, rank=r, world=3)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set(i for p in parts for i, _ in p) == set(range(10))


def test_bad_arguments(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=2)
    with pytest.raises(ValueError, match="image_size"):
        make_loader(root, image_size=0, batch_size=2, train=False)
    with pytest.raises(ValueError, match="backend"):
        make_loader(root, image_size=8, batch_size=2, train=False, backend="gpu")
    with pytest.raises(FileNotFoundError, match="no manifest"):
        make_loader(str(tmp_path), image_size=8, batch_size=2, train=False)


@pytest.mark.parametrize("name", ["covid_chestxray", "ph2_dermoscopy"])
def test_real_dataset_loads(shared_data, name):
    root = shared_data / name
    if not (root / "annotations.jsonl").is_file():
        pytest.skip(f"{root} has no annotations.jsonl")
    from regionmed_fast.data.text import HFTokenizer

    tok = HFTokenizer(max_length=32)
    dl = make_loader(str(root), image_size=224, batch_size=32, train=True, num_workers=2,
                     tokenizer=tok)
    n = 0
    for b in dl:
        _check_batch(b, 224)
        assert b["text_ids"].shape == (len(b["texts"]), 32)
        assert b["region_text_ids"].shape[0] == int(b["box_counts"].sum())
        n += len(b["texts"])
    assert n == len(dl) * 32 and dl.skipped == 0
    from regionmed_fast.data.validate import validate

    rep, _ = validate(str(root))
    assert not rep.errors, [str(p) for p in rep.errors[:3]]
    ev = make_loader(str(root), image_size=64, batch_size=64, train=False, num_workers=0)
    assert sum(int(b["box_counts"].sum()) for b in ev) == {"covid_chestxray": 360, "ph2_dermoscopy": 165}[name]
