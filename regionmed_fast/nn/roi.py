"""``RoIPoolFuse``: the ROI processor's fused pooling + gated fusion as an ``nn.Module``."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from regionmed_fast.ops.roi import roi_pool_fuse

__all__ = ["RoIPoolFuse"]


class RoIPoolFuse(nn.Module):
    """Region features blended with the image's global feature by a learned scalar gate.

    Owns ``gate_weight [2, C]`` and ``gate_bias [1]`` of :func:`regionmed_fast.ops.roi_pool_fuse`;
    ``forward(features, boxes, global_feat)`` returns ``z [K, C]``. The gate starts at
    ``sigmoid(0) = 0.5`` (zero weights and bias): an even blend that training moves either way.

    Args:
        channels: ``C``, the feature width.
        output_size, spatial_scale, sampling_ratio, aligned, layout, check_boxes, backend: passed
            to the op.
    """

    def __init__(self, channels: int, output_size: int = 7, spatial_scale: float = 1.0,
                 sampling_ratio: int = -1, aligned: bool = False, layout: str = "nchw",
                 backend: str = "auto", check_boxes: bool | None = None) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"RoIPoolFuse: channels must be positive, got {channels}")
        self.channels = channels
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.layout = layout
        self.backend = backend
        self.check_boxes = check_boxes
        self.gate_weight = nn.Parameter(torch.zeros(2, channels))
        self.gate_bias = nn.Parameter(torch.zeros(1))

    def forward(self, features: Tensor, boxes: Tensor | Sequence[Tensor], global_feat: Tensor, *,
                grid_size: tuple[int, int] | None = None, return_parts: bool = False
                ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """``features`` in ``self.layout``, ``boxes`` ``[K, 5]`` or a list of ``[K_i, 4]``,
        ``global_feat [B, C]``; returns ``z [K, C]`` (or ``(z, r, a)``). The gate parameters are
        cast to the features' dtype (so bf16 autocast-free models work)."""
        w = self.gate_weight.to(features.dtype)
        b = self.gate_bias.to(features.dtype)
        return roi_pool_fuse(features, boxes, global_feat, w, b, self.output_size, self.spatial_scale,
                             self.sampling_ratio, self.aligned, self.layout, grid_size=grid_size,
                             return_parts=return_parts, check_boxes=self.check_boxes, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, layout={self.layout!r}, "
                f"check_boxes={self.check_boxes}, backend={self.backend!r}")
