"""make_loader on dataset folders, the contract the trainer relies on (docs/data.md, "Loader
contract"): batch format, per-rank batches of a global order that is a pure function of
(seed, stage, epoch), exact restart at any micro-batch, workers == no workers, the split rule,
bad records (one-line error from a worker, or skipped and counted per epoch), the byte-bounded
cache, batches without boxes, and the two real datasets (shared_data fixture)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from data_helpers import good_dataset, record, write_dataset, write_image

from regionmed_fast.data.loader import make_loader
from regionmed_fast.data.manifest import DataError, ManifestError, read_manifest
from regionmed_fast.data.order import epoch_order
from regionmed_fast.data.split import select_split


def _fake_tok(texts):
    ids = torch.tensor([[len(t), len(t.split())] for t in texts], dtype=torch.int64).reshape(-1, 2)
    return ids, torch.ones_like(ids)


def check_batch(b, size):
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
        assert ((bx >= 0) & (bx <= size)).all()
    assert len(b["labels"]) == len(b["meta"]) == len(b["indices"]) == B


def _same(a, b):
    assert a["indices"] == b["indices"] and a["texts"] == b["texts"]
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["boxes"], b["boxes"])
    assert [m["crop"] for m in a["meta"]] == [m["crop"] for m in b["meta"]]


def test_batch_format_and_tokenizer(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=6)
    dl = make_loader(root, image_size=32, batch_size=4, train=False, tokenizer=_fake_tok,
                     num_workers=0)
    assert len(dl) == dl.batches_per_epoch == 2 and dl.backend == "cpu"
    batches = list(dl)
    assert [len(b["texts"]) for b in batches] == [4, 2]  # eval keeps the partial batch, in order
    b = batches[0]
    check_batch(b, 32)
    assert b["indices"] == [0, 1, 2, 3]
    assert b["texts"][1] == "image number 1" and b["meta"][1]["idx"] == 1
    assert b["box_counts"].tolist() == [1, 2, 1, 2]
    assert b["text_ids"].shape == (4, 2) and b["text_ids"][1, 0] == len("image number 1")
    n = int(b["box_counts"].sum())
    assert b["region_text_ids"].shape == (n, 2) and b["region_text_mask"].shape == (n, 2)
    flat = [t for rs in b["region_texts"] for t in rs]
    assert b["region_text_ids"][:, 0].tolist() == [len(t) for t in flat]


def test_order_is_the_epoch_order_and_ranks_take_every_world_th(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=13)
    kw = dict(image_size=16, train=True, num_workers=0, seed=7, stage=2)
    one = make_loader(root, batch_size=4, **kw)
    assert one.batches_per_epoch == 3  # 13 // 4, the partial batch dropped
    got = [b["indices"] for _, b in one.iterate(0, 6)]
    for j in range(6):
        e, b = divmod(j, 3)
        assert got[j] == epoch_order(13, 7, 2, e)[b * 4:(b + 1) * 4].tolist()
    ranks = [make_loader(root, batch_size=2, rank=r, world=2, **kw) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3
    for j, (_, full) in enumerate(one.iterate(0, 6)):
        parts = [next(iter(r.iterate(j, j + 1)))[1] for r in ranks]
        assert parts[0]["indices"] == full["indices"][0::2]
        assert parts[1]["indices"] == full["indices"][1::2]
        for r, part in enumerate(parts):  # the same pixels as the one-process batch
            assert torch.equal(part["images"], full["images"][r::2])
            assert torch.equal(part["boxes"], full["boxes"][r::2, :part["boxes"].shape[1]])


@pytest.mark.parametrize("workers", [0, 2])
def test_restart_anywhere_equals_uninterrupted(tmp_path, workers):
    root = good_dataset(str(tmp_path / "ds"), n=9)
    kw = dict(image_size=24, batch_size=2, train=True, num_workers=workers, seed=3, stage=1)
    run = list(make_loader(root, **kw).iterate(0, 11))  # 4 per epoch: crosses two boundaries
    assert [j for j, _ in run] == list(range(11))
    for start in (3, 4, 9):
        again = list(make_loader(root, **kw).iterate(start, 11))
        assert [j for j, _ in again] == list(range(start, 11))
        for (_, a), (_, b) in zip(run[start:], again):
            _same(a, b)
    # epochs differ (order and crops), stages differ
    assert run[0][1]["indices"] != run[4][1]["indices"] or \
        [m["crop"] for m in run[0][1]["meta"]] != [m["crop"] for m in run[4][1]["meta"]]
    other = next(iter(make_loader(root, **dict(kw, stage=0)).iterate(0, 1)))[1]
    assert [m["crop"] for m in other["meta"]] != [m["crop"] for m in run[0][1]["meta"]]


def test_workers_give_the_same_batches_and_epochs_advance(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=8)
    kw = dict(image_size=32, batch_size=4, train=True, seed=2)
    a, b = make_loader(root, num_workers=0, **kw), make_loader(root, num_workers=2, **kw)
    for _ in range(2):  # two epochs through persistent workers
        for x, y in zip(a, b):
            _same(x, y)
    assert a.epoch == b.epoch == 2
    b.set_epoch(0)
    _same(next(iter(b)), next(iter(make_loader(root, num_workers=0, **kw))))


def test_training_crops_and_flips_by_default(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=8)
    dl = make_loader(root, image_size=32, batch_size=8, train=True, num_workers=0)
    crops = [m["crop"] for _ in range(3) for b in dl for m in b["meta"]]
    assert {c[4] for c in crops} == {True, False}
    assert any((c[2], c[3]) != (64, 48) for c in crops)
    off = make_loader(root, image_size=32, batch_size=8, train=True, num_workers=0, flip_p=0.0,
                      scale=(0.9, 1.0))
    crops = [m["crop"] for _ in range(3) for b in off for m in b["meta"]]
    assert not any(c[4] for c in crops) and all(c[2] * c[3] >= 0.85 * 64 * 48 for c in crops)
    with pytest.raises(ValueError, match="flip_p"):
        make_loader(root, image_size=32, batch_size=8, train=True, flip_p=2.0)


def test_split_rule_is_evals(tmp_path):
    root = str(tmp_path / "ds")
    good_dataset(root, n=40)
    recs = [json.loads(x) for x in open(os.path.join(root, "annotations.jsonl"))]
    for i, r in enumerate(recs):
        r["patient_id"] = f"p{i // 4}"
    recs[0]["split"] = "test"  # its own field wins over its group
    write_dataset(root, recs)
    kw = dict(image_size=16, batch_size=1, train=False, num_workers=0)
    every = read_manifest(root)
    for split in ("train", "test"):
        for gk, tf in ((None, 0.3), ("idx", 0.5)):
            want = [r["text"] for r in select_split(every, split, group_key=gk, test_fraction=tf)]
            got = [t for b in make_loader(root, split=split, group_key=gk, test_fraction=tf, **kw)
                   for t in b["texts"]]
            assert got == want and got
    test = [t for b in make_loader(root, split="test", **kw) for t in b["texts"]]
    assert "image number 0" in test
    pats = {r["text"]: r["patient_id"] for r in recs}
    train = [t for b in make_loader(root, split="train", **kw) for t in b["texts"]]
    assert not {pats[t] for t in train} & ({pats[t] for t in test} - {"p0"})
    assert len(list(make_loader(root, split=None, **kw))) == 40
    with pytest.raises(DataError, match="split 'val'"):
        make_loader(root, split="val", **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_body_one_line_error_or_skipped_and_counted(tmp_path, caplog, workers):
    root = good_dataset(str(tmp_path / "ds"), n=4)
    p = os.path.join(root, "images", "img2.jpg")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])  # header intact, body cut: found at decode
    kw = dict(image_size=32, batch_size=2, train=False, num_workers=workers)
    with pytest.raises(ManifestError) as err:
        list(make_loader(root, **kw))
    msg = str(err.value)
    assert "\n" not in msg and "annotations.jsonl:3: error: unreadable_image" in msg
    assert isinstance(err.value.problem.line, int) and err.value.problem.line == 3
    dl = make_loader(root, skip_bad=True, **kw)
    with caplog.at_level(logging.WARNING, logger="regionmed_fast.data"):
        got = [t for _ in range(2) for b in dl for t in b["texts"]]
    assert got == ["image number 0", "image number 1", "image number 3"] * 2
    assert dl.bad_counts == {0: 1, 1: 1} and dl.skipped == 2
    logged = [r.getMessage() for r in caplog.records if "skipped 1 bad record" in r.getMessage()]
    assert len(logged) == 2 and "epoch 0" in logged[0] and "epoch 1" in logged[1]


def test_skip_bad_manifest_records_counted(tmp_path):
    root = str(tmp_path / "ds")
    good_dataset(root, n=3)
    recs = [json.loads(x) for x in open(os.path.join(root, "annotations.jsonl"))]
    bad_box = record("img0.jpg", 64, 48, boxes=[(30, 30, 10, 40)])
    write_dataset(root, [recs[0], "{oops", recs[1], record("gone.jpg", 64, 48), bad_box, recs[2]])
    with pytest.raises(ManifestError, match=r":2: error: bad_json"):
        make_loader(root, image_size=32, batch_size=2, train=False)
    dl = make_loader(root, image_size=32, batch_size=8, train=False, skip_bad=True, num_workers=0)
    assert [len(b["texts"]) for b in dl] == [3] and dl.manifest_skipped == 3
    assert dl.bad_counts == {0: 3}


def test_batch_without_any_box(tmp_path):
    root = str(tmp_path / "ds")
    recs = []
    for i in range(4):
        write_image(os.path.join(root, "images", f"n{i}.png"), 40, 30, seed=i)
        recs.append(record(f"n{i}.png", 40, 30, boxes=()))
    write_dataset(root, recs)
    for train in (True, False):
        b = next(iter(make_loader(root, image_size=16, batch_size=4, train=train, num_workers=0,
                                  tokenizer=_fake_tok)))
        check_batch(b, 16)
        assert b["boxes"].shape == (4, 0, 4) and b["box_counts"].tolist() == [0] * 4
        assert b["region_text_ids"].shape == (0, 2)


def test_cache_is_bounded_and_gives_the_same_pixels(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=8)
    for train in (True, False):
        kw = dict(image_size=32, batch_size=4, train=train, num_workers=0, seed=1)
        cached = make_loader(root, cache_mb=1, **kw)
        cold = list(cached.iterate(0, 4))  # two epochs: the second is served by the cache
        cache = cached.source.dataset.maker.cache
        assert cache.hits >= 8 and len(cache) == 8 and cache.used <= cache.budget
        fresh = list(make_loader(root, cache_mb=1, **kw).iterate(2, 4))
        for (_, a), (_, b) in zip(cold[2:], fresh):  # a hit equals a miss
            _same(a, b)
    tiny = make_loader(root, cache_mb=0.01, image_size=32, batch_size=4, train=True,
                       num_workers=0)
    list(tiny.iterate(0, 4))
    cache = tiny.source.dataset.maker.cache
    assert 0 < cache.used <= cache.budget and len(cache) < 8  # evicts instead of growing
    assert make_loader(root, image_size=32, batch_size=4, train=True,
                       num_workers=0).source.dataset.maker.cache is None  # default: streaming


def test_bad_arguments(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=2)
    for kw, match in ((dict(image_size=0), "image_size"), (dict(backend="gpu"), "backend"),
                      (dict(rank=2, world=2), "rank"), (dict(cache_mb=-1), "cache_mb"),
                      (dict(batch_size=3, train=True), "fewer than one global batch"),
                      (dict(world=2, batch_size=2, train=True), "2 x 2 ranks")):
        args = dict(image_size=8, batch_size=2, train=False) | kw
        with pytest.raises(DataError, match=match):
            make_loader(root, **args)
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
        check_batch(b, 224)
        assert b["text_ids"].shape == (len(b["texts"]), 32)
        assert b["region_text_ids"].shape[0] == int(b["box_counts"].sum())
        n += len(b["texts"])
    assert n == len(dl) * 32 and dl.skipped == 0
    from regionmed_fast.data.validate import validate

    rep, _ = validate(str(root))
    assert not rep.errors, [str(p) for p in rep.errors[:3]]
    ev = make_loader(str(root), image_size=64, batch_size=64, train=False, num_workers=0)
    assert sum(int(b["box_counts"].sum()) for b in ev) == {"covid_chestxray": 360, "ph2_dermoscopy": 165}[name]
