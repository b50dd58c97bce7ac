"""Plain PyTorch references of every op: the ground truth the tests compare each backend with.

The math of each op lives next to its name (``loss_reference.py``, ``roi_reference.py``); this
module gathers them so that ``from regionmed_fast.ops import reference`` reaches all of them.
"""
from __future__ import annotations

from regionmed_fast._lazy import lazy_getattr

_EXPORTS = {
    "clip_loss_reference": "regionmed_fast.ops.loss_reference",
    "roi_align_reference": "regionmed_fast.ops.roi_reference",
    "roi_pool_fuse_reference": "regionmed_fast.ops.roi_reference",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("regionmed_fast.ops.reference", _EXPORTS)
