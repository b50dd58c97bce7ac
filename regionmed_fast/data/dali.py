"""The NVIDIA DALI backend of :func:`regionmed_fast.data.loader.make_loader` (dataset folders).

Pipeline: encoded bytes, crop windows and flip flags enter through ``fn.external_source``;
``fn.decoders.image`` decodes (``device="mixed"``: nvJPEG on the GPU; ``"cpu"`` with
``device_id=None`` where there is no GPU); ``fn.resize`` crops and resizes in one pass
(``roi_start``/``roi_end``, antialiased linear); ``fn.crop_mirror_normalize`` flips, normalises
and lays out CHW. Everything else of the batch (boxes through the same crop and flip, kept
regions, side words, tokens) is the host side of the one batch path
(``regionmed_fast.data.batch``), the same code as the CPU path's, so a batch with no box is no
special case.

Why the crop windows come from the host and not from ``fn.random_bbox_crop``: they are drawn by
:func:`regionmed_fast.data.transforms.sample_crop` from (seed, stage, epoch, key) as on the CPU
path, so both backends produce the same geometry for the same sample; ``random_bbox_crop`` draws
by its own IoU-threshold rule from DALI's generator, which cannot match. The pixels differ
between backends only by interpolation and JPEG decoder rounding.

Bad image bodies: when the pipeline fails on a batch, its samples are decoded on the CPU to
find the bad ones; they raise :class:`ManifestError` (file:line), or with ``skip_bad`` are
dropped (counted) and the rest of the batch is run again.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Iterator

import numpy as np
import torch

from regionmed_fast.errors import require

from .batch import SampleMaker
from .manifest import UNREADABLE_IMAGE, ManifestError, Problem
from .order import Schedule
from .records import RecordStore
from .sample import (collate, decode_record, geometry, read_bytes, record_where, sample_fields, sample_key,
                     target_boxes)
from .transforms import CLIP_MEAN, CLIP_STD

log = logging.getLogger("regionmed_fast.data")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except Exception:
        return False


def build_pipeline(*, batch_size: int, image_size: int, device_id: int | None, num_threads: int,
                   mean=CLIP_MEAN, std=CLIP_STD, seed: int = 0):
    """The DALI pipeline (built). Inputs fed by name: enc, roi_start, roi_end, flip."""
    require("nvidia.dali", extra="dali", purpose="the DALI loader backend (backend='dali')",
            pip_name="nvidia-dali-cuda130")
    from nvidia.dali import Pipeline, fn, types

    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                    prefetch_queue_depth=1, seed=seed)  # feed one batch, run one batch
    with pipe:
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
        img = fn.resize(img, size=[image_size, image_size], roi_start=roi_start, roi_end=roi_end,
                        roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
        img = fn.crop_mirror_normalize(img, mirror=flip, mean=[255.0 * m for m in mean],
                                       std=[255.0 * s for s in std], output_layout="CHW",
                                       dtype=types.FLOAT)
        pipe.set_outputs(img)
    pipe.build()
    return pipe


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    t = tl.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=torch.float32, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(t))


class DaliSource:
    """Batches of a packed record list for one rank, decoded and resized by DALI."""

    backend = "dali"

    def __init__(self, store: RecordStore, schedule: Schedule, maker: SampleMaker, *,
                 device: torch.device, num_threads: int):
        self.store, self.schedule, self.maker = store, schedule, maker
        self.batches_per_epoch = schedule.batches_per_epoch
        self.device = device
        self.device_id = device.index if device.type == "cuda" else None
        if device.type == "cuda" and self.device_id is None:
            self.device_id = torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        self.num_threads = num_threads
        self.pipe = self._build()
        self._pool = cf.ThreadPoolExecutor(max_workers=1)

    def _build(self):
        return build_pipeline(batch_size=self.schedule.batch_size, image_size=self.maker.size,
                              device_id=self.device_id, num_threads=self.num_threads,
                              seed=self.maker.seed)

    def epoch_batches(self, epoch: int) -> int:
        return self.batches_per_epoch

    def locate(self, j: int) -> tuple[int, int]:
        return self.schedule.epoch_of(j)

    def _host(self, j: int) -> list[tuple]:
        """(record, encoded bytes or the error reading them, geometry, fields, position)."""
        m = self.maker
        epoch = self.schedule.epoch_of(j)[0]
        out = []
        for pos in self.schedule.indices(j):
            rec = self.store[pos]
            p = geometry(rec, m.train, m.seed, epoch, sample_key(rec, pos), m.aug, m.stage)
            boxes, keep = target_boxes(rec, p, m.size)
            try:
                data = read_bytes(rec)
            except ManifestError as exc:
                data = exc
            out.append((rec, data, p, sample_fields(rec, boxes, keep, p), pos))
        return out

    def _feed_run(self, items: list[tuple]) -> torch.Tensor:
        feed = {"enc": [np.frombuffer(d, dtype=np.uint8) for _, d, _, _, _ in items],
                "roi_start": [np.array([p.y0, p.x0], np.float32) for _, _, p, _, _ in items],
                "roi_end": [np.array([p.y0 + p.h, p.x0 + p.w], np.float32) for _, _, p, _, _ in items],
                "flip": [np.array(int(p.flip), np.int32) for _, _, p, _, _ in items]}
        for name, data in feed.items():
            self.pipe.feed_input(name, data)
        (img_tl,) = self.pipe.run()
        return _to_torch(img_tl, self.device)

    def _drop(self, items: list[tuple], exc: ManifestError) -> list[tuple]:
        if not self.maker.skip_bad:
            raise exc
        log.debug("skipping %s", exc)
        return items

    def _batch(self, items: list[tuple]) -> dict:
        n_all = len(items)
        good = []
        for it in items:
            if isinstance(it[1], ManifestError):
                self._drop(items, it[1])
            else:
                good.append(it)
        images = None
        if good:
            try:
                images = self._feed_run(good)
            except RuntimeError as exc:
                self.pipe = self._build()  # a pipeline that failed a batch is not reused
                good = self._without_bad(good, exc)
                images = self._feed_run(good) if good else None
        if images is None:
            s = self.maker.size
            images = torch.zeros((0, 3, s, s), dtype=torch.float32, device=self.device)
        out = collate([it[3] for it in good], images=images)
        out["_skipped"] = n_all - len(good)
        out["indices"] = [it[4] for it in good]
        return out

    def _without_bad(self, items: list[tuple], exc: RuntimeError) -> list[tuple]:
        """The items whose image decodes on the CPU; a bad one raises unless ``skip_bad``."""
        keep = []
        for it in items:
            rec, data = it[0], it[1]
            try:
                decode_record(rec, data)
            except ManifestError as bad:
                self._drop(items, bad)
                continue
            keep.append(it)
        if len(keep) == len(items):  # DALI failed where the CPU decoder did not
            file, line = record_where(items[0][0])
            names = ", ".join(it[0]["image"] for it in items)
            raise ManifestError(Problem(file, line, UNREADABLE_IMAGE,
                                        f"DALI failed on the batch of [{names}]: "
                                        f"{str(exc).splitlines()[0]}")) from exc
        return keep

    def raw(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """``(j, batch)`` for ``start <= j < stop`` (float images from the pipeline); the host
        side of batch ``j + 1`` is prepared while batch ``j`` runs."""
        if start >= stop:
            return
        nxt = self._pool.submit(self._host, start)
        for j in range(start, stop):
            items = nxt.result()
            if j + 1 < stop:
                nxt = self._pool.submit(self._host, j + 1)
            yield j, self._batch(items)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
