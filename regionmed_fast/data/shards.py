"""WebDataset ``.tar`` shards: writing them from a dataset folder, and the loader source that
streams them, both on the ``webdataset`` library (its ``TarWriter``; its URL expansion, ``gopen``
(local paths, ``http(s)://``, ``pipe:CMD``), tar expansion and key grouping, and shuffle buffer).

Layout written by :func:`write_shards` (``regionmed-fast shard DIR --out SHARDS --size 256MB``)::

    SHARDS/shard-000000.tar   members <key>.jpg|.png (the original bytes) and <key>.json
    SHARDS/shards.json        {"format": "regionmed-fast-wds/2", "total": N, "shards":
                               [{"file": "shard-000000.tar", "count": n, "fields": [...]}, ...]}

``<key>`` is the record's 9-digit position in the source manifest; ``<key>.json`` is the
manifest record (with that position as ``_index``, and ``_file``/``_line`` of the source manifest, so errors still name it and a
sample's random geometry is the same as in the folder). ``fields`` holds each sample's scalar
fields (``split``, ``patient_id``, ``image``, ...): with them the split rule
(data/split.py) counts every split exactly without opening a shard. Any WebDataset reader reads
the tars.

Reading (:class:`ShardSource`), per epoch ``e`` of stage ``s``:

* shard order: a permutation seeded by (seed, s, e) (data/order.py), or the written order
  without shuffle;
* splitting: ``world * num_workers`` slots, slot = rank * num_workers + role; with at least as
  many shards as slots a slot reads the shards ``order[slot::slots]``, otherwise every slot reads
  every shard and keeps the samples whose position in the epoch's stream is its own modulo the
  slot count;
* a slot's samples (split-filtered) go through a shuffle buffer seeded by (seed, s, e, slot);
  consecutive ``batch_size`` of them make a batch, and batch ``k`` of the rank's epoch is made by
  the role ``k % num_workers``;
* training (``drop_last``): every rank yields ``N // (batch_size * world)`` batches per epoch
  (N: the split's samples, from the index), each slot re-reading its shards when it runs short
  (so ranks stay in step); without ``drop_last`` each slot streams its share once and ends with
  a partial batch.

Exact resume (``iterate(j, ...)``): the shard order and slot of each batch are pure functions of
(seed, stage, epoch, rank, world, num_workers); restarting at batch ``b`` of an epoch replays
each slot's stream up to its offset (reading, not decoding, the skipped samples) and gives the
batches an uninterrupted run gave, with the same ``world`` and ``num_workers``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from urllib.parse import urlparse

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from regionmed_fast.errors import UserError, require

from .batch import SampleMaker
from .folder import as_is
from .manifest import DataError, ManifestError, ManifestReport, check_record, read_manifest
from .order import epoch_order
from .records import wanted_split
from .sample import collate, read_bytes
from .split import TEST_FRACTION, VAL_FRACTION, record_split

log = logging.getLogger("regionmed_fast.data")
INDEX = "shards.json"
FORMAT = "regionmed-fast-wds/2"
FORMATS = (FORMAT, "regionmed-fast-wds/1")
_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://", "file:")


def _wds():
    return require("webdataset", extra="data", purpose="WebDataset shards")


def parse_size(text: str | int) -> int:
    """'256MB' / '1.5GB' / '800KB' / '1000' -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise DataError(f"size must look like 256MB, 1GB or 1000, got {text!r}")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    val = int(float(m.group(1)) * mult)
    if val <= 0:
        raise DataError(f"size must be positive, got {text!r}")
    return val


def is_shard_source(source: str) -> bool:
    """A shard folder (``shards.json``), a ``shards.json`` file, ``.tar`` path(s) or a brace
    pattern of them, a URL or a ``pipe:`` command."""
    s = str(source)
    if s.startswith(_SCHEMES):
        return True
    if os.path.isdir(s):
        return os.path.isfile(os.path.join(s, INDEX))
    return s.endswith(INDEX) or bool(re.search(r"\.tar(\}|$)", s)) or s.endswith(".tar")


def _scalar_fields(rec: dict) -> dict:
    return {k: v for k, v in rec.items()
            if k not in ("text", "image_path") and isinstance(v, (str, int, float, bool))}


def write_shards(root: str, out: str, *, max_bytes: int | str = "256MB", skip_bad: bool = False,
                 prefix: str = "shard") -> dict:
    """Write ``root``'s validated records into tar shards of at most ``max_bytes`` each (a single
    larger sample gets a shard of its own) with ``webdataset.TarWriter``. Returns the index dict
    (also written to ``out/shards.json``). Bad records raise ManifestError unless ``skip_bad``."""
    wds = _wds()
    limit = parse_size(max_bytes)
    report = ManifestReport()
    records = read_manifest(root, skip_bad=skip_bad, report=report)
    os.makedirs(out, exist_ok=True)
    shards: list[dict] = []
    writer, size = None, 0
    for i, rec in enumerate(records):
        data = read_bytes(rec)
        meta = {k: v for k, v in rec.items() if k != "image_path"}
        meta["_index"] = i
        js = json.dumps(meta, ensure_ascii=False).encode()
        need = len(data) + len(js) + 3 * 512
        if writer is None or (size + need > limit and shards[-1]["count"] > 0):
            if writer is not None:
                writer.close()
            name = f"{prefix}-{len(shards):06d}.tar"
            shards.append({"file": name, "count": 0, "fields": []})
            writer = wds.TarWriter(os.path.join(out, name), mtime=0, mode=0o644, encoder=False)
            size = 1024
        ext = os.path.splitext(rec["image"])[1].lower().lstrip(".") or "jpg"
        writer.write({"__key__": f"{i:09d}", ext: data, "json": js})
        shards[-1]["count"] += 1
        shards[-1]["fields"].append(_scalar_fields(meta))
        size += need
    if writer is not None:
        writer.close()
    index = {"format": FORMAT, "total": len(records), "skipped": report.skipped,
             "source": os.path.abspath(root), "shards": shards}
    with open(os.path.join(out, INDEX), "w") as fh:
        json.dump(index, fh)
    return index


def _local(url: str) -> str | None:
    if url.startswith("file:"):
        return urlparse(url).path
    return None if url.startswith(_SCHEMES) else url


def resolve(source: str, index: str | None = None) -> tuple[list[str], dict | None, str]:
    """(shard URLs, the index dict or None, where the index was read). ``source``: a shard
    folder, its ``shards.json``, ``.tar`` path(s) with braces (``a-{000..009}.tar``) or ``::``
    between lists, URLs, ``pipe:`` commands. The index is ``index`` when given, else the
    ``shards.json`` of the folder the (local) shards are in."""
    src = str(source)
    if os.path.isdir(src):
        index = index or os.path.join(src, INDEX)
    elif src.endswith(INDEX) and os.path.isfile(src):
        index = index or src
    idx = None
    if index is not None:
        try:
            with open(index) as fh:
                idx = json.load(fh)
        except (OSError, ValueError) as exc:
            raise DataError(f"{index}: cannot read the shard index: {exc}") from None
        if idx.get("format") not in FORMATS:
            raise DataError(f"{index}: unknown shard index format {idx.get('format')!r}")
        base = os.path.dirname(os.path.abspath(index))
        by_name = {s["file"]: s for s in idx["shards"]}
        if os.path.isdir(src) or src.endswith(INDEX):
            urls = [os.path.join(base, s["file"]) for s in idx["shards"]]
        else:
            urls = list(_wds().shardlists.expand_urls(src))
        return urls, {"shards": [by_name.get(os.path.basename(_local(u) or u.split()[-1]))
                                 for u in urls], "format": idx["format"]}, index
    urls = list(_wds().shardlists.expand_urls(src))
    local = [_local(u) for u in urls]
    if urls and all(p is not None for p in local):
        missing = [p for p in local if not os.path.isfile(p)]
        if missing:
            raise DataError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                 if len(missing) > 1 else ""))
        folder = {os.path.dirname(os.path.abspath(p)) for p in local}
        if len(folder) == 1 and os.path.isfile(os.path.join(folder.pop(), INDEX)):
            return resolve(src, os.path.join(os.path.dirname(os.path.abspath(local[0])), INDEX))
    return urls, None, ""


def shard_counts(idx: dict | None, urls: list[str], split=None, *, group_key=None,
                 test_fraction=TEST_FRACTION, val_fraction=VAL_FRACTION) -> list[int] | None:
    """Samples of ``split`` per shard, from the index; None without one."""
    if idx is None:
        return None
    want = wanted_split(split)
    out = []
    for url, s in zip(urls, idx["shards"]):
        if s is None:
            return None  # a shard the index does not list
        if want is None:
            out.append(int(s["count"]))
        elif "fields" not in s:
            raise DataError(f"{url}: the shard index predates split fields; a split needs shards "
                            "written by this version (regionmed-fast shard)")
        else:
            out.append(sum(record_split(f, group_key=group_key, test_fraction=test_fraction,
                                        val_fraction=val_fraction) in want for f in s["fields"]))
    return out


def iter_samples(url: str) -> Iterator[tuple[dict, bytes]]:
    """(record, image bytes) of each sample of one shard, in order (webdataset's tar reader)."""
    wds = _wds()
    try:
        for s in wds.tariterators.tarfile_samples([{"url": url}]):
            js = s.get("json")
            img = [v for k, v in s.items() if not k.startswith("__") and k != "json"]
            if js is None or not img:
                raise DataError(f"{url}: sample {s.get('__key__')} lacks a .json or an image member")
            rec = json.loads(js)
            rec["image_path"] = f"{url}#{s['__key__']}"
            yield rec, img[0]
    except UserError:
        raise
    except Exception as exc:
        raise DataError(f"{url}: cannot read the shard: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


class _Plan:
    """What one slot reads in one epoch, and how many batches each role makes."""

    def __init__(self, src: "ShardSource", epoch: int):
        self.src, self.epoch = src, epoch
        n = len(src.urls)
        self.order = (epoch_order(n, src.seed, src.stage, epoch).tolist() if src.shuffle
                      else list(range(n)))

    def slot_shards(self, slot: int) -> tuple[list[int], bool]:
        """(shard numbers the slot reads, whether it keeps only every slots-th sample)."""
        slots = self.src.slots
        if len(self.order) >= slots:
            return self.order[slot::slots], False
        return self.order, True

    def slot_count(self, slot: int) -> int | None:
        counts = self.src.counts
        if counts is None:
            return None
        shards, modulo = self.slot_shards(slot)
        total = sum(counts[s] for s in shards)
        return len(range(slot, total, self.src.slots)) if modulo else total


class _EpochStream(IterableDataset):
    """Batches ``b0 <= k < b1`` of one epoch for this rank; DataLoader worker ``w`` plays role
    ``w`` and sends a marker for each of its batches before ``b0`` (replayed, not decoded)."""

    def __init__(self, src: "ShardSource", epoch: int, b0: int, b1: int):
        self.src, self.epoch, self.b0, self.b1 = src, epoch, b0, b1

    def __iter__(self):
        info = get_worker_info()
        role = info.id if info is not None else 0
        try:
            yield from self.src.role_batches(self.epoch, role, self.b0, self.b1)
        except UserError as exc:
            yield {"_raise": exc}


class ShardSource:
    """Batches of WebDataset shards for one rank (see the module docstring)."""

    backend = "cpu"

    def __init__(self, urls: list[str], counts: list[int] | None, maker: SampleMaker, *,
                 batch_size: int, seed: int = 0, stage: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, num_workers: int = 2,
                 buffer: int = 1000, split=None, group_key: str | None = None,
                 test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION,
                 epoch_samples: int | None = None, pin_memory: bool = False, name: str = ""):
        if not urls:
            raise DataError(f"{name}: no shards")
        self.urls, self.counts, self.maker = urls, counts, maker
        self.batch_size, self.seed, self.stage = batch_size, seed, stage
        self.rank, self.world, self.shuffle, self.drop_last = rank, world, shuffle, drop_last
        self.num_workers, self.nw = num_workers, max(1, num_workers)
        self.slots = self.world * self.nw
        self.buffer, self.pin_memory, self.name = buffer, pin_memory, name
        self.want = wanted_split(split)
        self.split_kw = dict(group_key=group_key, test_fraction=test_fraction,
                             val_fraction=val_fraction)
        total = sum(counts) if counts is not None else epoch_samples
        if total is None:
            raise DataError(f"{name}: the number of samples per epoch is unknown (no shards.json "
                            "beside the shards): pass epoch_samples=N or index=PATH/shards.json")
        if counts is None or drop_last or world > 1:
            # fixed per-rank quota (webdataset's with_epoch): slots wrap when short
            self.fixed = total // (batch_size * world) if drop_last or counts is None else \
                -(-total // (batch_size * world))
            self.fixed = max(self.fixed, 0)
        else:
            self.fixed = None
        self.total = total

    # ------------------------------------------------------------ counting
    def _role_quota(self, plan: _Plan, role: int) -> int:
        if self.fixed is not None:
            return len(range(role, self.fixed, self.nw))
        n = plan.slot_count(self.rank * self.nw + role)
        return -(-n // self.batch_size)

    def epoch_batches(self, epoch: int) -> int:
        """This rank's batches in ``epoch``."""
        if self.fixed is not None:
            return self.fixed
        plan = _Plan(self, epoch)
        quotas = [self._role_quota(plan, q) for q in range(self.nw)]
        return sum(quotas)

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_batches(0)

    def assignment(self, epoch: int) -> list[int]:
        """The role that makes each batch of the epoch: DataLoader's order, round-robin over the
        workers, skipping those that have made all their batches."""
        if self.fixed is not None:
            return [k % self.nw for k in range(self.fixed)]
        plan = _Plan(self, epoch)
        left = [self._role_quota(plan, q) for q in range(self.nw)]
        out, q = [], 0
        for _ in range(sum(left)):
            while left[q] == 0:
                q = (q + 1) % self.nw
            out.append(q)
            left[q] -= 1
            q = (q + 1) % self.nw
        return out

    # ------------------------------------------------------------ streaming
    def _keep(self, rec: dict) -> bool:
        return self.want is None or record_split(rec, **self.split_kw) in self.want

    def _pass(self, plan: _Plan, slot: int) -> Iterator[tuple[dict, bytes]]:
        """One read of the slot's share of the epoch's shards."""
        shards, modulo = plan.slot_shards(slot)
        t = 0
        for s in shards:
            for rec, data in iter_samples(self.urls[s]):
                if not self._keep(rec):
                    continue
                t += 1
                if modulo and (t - 1) % self.slots != slot:
                    continue
                yield rec, data

    def _stream(self, epoch: int, slot: int) -> Iterator[tuple[dict, bytes]]:
        """The slot's samples in the epoch: each pass over its shards through the shuffle
        buffer (seeded by seed, stage, epoch, slot, pass); with a fixed quota the passes repeat
        until the quota is read."""
        plan = _Plan(self, epoch)
        for n in range(1 << 62):
            stream = self._pass(plan, slot)
            if self.shuffle and self.buffer > 1:
                stream = _wds().filters.shuffle(
                    bufsize=self.buffer, initial=self.buffer,
                    seed=f"{self.seed}-{self.stage}-{epoch}-{slot}-{n}")(iter(stream))
            got = False
            for item in stream:
                got = True
                yield item
            if self.fixed is None:
                return
            if not got:
                raise DataError(f"{self.name}: slot {slot} (rank {self.rank}) has no samples to "
                                "read; use fewer workers or ranks, or more shards")

    def _check(self, rec: dict):
        """The record re-checked as a manifest line (a shard written by any tool)."""
        checked, probs = check_record(rec, "", rec.get("_file", rec["image_path"]),
                                      int(rec.get("_line", 0)), images="none")
        if checked is None:
            err = ManifestError(next(p for p in probs if p.is_error))
            if not self.maker.skip_bad:
                raise err
            return None
        checked["image_path"] = rec["image_path"]
        return checked

    def role_batches(self, epoch: int, role: int, b0: int, b1: int) -> Iterator[dict]:
        """Uint8 batches of ``role`` with epoch batch numbers in [b0, b1), in order, after a
        ``{"_skip": k}`` marker for each of its batches before ``b0``."""
        ks = [k for k, q in enumerate(self.assignment(epoch)) if q == role and k < b1]
        if not ks:
            return
        stream = self._stream(epoch, self.rank * self.nw + role)
        bs = self.batch_size
        for k in ks:
            items = []
            for item in stream:  # the role's next batch_size samples
                items.append(item)
                if len(items) == bs:
                    break
            if k < b0:
                yield {"_skip": k}
                continue
            samples, pos = [], []
            for rec, data in items:
                rec = self._check(rec)
                samples.append(None if rec is None else self.maker.sample(rec, epoch, data=data))
                pos.append(int(rec.get("_index", -1)) if rec is not None else -1)
            out = collate(samples)
            out["indices"] = [p for p, s in zip(pos, samples) if s is not None]
            yield out

    def raw(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """``(j, uint8 batch)`` for ``start <= j < stop``: one DataLoader per epoch segment."""
        j = start
        epoch, b = self.locate(start)
        while j < stop:
            n = self.epoch_batches(epoch)
            b1 = min(n, b + (stop - j))
            if b1 > b:
                ds = _EpochStream(self, epoch, b, b1)
                if self.num_workers > 0:
                    it = DataLoader(ds, batch_size=None, collate_fn=as_is, num_workers=self.num_workers,
                                    prefetch_factor=2, pin_memory=self.pin_memory)
                else:
                    it = ds
                for batch in it:
                    if "_skip" in batch:
                        continue
                    yield j, batch
                    j += 1
                    if "_raise" in batch:
                        return
            epoch, b = epoch + 1, 0
            if n == 0:
                raise DataError(f"{self.name}: an epoch has no batch (batch_size "
                                f"{self.batch_size} x world {self.world})")

    def locate(self, j: int) -> tuple[int, int]:
        """(epoch, batch within it) of this rank's ``j``-th batch of the stage."""
        if self.fixed is not None:
            if self.fixed == 0:
                return 0, 0
            return divmod(j, self.fixed)
        epoch = 0
        while True:
            n = self.epoch_batches(epoch)
            if j < n or n == 0:
                return epoch, j
            j -= n
            epoch += 1

    def close(self) -> None:
        pass
