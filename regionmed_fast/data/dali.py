"""NVIDIA DALI backend of :func:`regionmed_fast.data.loader.make_loader`.

Pipeline: encoded bytes, crop windows, flip flags and boxes enter through
``fn.external_source``; ``fn.decoders.image`` decodes (``device="mixed"``: nvJPEG on the GPU;
``"cpu"`` with ``device_id=None`` where there is no GPU); ``fn.resize`` crops and resizes in one
pass (``roi_start``/``roi_end``, antialiased linear); ``fn.crop_mirror_normalize`` flips,
normalises and lays out CHW; ``fn.bb_flip`` flips the boxes (relative ltrb) with the same flag
and ``fn.pad`` pads them to the batch's largest count.

Why the crop windows come from the host and not from ``fn.random_bbox_crop``: the windows are
drawn by :func:`regionmed_fast.data.transforms.sample_crop` from (seed, epoch, index), exactly as
on the CPU path, so both backends produce the same geometry for the same sample, and the box
rule (clip, drop below ``MIN_VISIBLE`` of the area or 1 px) is one piece of code.
``random_bbox_crop`` draws its windows by its own IoU-threshold rule from DALI's generator, which
cannot match the CPU path. The pixels differ between backends only by interpolation and JPEG
decoder rounding.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging

import numpy as np
import torch

from .loader import EpochSampler, Loader
from .manifest import ManifestError, Problem, UNREADABLE_IMAGE
from .sample import geometry, read_bytes, sample_fields, target_boxes
from .transforms import CLIP_MEAN, CLIP_STD, CropParams

log = logging.getLogger("regionmed_fast.data")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except Exception:
        return False


def build_pipeline(*, batch_size: int, image_size: int, device_id: int | None, num_threads: int,
                   mean=CLIP_MEAN, std=CLIP_STD, seed: int = 0):
    """The DALI pipeline (built). Inputs fed by name: enc, roi_start, roi_end, flip, boxes."""
    from nvidia.dali import Pipeline, fn, types

    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                    prefetch_queue_depth=1, seed=seed)  # feed one batch, run one batch
    with pipe:
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        boxes = fn.external_source(name="boxes", dtype=types.FLOAT, ndim=2)
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
        img = fn.resize(img, size=[image_size, image_size], roi_start=roi_start, roi_end=roi_end,
                        roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
        img = fn.crop_mirror_normalize(img, mirror=flip, mean=[255.0 * m for m in mean],
                                       std=[255.0 * s for s in std], output_layout="CHW",
                                       dtype=types.FLOAT)
        boxes = fn.bb_flip(boxes, horizontal=flip, ltrb=True)
        boxes = fn.pad(boxes, fill_value=0.0)
        pipe.set_outputs(img, boxes)
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


class DaliBatches:
    """Iterable of batches (images already normalised) over ``records`` in the sampler's order."""

    def __init__(self, records: list[dict], *, image_size: int, batch_size: int, train: bool,
                 seed: int, sampler: EpochSampler, drop_last: bool, device: torch.device,
                 num_threads: int, aug=None):
        self.aug = aug
        self.records, self.size, self.batch_size = records, image_size, batch_size
        self.train, self.seed, self.sampler, self.drop_last = train, seed, sampler, drop_last
        self.device = device
        device_id = device.index if device.type == "cuda" else None
        if device.type == "cuda" and device_id is None:
            device_id = torch.cuda.current_device()
            self.device = torch.device("cuda", device_id)
        self.pipe = build_pipeline(batch_size=batch_size, image_size=image_size,
                                   device_id=device_id, num_threads=num_threads, seed=seed)
        self._pool = cf.ThreadPoolExecutor(max_workers=1)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _host(self, chunk: list[tuple[int, int]]) -> dict:
        """Everything the pipeline needs for one batch, and the host side of the batch."""
        s = self.size
        feed = {"enc": [], "roi_start": [], "roi_end": [], "flip": [], "boxes": []}
        fields = []
        for index, epoch in chunk:
            rec = self.records[index]
            p = geometry(rec, s, self.train, self.seed, epoch, index, self.aug)
            # Boxes are cropped here and flipped by fn.bb_flip with the image's flag.
            boxes, keep = target_boxes(rec, CropParams(p.x0, p.y0, p.w, p.h, False), s)
            feed["enc"].append(np.frombuffer(read_bytes(rec), dtype=np.uint8))
            feed["roi_start"].append(np.array([p.y0, p.x0], np.float32))
            feed["roi_end"].append(np.array([p.y0 + p.h, p.x0 + p.w], np.float32))
            feed["flip"].append(np.array(int(p.flip), np.int32))
            feed["boxes"].append(np.ascontiguousarray(boxes / s, dtype=np.float32).reshape(-1, 4))
            fields.append(sample_fields(rec, boxes, keep, p))
        return {"feed": feed, "fields": fields, "chunk": chunk}

    def _run(self, host: dict) -> dict:
        for name, data in host["feed"].items():
            self.pipe.feed_input(name, data)
        try:
            img_tl, box_tl = self.pipe.run()
        except RuntimeError as exc:
            rec = self.records[host["chunk"][0][0]]
            names = ", ".join(self.records[i]["image"] for i, _ in host["chunk"])
            raise ManifestError(Problem(rec.get("_file", "annotations.jsonl"), int(rec.get("_line", 0)),
                                        UNREADABLE_IMAGE, f"DALI failed on the batch of [{names}]: "
                                        f"{str(exc).splitlines()[0]}")) from exc
        images = _to_torch(img_tl, self.device)
        rel = torch.from_numpy(np.array(box_tl.as_tensor())).reshape(len(host["fields"]), -1, 4)
        fields = host["fields"]
        counts = torch.tensor([len(f["boxes"]) for f in fields], dtype=torch.int64)
        return {
            "images": images,
            "boxes": (rel * float(self.size)).clamp_(0.0, float(self.size)),
            "box_counts": counts,
            "texts": [f["text"] for f in fields],
            "region_texts": [f["region_texts"] for f in fields],
            "labels": [f["labels"] for f in fields],
            "region_labels": [f["region_labels"] for f in fields],
            "meta": [f["meta"] for f in fields],
            "_skipped": 0,
        }

    def __iter__(self):
        order = list(iter(self.sampler))
        bs = self.batch_size
        chunks = [order[i:i + bs] for i in range(0, len(order), bs)]
        if self.drop_last and chunks and len(chunks[-1]) < bs:
            chunks.pop()
        if not chunks:
            return
        nxt = self._pool.submit(self._host, chunks[0])
        for i in range(len(chunks)):
            host = nxt.result()
            if i + 1 < len(chunks):  # read and plan the next batch while this one runs
                nxt = self._pool.submit(self._host, chunks[i + 1])
            yield self._run(host)


def make_dali_loader(records: list[dict], *, image_size: int, batch_size: int, train: bool,
                     tokenizer, num_workers: int, seed: int, skip_bad: bool, shuffle: bool,
                     drop_last: bool, rank: int, world: int, device: str | None,
                     manifest_skipped: int, name: str, aug=None) -> Loader:
    """The DALI loader (called by :func:`make_loader` with ``backend="dali"``)."""
    if not dali_available():
        raise ImportError("backend='dali' needs NVIDIA DALI: pip install regionmed-fast[dali]")
    if device is None:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
    if skip_bad:
        log.info("DALI backend: bad records are skipped at manifest reading; a corrupt image "
                 "body still fails its batch")
    sampler = EpochSampler(len(records), shuffle=shuffle, seed=seed, rank=rank, world=world,
                           drop_last=drop_last)
    batches = DaliBatches(records, image_size=image_size, batch_size=batch_size, train=train,
                          seed=seed, sampler=sampler, drop_last=drop_last, device=dev,
                          num_threads=max(1, num_workers), aug=aug)
    return Loader(batches, len(batches), tokenizer=tokenizer, manifest_skipped=manifest_skipped,
                  sampler=sampler, name=name, backend="dali")
