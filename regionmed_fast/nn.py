"""``nn.Module`` wrappers over the fused ops, for use in any model.

* :class:`ChunkedClipLoss` - drop-in for ``open_clip.ClipLoss`` (regionmed_fast/nn_loss.py).
* :class:`RoIPoolFuse` - owns the gate parameters of :func:`regionmed_fast.ops.roi_pool_fuse`
  (regionmed_fast/nn_roi.py).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ChunkedClipLoss": "regionmed_fast.nn_loss",
    "RoIPoolFuse": "regionmed_fast.nn_roi",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'regionmed_fast.nn' has no attribute {name!r}")
