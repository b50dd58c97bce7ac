"""Box-aware geometry: random resized crop, horizontal flip, resize, normalise.

The geometry of one sample is a :class:`CropParams` (an integer crop window in pixels of the
stored image, and a flip flag). It is drawn by :func:`sample_crop` from a generator seeded by
(seed, epoch, sample index), so every backend (CPU DataLoader, DALI CPU, DALI GPU) sees the
same windows for the same sample and the boxes are computed by the same code
(:func:`transform_boxes`) everywhere; only pixel interpolation differs between backends.

Coordinates are continuous pixels: pixel ``i`` covers ``[i, i+1)``. A window ``(x0, y0, w, h)``
resized to ``S x S`` maps ``x -> (x - x0) * S / w`` and ``y -> (y - y0) * S / h``; a flip maps
``x -> S - x``.

Box rule (documented, the same on every backend): each box is clipped to the crop window; it is
dropped when the part left inside is less than ``min_visible`` (default 0.25) of its original
area, or when it is narrower or shorter than ``min_size_px`` (default 1) output pixel. The
kept boxes keep their order; the indices of the kept boxes are returned so texts and labels
follow them.

Training: window area uniform in ``scale`` (default 0.5-1.0 of the image) and aspect ratio
log-uniform in ``ratio`` (3/4-4/3), as torchvision's RandomResizedCrop (10 tries, then the
largest centred window of clamped ratio); flip with probability 0.5 (the texts' side words are
swapped with it, data/sides.py). Evaluation: the whole image
resized to ``S x S`` (no crop, so no box is ever lost; the aspect ratio is not kept).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_VISIBLE = 0.25
MIN_SIZE_PX = 1.0
TRAIN_SCALE = (0.5, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class Augment:
    """Training augmentation settings: crop area range, aspect-ratio range, flip probability
    (a flip swaps the side words of the texts, so it is on by default)."""

    scale: tuple[float, float] = TRAIN_SCALE
    ratio: tuple[float, float] = TRAIN_RATIO
    flip_p: float = 0.5

    def __post_init__(self):
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not (0 <= self.flip_p <= 1):
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")


@dataclass(frozen=True)
class CropParams:
    """Crop window ``[x0, x0+w) x [y0, y0+h)`` in stored-image pixels (ints) and a flip flag."""

    x0: int
    y0: int
    w: int
    h: int
    flip: bool


def sample_rng(seed: int, epoch: int, index: int, stage: int = 0) -> np.random.Generator:
    """The generator of one sample's geometry, a pure function of (seed, stage, epoch, index):
    identical in every process and backend, and on resume."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(stage), int(epoch), int(index)])


def sample_crop(rng: np.random.Generator, width: int, height: int, *, train: bool,
                scale: tuple[float, float] = TRAIN_SCALE,
                ratio: tuple[float, float] = TRAIN_RATIO, flip_p: float = 0.5) -> CropParams:
    """Draw one sample's geometry (see module docstring). ``width``/``height``: stored image."""
    if not train:
        return CropParams(0, 0, int(width), int(height), False)
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        w, h = max(1, min(w, width)), max(1, min(h, height))
        x0, y0 = (width - w) // 2, (height - h) // 2
    flip = bool(rng.uniform() < flip_p)
    return CropParams(x0, y0, w, h, flip)


def transform_boxes(boxes: np.ndarray, p: CropParams, out_w: int, out_h: int, *,
                    min_visible: float = MIN_VISIBLE,
                    min_size_px: float = MIN_SIZE_PX) -> tuple[np.ndarray, np.ndarray]:
    """Map ``boxes`` [K, 4] (x1, y1, x2, y2 in stored-image pixels) through crop ``p``, resize
    to ``out_w x out_h`` and flip. Returns ``(boxes [K', 4] float32 in output pixels, kept
    indices [K'] int64)`` by the box rule in the module docstring."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if b.shape[0] == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = b.copy()
    c[:, [0, 2]] = np.clip(c[:, [0, 2]], p.x0, p.x0 + p.w)
    c[:, [1, 3]] = np.clip(c[:, [1, 3]], p.y0, p.y0 + p.h)
    vis = np.clip(c[:, 2] - c[:, 0], 0, None) * np.clip(c[:, 3] - c[:, 1], 0, None)
    sx, sy = out_w / p.w, out_h / p.h
    out = np.empty_like(c)
    out[:, 0] = (c[:, 0] - p.x0) * sx
    out[:, 2] = (c[:, 2] - p.x0) * sx
    out[:, 1] = (c[:, 1] - p.y0) * sy
    out[:, 3] = (c[:, 3] - p.y0) * sy
    if p.flip:
        out[:, [0, 2]] = out_w - out[:, [2, 0]]
    # Rounding can leave -1e-14 or S + 1e-14; boxes are promised inside [0, S].
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, out_w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, out_h)
    keep = ((vis >= min_visible * np.maximum(area, 1e-12))
            & (out[:, 2] - out[:, 0] >= min_size_px) & (out[:, 3] - out[:, 1] >= min_size_px))
    idx = np.nonzero(keep)[0].astype(np.int64)
    return out[idx].astype(np.float32), idx


def crop_resize_flip(img: np.ndarray, p: CropParams, size: int, *, scale_x: float = 1.0,
                     scale_y: float = 1.0) -> np.ndarray:
    """Apply the pixel side of ``p`` to ``img`` (uint8 [H, W, 3]) -> uint8 [3, size, size].

    ``scale_x``/``scale_y``: how much smaller ``img`` is than the stored image (a reduced-size
    decode). Full-size images take torch's antialiased bilinear uint8 resize of the integer
    window (faster than Pillow's: docs/data.md gives the measurement). Reduced decodes, whose
    window is fractional in decoded pixels, take Pillow's resize with a float source box, so the
    geometry is the same either way. Both follow Pillow's antialias filter.
    """
    if scale_x == 1.0 and scale_y == 1.0:
        with warnings.catch_warnings():  # Pillow's arrays are read-only; this only reads
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(img)
        t = t[p.y0:p.y0 + p.h, p.x0:p.x0 + p.w].permute(2, 0, 1).unsqueeze(0)
        out = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
        out = out.numpy()
        # numpy, not torch.flip: torch's threaded copy is slow when workers hold the cores.
        return np.ascontiguousarray(out[:, :, ::-1]) if p.flip else out
    from PIL import Image

    im = Image.fromarray(img)
    box = (p.x0 * scale_x, p.y0 * scale_y, (p.x0 + p.w) * scale_x, (p.y0 + p.h) * scale_y)
    im = im.resize((size, size), Image.BILINEAR, box=box)
    if p.flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1))


def normalize_uint8_batch(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] (as the workers produce it) -> float32 [B, 3, H, W] contiguous,
    ``(x / 255 - mean) / std``; runs on the tensor's device (pass a CUDA tensor to normalise
    on the GPU after a 4x smaller host-to-device copy)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.device.type == "cpu":
        # numpy is single-threaded: torch's OpenMP pool stalls when the DataLoader workers
        # occupy the cores (docs/data.md).
        sc = np.array([1.0 / (255.0 * s) for s in std], np.float32).reshape(1, 3, 1, 1)
        sh = np.array([-m / s for m, s in zip(mean, std)], np.float32).reshape(1, 3, 1, 1)
        out = images.numpy().astype(np.float32)
        out *= sc
        out += sh
        return torch.from_numpy(out)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device).view(1, 3, 1, 1)
    return images.to(torch.float32).contiguous().mul_(scale).add_(shift)


def denormalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Inverse of the normalisation: float [B, 3, H, W] -> float in [0, 255] (for tests/plots)."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images * s + m) * 255.0
