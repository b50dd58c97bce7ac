"""WebDataset ``.tar`` shards of a dataset folder, and the loader that reads them.

Layout written by :func:`write_shards` (``regionmed-fast shard DIR --out SHARDS --size 256MB``)::

    SHARDS/shard-000000.tar   members <key>.jpg|.png (the original bytes) and <key>.json
    SHARDS/shards.json        {"format": "regionmed-fast-wds/1", "total": N,
                               "shards": [{"file": "shard-000000.tar", "count": n}, ...]}

``<key>`` is the record's 9-digit index in the source manifest; ``<key>.json`` is the manifest
record (plus ``_index``, and ``_file``/``_line`` of the source manifest so errors still name
it). Any WebDataset reader can read the tars (samples grouped by key, in order).

Reading: shards are split over (rank, worker) slots: whole shards when there are at least as
many shards as slots, otherwise every slot reads every shard and keeps the samples whose index
is its own modulo the slot count. Under torch.distributed each slot yields exactly
``total // slots`` samples per epoch (wrapping over its share when short), so ranks stay in
step. The geometry of a sample is drawn from (seed, epoch, index) as in folder loading, so an
unshuffled shard read equals the folder read.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import ManifestError, ManifestReport, read_manifest
from .sample import collate, load_sample, read_bytes

log = logging.getLogger("regionmed_fast.data")
INDEX = "shards.json"
FORMAT = "regionmed-fast-wds/1"


def parse_size(text: str | int) -> int:
    """'256MB' / '1.5GB' / '800KB' / '1000' -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise ValueError(f"size must look like 256MB, 1GB or 1000, got {text!r}")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    val = int(float(m.group(1)) * mult)
    if val <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return val


def is_shard_source(path: str) -> bool:
    return (os.path.isfile(path) and path.endswith(".tar")) or os.path.isfile(os.path.join(path, INDEX))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: str, out: str, *, max_bytes: int | str = "256MB", skip_bad: bool = False,
                 prefix: str = "shard") -> dict:
    """Write ``root``'s validated records into tar shards of at most ``max_bytes`` each (a
    single larger sample gets a shard of its own). Returns the index dict (also written to
    ``out/shards.json``). Bad records raise ManifestError unless ``skip_bad``."""
    limit = parse_size(max_bytes)
    report = ManifestReport()
    records = read_manifest(root, skip_bad=skip_bad, report=report)
    os.makedirs(out, exist_ok=True)
    shards: list[dict] = []
    tar, size, count = None, 0, 0

    def close():
        nonlocal tar
        if tar is not None:
            tar.close()
            shards[-1]["count"] = count
            tar = None

    for i, rec in enumerate(records):
        data = read_bytes(rec)
        meta = {k: v for k, v in rec.items() if k != "image_path"}
        meta["_index"] = i
        js = json.dumps(meta, ensure_ascii=False).encode()
        need = len(data) + len(js) + 3 * 512
        if tar is None or (size + need > limit and count > 0):
            close()
            name = f"{prefix}-{len(shards):06d}.tar"
            shards.append({"file": name, "count": 0})
            tar = tarfile.open(os.path.join(out, name), "w")
            size, count = 1024, 0
        ext = os.path.splitext(rec["image"])[1].lower().lstrip(".") or "jpg"
        key = f"{i:09d}"
        _add(tar, f"{key}.{ext}", data)
        _add(tar, f"{key}.json", js)
        size += need
        count += 1
    close()
    index = {"format": FORMAT, "total": len(records), "skipped": report.skipped,
             "source": os.path.abspath(root), "shards": shards}
    with open(os.path.join(out, INDEX), "w") as fh:
        json.dump(index, fh, indent=1)
    return index


def read_index(src: str) -> tuple[list[str], list[int]]:
    """Shard paths and sample counts of a shard folder (``shards.json``) or a single .tar."""
    if os.path.isfile(src):
        n = sum(1 for m in tarfile.open(src) if m.name.endswith(".json"))
        return [src], [n]
    with open(os.path.join(src, INDEX)) as fh:
        idx = json.load(fh)
    if idx.get("format") != FORMAT:
        raise ValueError(f"{os.path.join(src, INDEX)}: unknown shard format {idx.get('format')!r}")
    return [os.path.join(src, s["file"]) for s in idx["shards"]], [int(s["count"]) for s in idx["shards"]]


def iter_tar(path: str) -> Iterator[tuple[dict, bytes]]:
    """(record, image bytes) of each sample in one shard, in order."""
    group: dict[str, bytes] = {}
    key = None
    with tarfile.open(path, "r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, _, ext = m.name.partition(".")
            if key is not None and k != key:
                yield _finish(path, key, group)
                group = {}
            key = k
            group[ext] = tar.extractfile(m).read()
    if key is not None:
        yield _finish(path, key, group)


def _finish(path: str, key: str, group: dict[str, bytes]) -> tuple[dict, bytes]:
    if "json" not in group:
        raise ValueError(f"{path}: sample {key} has no .json member")
    rec = json.loads(group.pop("json"))
    if not group:
        raise ValueError(f"{path}: sample {key} has no image member")
    rec["image_path"] = f"{path}#{key}"
    return rec, next(iter(group.values()))


class ShardDataset(IterableDataset):
    """Samples of shards split over (rank, worker) slots (see the module docstring)."""

    def __init__(self, files: list[str], counts: list[int], *, image_size: int, train: bool,
                 seed: int, skip_bad: bool, shuffle: bool, rank: int, world: int,
                 decoder: str = "auto", buffer: int = 512, aug=None):
        self.files, self.counts = files, counts
        self.size, self.train, self.seed, self.skip_bad = image_size, train, seed, skip_bad
        self.shuffle, self.rank, self.world, self.decoder = shuffle, rank, world, decoder
        self.buffer, self.aug = buffer, aug
        self.epoch = 0

    def _raw(self, slot: int, slots: int) -> Iterator[tuple[dict, bytes]]:
        order = list(range(len(self.files)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(
                self.seed + self.epoch)).tolist()
        if len(order) >= slots:
            for s in order[slot::slots]:
                yield from iter_tar(self.files[s])
        else:
            for s in order:
                for rec, data in iter_tar(self.files[s]):
                    if int(rec.get("_index", 0)) % slots == slot:
                        yield rec, data

    def _slot_stream(self, slot: int, slots: int) -> Iterator[tuple[dict, bytes]]:
        if self.world == 1:
            yield from self._raw(slot, slots)
            return
        cap, n = sum(self.counts) // slots, 0
        while n < cap:  # exactly `cap` per slot so every rank runs the same number of steps
            got = False
            for item in self._raw(slot, slots):
                got = True
                yield item
                n += 1
                if n >= cap:
                    return
            if not got:
                return

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * nw + wid, self.world * nw
        stream = self._slot_stream(slot, slots)
        if self.shuffle:
            stream = _shuffle_buffer(stream, self.buffer,
                                     np.random.default_rng([self.seed, self.epoch, slot]))
        for rec, data in stream:
            try:
                yield load_sample(rec, data, size=self.size, train=self.train, seed=self.seed,
                                  epoch=self.epoch, index=int(rec.get("_index", 0)),
                                  decoder=self.decoder, aug=self.aug)
            except ManifestError as exc:
                if not self.skip_bad:
                    raise
                log.debug("skipping %s", exc)
                yield None


def _shuffle_buffer(stream, size: int, rng: np.random.Generator):
    buf = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(0, len(buf)))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def make_shard_loader(src: str, *, image_size: int, batch_size: int, train: bool, tokenizer,
                      num_workers: int, seed: int, skip_bad: bool, shuffle: bool,
                      drop_last: bool, rank: int, world: int, decoder: str = "auto",
                      device: str | None = None, aug=None):
    """The CPU-path loader over shards (called by :func:`make_loader`)."""
    from .loader import Loader

    files, counts = read_index(src)
    ds = ShardDataset(files, counts, image_size=image_size, train=train, seed=seed,
                      skip_bad=skip_bad, shuffle=shuffle, rank=rank, world=world, decoder=decoder,
                      aug=aug)
    dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                    drop_last=drop_last, persistent_workers=False,
                    prefetch_factor=4 if num_workers > 0 else None,
                    pin_memory=torch.cuda.is_available())
    per_rank = sum(counts) / world
    # Batches per epoch (exact for one worker; each extra worker may add one partial batch).
    n = math.floor(per_rank / batch_size) if drop_last else math.ceil(per_rank / batch_size)
    return Loader(dl, max(n, 0), tokenizer=tokenizer, sampler=ds, name=src, backend="cpu",
                  device=device)
