"""``nn.Module`` wrappers over the fused ops, for use in any model.

* :class:`ChunkedClipLoss` / :class:`ChunkedSigLipLoss` - drop-ins for ``open_clip.ClipLoss`` /
  ``open_clip.SigLipLoss`` (regionmed_fast/nn/loss.py).
* :class:`RoIPoolFuse` - owns the gate parameters of :func:`regionmed_fast.ops.roi_pool_fuse`
  (regionmed_fast/nn/roi.py).
"""
from __future__ import annotations

from regionmed_fast._lazy import lazy_getattr

_EXPORTS = {
    "ChunkedClipLoss": "regionmed_fast.nn.loss",
    "ChunkedSigLipLoss": "regionmed_fast.nn.loss",
    "RoIPoolFuse": "regionmed_fast.nn.roi",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("regionmed_fast.nn", _EXPORTS)
