"""CPU image decoding: the fastest decoder measured (docs/data.md), with reduced-size JPEG
decoding.

JPEG: simplejpeg (libjpeg-turbo) when installed, else Pillow. Both can decode at a reduced scale
(libjpeg's DCT scaling; Pillow's ``draft``), which skips most of the inverse DCT when the crop
will be shrunk anyway. ``min_size`` asks for the smallest scale whose decoded image is still at
least that big, so a crop resized to the target is never upsampled by the reduction;
:func:`reduced_min_size` restricts that to 1/2, 1/4, 1/8, the scales that are actually faster.
PNG and other formats: Pillow. Greyscale, palette and CMYK
images come out as RGB. Benchmarks: ``benchmarks/bench_data.py``.
"""
from __future__ import annotations

import io

import numpy as np

try:  # optional extra: pip install regionmed-fast[data]
    import simplejpeg as _sj
except Exception:  # pragma: no cover - exercised where simplejpeg is absent
    _sj = None

JPEG_MAGIC = b"\xff\xd8"


def is_jpeg(data: bytes) -> bool:
    return data[:2] == JPEG_MAGIC


def _decode_pil(data: bytes, min_size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if min_size is not None and im.format == "JPEG":
            # draft keeps the scale whose size is >= the requested one.
            im.draft("RGB", (max(1, min_size[0]), max(1, min_size[1])))
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def reduced_min_size(width: int, height: int, min_w: int, min_h: int) -> tuple[int, int] | None:
    """The decode size to ask for: the largest power-of-two reduction (1/8, 1/4, 1/2) whose
    image is still at least ``min_w x min_h``, or None for a full-size decode. Only these scales
    are worth it: libjpeg-turbo's other M/8 scales use slow generic IDCTs (slower than a
    full-size decode: docs/data.md)."""
    for k in (8, 4, 2):
        w, h = -(-width // k), -(-height // k)
        if w >= min_w and h >= min_h:
            return w, h
    return None


def decode_image(data: bytes, *, min_size: tuple[int, int] | None = None,
                 backend: str = "auto") -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB ``[H', W', 3]``.

    ``min_size`` = (min_width, min_height): allow a reduced-size JPEG decode no smaller than
    that (the caller reads the actual scale from the shape). ``backend``: "auto" (simplejpeg for
    JPEG when installed, else Pillow), "simplejpeg" or "pil". Raises ValueError/OSError on data
    that is not a readable image.
    """
    if backend not in ("auto", "simplejpeg", "pil"):
        raise ValueError(f"backend must be 'auto', 'simplejpeg' or 'pil', got {backend!r}")
    if backend == "simplejpeg" and _sj is None:
        raise ImportError("simplejpeg is not installed (pip install regionmed-fast[data])")
    if backend != "pil" and _sj is not None and is_jpeg(data):
        try:
            if min_size is None:
                return _sj.decode_jpeg(data, colorspace="RGB")
            return _sj.decode_jpeg(data, colorspace="RGB", min_width=int(min_size[0]),
                                   min_height=int(min_size[1]))
        except ValueError:
            if backend == "simplejpeg":
                raise
            # CMYK/YCCK or unusual JPEGs: Pillow handles them.
    return _decode_pil(data, min_size)


def decode_file(path: str, **kw) -> np.ndarray:
    """:func:`decode_image` of a file's bytes."""
    with open(path, "rb") as fh:
        return decode_image(fh.read(), **kw)
