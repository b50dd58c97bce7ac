"""Turn one manifest record + its encoded image into one training sample (CPU path), and
collate samples into the batch format of INTERFACES.md (images still uint8 [B, 3, S, S];
:class:`regionmed_fast.data.loader.Loader` normalises them in the main process, which moves
4x fewer bytes between worker processes than float32 would)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .decode import decode_image, reduced_min_size
from .manifest import (SIZE_MISMATCH, UNREADABLE_IMAGE, ManifestError, Problem)
from .transforms import (Augment, CropParams, crop_resize_flip, sample_crop, sample_rng,
                         transform_boxes)

# Record keys that are part of the batch proper; everything else goes to meta.
CORE_KEYS = frozenset({"image", "width", "height", "text", "regions", "labels", "image_path",
                       "_line", "_file", "_index"})
REGION_CORE = frozenset({"bbox", "text", "label"})


def record_where(rec: dict) -> tuple[str, int]:
    return rec.get("_file", "annotations.jsonl"), int(rec.get("_line", 0))


def geometry(rec: dict, size: int, train: bool, seed: int, epoch: int, index: int,
             aug: Augment | None = None) -> CropParams:
    """The crop/flip of sample ``index`` in ``epoch``; the same call on every backend."""
    aug = aug or Augment()
    return sample_crop(sample_rng(seed, epoch, index), int(rec["width"]), int(rec["height"]),
                       train=train, scale=aug.scale, ratio=aug.ratio, flip_p=aug.flip_p)


def target_boxes(rec: dict, p: CropParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.array([r["bbox"] for r in rec["regions"]], dtype=np.float64).reshape(-1, 4)
    return transform_boxes(boxes, p, size, size)


def sample_fields(rec: dict, boxes: np.ndarray, keep: np.ndarray, p: CropParams) -> dict:
    """Everything of a sample but the pixels."""
    regs = [rec["regions"][int(i)] for i in keep]
    meta = {k: v for k, v in rec.items() if k not in CORE_KEYS}
    meta["image"] = rec["image"]
    meta["orig_size"] = (int(rec["width"]), int(rec["height"]))
    meta["crop"] = (p.x0, p.y0, p.w, p.h, p.flip)
    meta["region_meta"] = [{k: v for k, v in r.items() if k not in REGION_CORE} for r in regs]
    return {
        "boxes": boxes,
        "text": rec["text"],
        "region_texts": [r["text"] for r in regs],
        "labels": list(rec.get("labels", [])),
        "region_labels": [r.get("label", r["text"]) for r in regs],
        "meta": meta,
    }


def load_sample(rec: dict, data: bytes, *, size: int, train: bool, seed: int, epoch: int,
                index: int, decoder: str = "auto", reduced_decode: bool = True,
                aug: Augment | None = None) -> dict:
    """Decode, crop, resize, flip one record. Raises ManifestError (file:line) when the image
    cannot be decoded or does not match the record's width/height."""
    p = geometry(rec, size, train, seed, epoch, index, aug)
    w, h = int(rec["width"]), int(rec["height"])
    # Smallest decode that still leaves the crop at least `size` pixels on each side.
    want = None
    if reduced_decode:
        want = reduced_min_size(w, h, math.ceil(w * size / p.w), math.ceil(h * size / p.h))
    reduce = want is not None
    file, line = record_where(rec)
    try:
        img = decode_image(data, min_size=want, backend=decoder)
    except Exception as exc:
        raise ManifestError(Problem(file, line, UNREADABLE_IMAGE,
                                    f"cannot decode {rec['image']}: {type(exc).__name__}: {exc}")) from None
    ih, iw = img.shape[:2]
    if not reduce and (iw, ih) != (w, h):
        raise ManifestError(Problem(file, line, SIZE_MISMATCH,
                                    f"manifest says {w}x{h} but {rec['image']} decodes to {iw}x{ih}"))
    sx, sy = iw / w, ih / h
    if reduce:  # libjpeg's 1/k output is ceil(w / k) wide; the pixel grid scale is exactly 1/k
        sx, sy = 1.0 / max(1, round(w / iw)), 1.0 / max(1, round(h / ih))
    pix = crop_resize_flip(img, p, size, scale_x=sx, scale_y=sy)
    boxes, keep = target_boxes(rec, p, size)
    out = sample_fields(rec, boxes, keep, p)
    out["image"] = pix
    return out


def collate(samples: list[dict | None]) -> dict:
    """Samples -> batch (uint8 images [B, 3, H, W]); ``None`` samples (skipped bad records) are
    dropped and counted in ``batch["_skipped"]``."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    b = len(good)
    kmax = max([len(s["boxes"]) for s in good], default=0)
    boxes = torch.zeros((b, kmax, 4), dtype=torch.float32)
    counts = torch.zeros((b,), dtype=torch.int64)
    for i, s in enumerate(good):
        k = len(s["boxes"])
        counts[i] = k
        if k:
            boxes[i, :k] = torch.from_numpy(np.ascontiguousarray(s["boxes"], dtype=np.float32))
    if b:
        images = torch.from_numpy(np.stack([s["image"] for s in good]))
    else:
        images = torch.zeros((0, 3, 0, 0), dtype=torch.uint8)
    return {
        "images": images,
        "boxes": boxes,
        "box_counts": counts,
        "texts": [s["text"] for s in good],
        "region_texts": [s["region_texts"] for s in good],
        "labels": [s["labels"] for s in good],
        "region_labels": [s["region_labels"] for s in good],
        "meta": [s["meta"] for s in good],
        "_skipped": skipped,
    }


def read_bytes(rec: dict) -> bytes:
    file, line = record_where(rec)
    try:
        with open(rec["image_path"], "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ManifestError(Problem(file, line, UNREADABLE_IMAGE,
                                    f"cannot read {rec['image_path']}: {exc}")) from None

