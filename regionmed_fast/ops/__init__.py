"""Fused ops with interchangeable backends (``reference``, ``cpu``, ``triton``, ``cuda``, ``auto``).

* :func:`roi_align` - torchvision-compatible RoIAlign, NCHW or NHWC input, bf16/fp16 aware.
* :func:`roi_pool_fuse` - RoIAlign + mean over bins + sigmoid-gated blend with the global feature.
* :func:`chunked_clip_loss` - CLIP/SigLIP loss without the N x M logits in memory.

Submodules are imported on first use so that one op's import cost (or failure) never touches
another's.
"""
from __future__ import annotations

from regionmed_fast._lazy import lazy_getattr

_EXPORTS = {
    "roi_align": "regionmed_fast.ops.roi",
    "roi_pool_fuse": "regionmed_fast.ops.roi",
    "chunked_clip_loss": "regionmed_fast.ops.loss",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("regionmed_fast.ops", _EXPORTS)
