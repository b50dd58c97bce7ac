"""WebDataset shards (data/shards.py): written with webdataset's TarWriter and read by any
WebDataset reader, a shard read equals the folder read, brace patterns / pipe: sources,
worker and rank splitting, the split rule from the index, exact resume, bad samples."""
from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch
from data_helpers import good_dataset, record, write_dataset, write_image

from regionmed_fast.data.loader import make_loader
from regionmed_fast.data.manifest import DataError, ManifestError
from regionmed_fast.data.shards import write_shards

wds = pytest.importorskip("webdataset")


def _same(a, b):
    assert a["texts"] == b["texts"] and a["region_texts"] == b["region_texts"]
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["boxes"], b["boxes"])
    assert [m["crop"] for m in a["meta"]] == [m["crop"] for m in b["meta"]]


@pytest.fixture()
def sharded(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=12)
    index = write_shards(root, str(tmp_path / "sh"), max_bytes=3000)
    assert len(index["shards"]) >= 4 and index["total"] == 12
    return root, str(tmp_path / "sh"), index


def test_written_shards_are_plain_webdataset(sharded):
    _, sh, index = sharded
    first = os.path.join(sh, index["shards"][0]["file"])
    names = tarfile.open(first).getnames()
    assert names[:2] == ["000000000.jpg", "000000000.json"]
    samples = list(wds.WebDataset(first, shardshuffle=False))
    assert len(samples) == index["shards"][0]["count"]
    rec = json.loads(samples[0]["json"])
    assert rec["text"] == "image number 0" and rec["_line"] == 1 and samples[0]["jpg"][:2] == b"\xff\xd8"


def test_shard_read_equals_folder_read(sharded):
    root, sh, index = sharded
    for train in (False, True):
        kw = dict(image_size=32, batch_size=3, train=train, num_workers=0, seed=4, shuffle=False)
        a = list(make_loader(root, **kw))
        b = list(make_loader(sh, **kw))
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            _same(x, y)
    # the same shards named by a brace pattern, and streamed through a pipe: command
    n = len(index["shards"])
    pattern = os.path.join(sh, "shard-{000000..%06d}.tar" % (n - 1))
    kw = dict(image_size=32, batch_size=3, train=False, num_workers=0)
    ref = list(make_loader(sh, **kw))
    for src, extra in ((pattern, {}),
                       ("::".join(f"pipe:cat {os.path.join(sh, s['file'])}" for s in index["shards"]),
                        {"index": os.path.join(sh, "shards.json")})):
        got = list(make_loader(src, **kw, **extra))
        assert len(got) == len(ref)
        for x, y in zip(ref, got):
            _same(x, y)


def test_pipe_source_without_index_needs_epoch_samples(sharded):
    _, sh, index = sharded
    src = f"pipe:cat {os.path.join(sh, index['shards'][0]['file'])}"
    with pytest.raises(DataError, match="epoch_samples"):
        make_loader(src, image_size=16, batch_size=2, train=True)
    dl = make_loader(src, image_size=16, batch_size=2, train=True, num_workers=0, epoch_samples=5)
    assert dl.batches_per_epoch == 2
    assert [len(b["texts"]) for _, b in dl.iterate(0, 5)] == [2] * 5  # streams wrap


def test_workers_and_ranks_split_the_shards(sharded):
    _, sh, _ = sharded
    seen = []
    for rank in range(2):
        dl = make_loader(sh, image_size=16, batch_size=3, train=True, rank=rank, world=2,
                         num_workers=2)
        assert dl.batches_per_epoch == 2  # 12 // (3 * 2): every rank the same steps
        got = [t for _, b in dl.iterate(0, 2) for t in b["texts"]]
        assert len(got) == 6
        seen += got
    assert len(set(seen)) == 12  # one epoch of all ranks and workers: every sample once
    one = make_loader(sh, image_size=16, batch_size=4, train=False, num_workers=2)
    got = sorted(t for b in one for t in b["texts"])
    assert got == sorted(f"image number {i}" for i in range(12))


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_resume_is_exact(sharded, workers):
    _, sh, _ = sharded
    kw = dict(image_size=24, batch_size=2, train=True, num_workers=workers, seed=5, stage=1,
              shuffle_buffer=4)
    run = list(make_loader(sh, **kw).iterate(0, 14))  # 6 per epoch: crosses two epochs
    assert [j for j, _ in run] == list(range(14))
    assert run[0][1]["texts"] != run[6][1]["texts"]  # epochs reshuffle
    for start in (1, 5, 7, 13):
        again = list(make_loader(sh, **kw).iterate(start, 14))
        assert [j for j, _ in again] == list(range(start, 14))
        for (_, a), (_, b) in zip(run[start:], again):
            _same(a, b)


def test_split_counts_come_from_the_index(tmp_path):
    root = str(tmp_path / "ds")
    good_dataset(root, n=20)
    recs = [json.loads(x) for x in open(os.path.join(root, "annotations.jsonl"))]
    for i, r in enumerate(recs):
        r["split"] = "test" if i % 4 == 0 else "train"
    write_dataset(root, recs)
    write_shards(root, str(tmp_path / "sh"), max_bytes=3000)
    tr = make_loader(str(tmp_path / "sh"), image_size=16, batch_size=3, train=True, split="train",
                     num_workers=0)
    assert tr.batches_per_epoch == 15 // 3
    texts = [t for b in tr for t in b["texts"]]
    assert len(texts) == 15 and not {f"image number {i}" for i in range(0, 20, 4)} & set(texts)
    te = make_loader(str(tmp_path / "sh"), image_size=16, batch_size=5, train=False, split="test",
                     num_workers=0)
    assert sorted(t for b in te for t in b["texts"]) == sorted(f"image number {i}" for i in range(0, 20, 4))


def test_bad_sample_in_shards(tmp_path):
    root = good_dataset(str(tmp_path / "ds"), n=4)
    p = os.path.join(root, "images", "img1.jpg")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])  # header intact: only decoding finds it
    write_shards(root, str(tmp_path / "sh"))
    kw = dict(image_size=16, batch_size=4, train=False, num_workers=0)
    with pytest.raises(ManifestError, match=r"annotations.jsonl:2: error: unreadable_image"):
        list(make_loader(str(tmp_path / "sh"), **kw))
    dl = make_loader(str(tmp_path / "sh"), skip_bad=True, **kw)
    assert [len(b["texts"]) for b in dl] == [3] and dl.bad_counts == {0: 1}


def test_missing_shard_is_one_line(tmp_path):
    with pytest.raises(DataError, match="shard not found"):
        make_loader(str(tmp_path / "x-{0..3}.tar"), image_size=8, batch_size=1, train=False)


def test_http_url_source_equals_local(sharded):
    """Shards streamed from an http:// URL (webdataset's gopen, through curl) with the index
    given: the same batches as the local shards."""
    import functools
    import shutil
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("curl") is None:
        pytest.skip("curl not installed (webdataset opens http:// URLs with it)")
    _, sh, index = sharded
    handler = functools.partial(SimpleHTTPRequestHandler, directory=sh)
    handler.log_message = lambda *a, **k: None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        n = len(index["shards"])
        url = f"http://127.0.0.1:{srv.server_port}/shard-{{000000..{n - 1:06d}}}.tar"
        kw = dict(image_size=32, batch_size=3, train=True, num_workers=0, seed=1)
        ref = list(make_loader(sh, **kw))
        got = list(make_loader(url, index=os.path.join(sh, "shards.json"), **kw))
        assert len(got) == len(ref) == 4
        for x, y in zip(ref, got):
            _same(x, y)
    finally:
        srv.shutdown()
