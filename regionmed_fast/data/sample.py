"""One sample: a manifest record and its encoded image -> decoded, cropped, resized, flipped
pixels (uint8 [3, S, S]) and the fields that follow the geometry (boxes in output pixels, the
kept regions' texts and labels, side words swapped on a flip), and :func:`collate` of samples
into a uint8 batch. ``regionmed_fast.data.batch`` builds on these; every backend draws a
sample's geometry here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .decode import decode_image, reduced_min_size
from .manifest import SIZE_MISMATCH, UNREADABLE_IMAGE, ManifestError, Problem
from .sides import swap_sides
from .transforms import (Augment, CropParams, crop_resize_flip, sample_crop, sample_rng,
                         transform_boxes)

# Record keys that are part of the batch proper; everything else goes to meta.
CORE_KEYS = frozenset({"image", "width", "height", "text", "regions", "labels", "image_path",
                       "_line", "_file", "_index"})
REGION_CORE = frozenset({"bbox", "text", "label"})


def record_where(rec: dict) -> tuple[str, int]:
    return rec.get("_file", "annotations.jsonl"), int(rec.get("_line", 0))


def sample_key(rec: dict, default: int = 0) -> int:
    """The number a sample's random geometry is drawn from: its manifest line (the same in a
    folder and in shards written from it), else ``default``."""
    return int(rec.get("_line", default))


def geometry(rec: dict, train: bool, seed: int, epoch: int, key: int, aug: Augment | None = None,
             stage: int = 0) -> CropParams:
    """The crop/flip of sample ``key`` in (``stage``, ``epoch``); the same call on every backend."""
    aug = aug or Augment()
    return sample_crop(sample_rng(seed, epoch, key, stage), int(rec["width"]), int(rec["height"]),
                       train=train, scale=aug.scale, ratio=aug.ratio, flip_p=aug.flip_p)


def target_boxes(rec: dict, p: CropParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [K', 4] float32 in output pixels, kept region indices) of ``rec`` under ``p``."""
    boxes = np.array([r["bbox"] for r in rec["regions"]], dtype=np.float64).reshape(-1, 4)
    return transform_boxes(boxes, p, size, size)


def sample_fields(rec: dict, boxes: np.ndarray, keep: np.ndarray, p: CropParams) -> dict:
    """Everything of a sample but the pixels. A flipped sample's texts have their side words
    swapped (data/sides.py)."""
    regs = [rec["regions"][int(i)] for i in keep]
    meta = {k: v for k, v in rec.items() if k not in CORE_KEYS}
    meta["image"] = rec["image"]
    meta["orig_size"] = (int(rec["width"]), int(rec["height"]))
    meta["crop"] = (p.x0, p.y0, p.w, p.h, p.flip)
    meta["region_meta"] = [{k: v for k, v in r.items() if k not in REGION_CORE} for r in regs]
    side = swap_sides if p.flip else (lambda t: t)
    return {
        "boxes": boxes,
        "text": side(rec["text"]),
        "region_texts": [side(r["text"]) for r in regs],
        "labels": list(rec.get("labels", [])),
        "region_labels": [r.get("label", r["text"]) for r in regs],
        "meta": meta,
    }


def decode_record(rec: dict, data: bytes, *, min_size: tuple[int, int] | None = None,
                  decoder: str = "auto") -> tuple[np.ndarray, float, float]:
    """Decode ``rec``'s image bytes: (uint8 [H', W', 3], x scale, y scale of the decoded grid to
    the stored image). ``min_size`` allows a reduced-size JPEG decode (1/2, 1/4, 1/8). Raises
    :class:`ManifestError` (file:line) when the bytes do not decode or the image is not the
    record's width x height."""
    w, h = int(rec["width"]), int(rec["height"])
    file, line = record_where(rec)
    try:
        img = decode_image(data, min_size=min_size, backend=decoder)
    except Exception as exc:
        raise ManifestError(Problem(file, line, UNREADABLE_IMAGE,
                                    f"cannot decode {rec['image']}: {type(exc).__name__}: {exc}")) from None
    ih, iw = img.shape[:2]
    # libjpeg's 1/k output is ceil(w / k) wide, and its pixel grid is exactly 1/k of the stored one
    k = max(1, round(w / max(iw, 1))) if min_size is not None else 1
    if (iw, ih) != (-(-w // k), -(-h // k)):
        got = f"{iw}x{ih}" + (f" at 1/{k} scale" if k > 1 else "")
        raise ManifestError(Problem(file, line, SIZE_MISMATCH,
                                    f"manifest says {w}x{h} but {rec['image']} decodes to {got}"))
    return img, 1.0 / k, 1.0 / k


def crop_min_size(rec: dict, p: CropParams, size: int) -> tuple[int, int] | None:
    """The reduced decode that still leaves crop ``p`` at least ``size`` pixels a side."""
    w, h = int(rec["width"]), int(rec["height"])
    return reduced_min_size(w, h, math.ceil(w * size / p.w), math.ceil(h * size / p.h))


def any_crop_min_size(rec: dict, size: int, aug: Augment, train: bool) -> tuple[int, int] | None:
    """The reduced decode that serves every crop the sampler can draw for ``rec`` (what a cached
    decode is stored at): the smallest window of area ``scale[0]`` at the extreme ratios."""
    w, h = int(rec["width"]), int(rec["height"])
    if not train:
        return reduced_min_size(w, h, size, size)
    a = aug.scale[0] * w * h
    wmin = max(1, min(w, round(math.sqrt(a * aug.ratio[0]))))
    hmin = max(1, min(h, round(math.sqrt(a / aug.ratio[1]))))
    return reduced_min_size(w, h, math.ceil(w * size / wmin), math.ceil(h * size / hmin))


def render_sample(rec: dict, decoded: tuple[np.ndarray, float, float], p: CropParams,
                  size: int) -> dict:
    """The sample of ``rec`` under geometry ``p`` from its decoded image."""
    img, sx, sy = decoded
    boxes, keep = target_boxes(rec, p, size)
    out = sample_fields(rec, boxes, keep, p)
    out["image"] = crop_resize_flip(img, p, size, scale_x=sx, scale_y=sy)
    return out


def load_sample(rec: dict, data: bytes, *, size: int, train: bool, seed: int, epoch: int,
                index: int, stage: int = 0, decoder: str = "auto", reduced_decode: bool = True,
                aug: Augment | None = None) -> dict:
    """Decode, crop, resize, flip one record (``index``: the key its geometry is drawn from,
    :func:`sample_key`). Raises ManifestError (file:line) when the image cannot be decoded or
    does not match the record's width/height."""
    p = geometry(rec, train, seed, epoch, index, aug, stage)
    want = crop_min_size(rec, p, size) if reduced_decode else None
    return render_sample(rec, decode_record(rec, data, min_size=want, decoder=decoder), p, size)


def read_bytes(rec: dict) -> bytes:
    """The encoded image of ``rec`` (its ``image_path``); ManifestError (file:line) if unreadable."""
    file, line = record_where(rec)
    try:
        with open(rec["image_path"], "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ManifestError(Problem(file, line, UNREADABLE_IMAGE,
                                    f"cannot read {rec['image_path']}: {exc}")) from None


def collate(samples: Sequence[dict | None], images: torch.Tensor | None = None) -> dict:
    """Samples -> batch. Images are the samples' uint8 [3, S, S] stacked into [B, 3, S, S], or
    ``images`` when given (a backend that made them itself). ``None`` samples (bad records
    skipped) are dropped and counted in ``batch["_skipped"]``. A batch where no sample has a
    box has ``boxes`` [B, 0, 4]."""
    good = [s for s in samples if s is not None]
    b = len(good)
    kmax = max([len(s["boxes"]) for s in good], default=0)
    boxes = torch.zeros((b, kmax, 4), dtype=torch.float32)
    counts = torch.zeros((b,), dtype=torch.int64)
    for i, s in enumerate(good):
        k = len(s["boxes"])
        counts[i] = k
        if k:
            boxes[i, :k] = torch.from_numpy(np.ascontiguousarray(s["boxes"], dtype=np.float32))
    if images is None:
        images = (torch.from_numpy(np.stack([s["image"] for s in good])) if b
                  else torch.zeros((0, 3, 0, 0), dtype=torch.uint8))
    return {
        "images": images,
        "boxes": boxes,
        "box_counts": counts,
        "texts": [s["text"] for s in good],
        "region_texts": [s["region_texts"] for s in good],
        "labels": [s["labels"] for s in good],
        "region_labels": [s["region_labels"] for s in good],
        "meta": [s["meta"] for s in good],
        "_skipped": len(samples) - b,
    }
