"""The RoI processor: region tokens from the patch grid, and a region-aware image token.

For each box: ``roi_pool_fuse`` on the NHWC patch grid (RoIAlign mean over S x S bins, gated
blend with its image's global token; docs/design.md), plus a learned embedding of the box
geometry -> a region token. Then the image's global token attends (SDPA) over itself and its
region tokens -> the region-aware image token. Images with no boxes get their global token back
unchanged (the global path), and every parameter still takes part in the graph (DDP-safe).

Boxes are checked once, by the public op (``regionmed_fast.ops.roi_pool_fuse``: NaN/inf,
reversed corners, batch indices). The model only converts them, with two conversions that are
model semantics (docs/model.md): boxes are clamped to the image, and boxes smaller than
``RoIConfig.min_box`` are grown about their centre before pooling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from regionmed_fast.ops import roi_pool_fuse


@dataclass
class RoIConfig:
    """RoI processor settings. ``min_box``: boxes smaller than this many pixels per side are
    grown (about their centre) to it before pooling, so a 3-pixel lesion pools the patch it
    lies in rather than a blur of a quarter patch; ``None`` means the patch size, ``0`` turns
    it off. The geometry embedding always sees the true (clamped) box."""
    output_size: int = 2
    sampling_ratio: int = 2
    aligned: bool = True
    heads: int = 0  # 0: width // 64 (at least 1)
    mlp_ratio: float = 2.0
    min_box: float | None = None
    backend: str = "auto"


def roi_pool_fuse_nhwc(features: torch.Tensor, rois: torch.Tensor, global_feat: torch.Tensor,
                       gate_weight: torch.Tensor, gate_bias: torch.Tensor, *,
                       spatial_scale: float, output_size: int, sampling_ratio: int,
                       aligned: bool, backend: str = "auto") -> torch.Tensor:
    """``regionmed_fast.ops.roi_pool_fuse`` on an NHWC grid ``[B, h, w, C]`` with ``rois``
    ``[K, 5]`` -> fused region features ``[K, C]``."""
    dt = features.dtype  # the kernels take one dtype for the map, the global token and the gate
    return roi_pool_fuse(features, rois, global_feat.to(dt), gate_weight.to(dt), gate_bias.to(dt),
                         spatial_scale=spatial_scale, output_size=output_size,
                         sampling_ratio=sampling_ratio, aligned=aligned, layout="nhwc",
                         backend=backend)


def boxes_to_rois(boxes, batch_size: int, box_counts: torch.Tensor | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """Normalise the accepted box formats to ``rois`` float32 ``[K, 5]`` (batch index, x1, y1,
    x2, y2), image-major.

    ``boxes``: a list of ``[K_i, 4]`` tensors (one per image); a padded ``[B, Kmax, 4]`` tensor
    with ``box_counts`` ``[B]`` (``None``: every row is a box); or ``[K, 5]`` rois (any order:
    sorted by batch index here, stably). Only the layout is checked here; the coordinates and
    batch indices are checked once, by ``regionmed_fast.ops.roi_pool_fuse``.
    """
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != batch_size:
            raise ValueError(f"boxes is a list of {len(boxes)} tensors for {batch_size} images")
        parts = []
        for i, b in enumerate(boxes):
            b = torch.as_tensor(b, dtype=torch.float32, device=device)
            if b.numel() == 0:
                continue
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError(f"boxes[{i}] must be [K, 4], got {tuple(b.shape)}")
            parts.append(torch.cat([torch.full_like(b[:, :1], i), b], 1))
        return torch.cat(parts) if parts else torch.zeros(0, 5, device=device)
    boxes = torch.as_tensor(boxes, device=device).float()
    if boxes.ndim == 2 and boxes.shape[1] == 5:
        return boxes[torch.argsort(boxes[:, 0], stable=True)]
    if boxes.ndim != 3 or boxes.shape[2] != 4 or boxes.shape[0] != batch_size:
        raise ValueError(f"boxes must be [B={batch_size}, Kmax, 4], [K, 5] or a list, got "
                         f"{tuple(boxes.shape)}")
    kmax = boxes.shape[1]
    if box_counts is None:
        valid = torch.ones(batch_size, kmax, dtype=torch.bool, device=boxes.device)
    else:
        counts = torch.as_tensor(box_counts, device=boxes.device).long()
        if counts.shape != (batch_size,):
            raise ValueError(f"box_counts must be [B={batch_size}], got {tuple(counts.shape)}")
        # the batch format's counts, not box coordinates: a count past Kmax would silently
        # read padding as boxes
        if counts.numel() and bool((counts.min() < 0) | (counts.max() > kmax)):
            raise ValueError(f"box_counts must lie in [0, {kmax}], got {counts.tolist()}")
        valid = torch.arange(kmax, device=boxes.device)[None] < counts[:, None]
    bidx = torch.arange(batch_size, device=boxes.device, dtype=torch.float32)
    bidx = bidx[:, None, None].expand(batch_size, kmax, 1)
    return torch.cat([bidx, boxes], 2)[valid]


def clamp_rois(rois: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes clamped to the ``width x height`` image: a box partly outside pools the part
    inside (a defined result, no warning). Reversed or NaN boxes pass through unchanged, for
    the op to reject."""
    lo = rois.new_tensor([-float("inf"), 0, 0, 0, 0])  # the batch index column is left alone
    hi = rois.new_tensor([float("inf"), width, height, width, height])
    clamped = torch.minimum(torch.maximum(rois, lo), hi)
    reversed_ = (rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])
    return torch.where(reversed_[:, None], rois, clamped)


def grow_rois(rois: torch.Tensor, min_size: float, height: int, width: int) -> torch.Tensor:
    """Grow boxes to at least ``min_size`` pixels per side about their centre (kept inside).
    Reversed boxes (x2 < x1 or y2 < y1) are left as they are, for the op to reject."""
    if min_size <= 0 or rois.numel() == 0:
        return rois
    out = rois.clone()
    for lo, hi, limit in ((1, 3, width), (2, 4, height)):
        extent = rois[:, hi] - rois[:, lo]
        size = torch.where(extent < 0, extent, extent.clamp_min(min_size).clamp_max(float(limit)))
        c = (rois[:, hi] + rois[:, lo]) / 2
        start = (c - size / 2).clamp(0, None)
        start = torch.minimum(start, limit - size)
        out[:, lo], out[:, hi] = start, start + size
    return out


def box_geometry(rois: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[K, 6]`` features: centre, size and log-area (all relative to the image), aspect."""
    x1, y1, x2, y2 = rois[:, 1] / width, rois[:, 2] / height, rois[:, 3] / width, rois[:, 4] / height
    w, h = (x2 - x1).clamp_min(1e-4), (y2 - y1).clamp_min(1e-4)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, w, h, torch.log(w * h) / 4,
                        torch.log(w / h) / 2], 1)


class RegionAttention(nn.Module):
    """One pre-norm cross-attention block: the global token (query) attends over its image's
    tokens (global + regions, padded, masked), then an MLP; both residual, zero-initialised so
    the block starts as the identity on the global token."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"roi heads {heads} must divide the vision width {width}")
        self.heads = heads
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        for lin in (self.proj, self.mlp[2]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """query [B, C], tokens [B, N, C], valid bool [B, N] -> [B, C]."""
        B, N, C = tokens.shape
        d = C // self.heads
        q = self.q(self.norm_q(query)).view(B, 1, self.heads, d).transpose(1, 2)
        k, v = self.kv(self.norm_kv(tokens)).view(B, N, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        x = query + self.proj(o.transpose(1, 2).reshape(B, C))
        return x + self.mlp(self.norm_mlp(x))


class RoIProcessor(nn.Module):
    """``forward(grid [B, h, w, C], pooled [B, C], rois [K, 5], image_hw)`` ->
    ``(region tokens [K, C], region-aware image tokens [B, C])``.

    Owns the gate of ``roi_pool_fuse`` (``gate_weight`` [2, C], ``gate_bias`` [1]), the
    geometry MLP and the attention block. ``rois`` are in pixels of the input images.
    """

    def __init__(self, width: int, config: RoIConfig, patch_size: int = 16) -> None:
        super().__init__()
        self.config = config
        self.width = width
        self.min_box = float(patch_size if config.min_box is None else config.min_box)
        self.gate_weight = nn.Parameter(torch.zeros(2, width))
        self.gate_bias = nn.Parameter(torch.zeros(1))
        self.geometry = nn.Sequential(nn.Linear(6, width), nn.GELU(), nn.Linear(width, width))
        self.region_norm = nn.LayerNorm(width)
        heads = config.heads or max(1, width // 64)
        self.attn = RegionAttention(width, heads, config.mlp_ratio)

    def forward(self, grid: torch.Tensor, pooled: torch.Tensor, rois: torch.Tensor,
                image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        B, h, w, C = grid.shape
        H, W = image_hw
        c = self.config
        rois = clamp_rois(rois.float(), H, W)
        pool_rois = grow_rois(rois, self.min_box, H, W)
        z = roi_pool_fuse_nhwc(grid.contiguous(), pool_rois, pooled, self.gate_weight,
                               self.gate_bias, spatial_scale=h / H, output_size=c.output_size,
                               sampling_ratio=c.sampling_ratio, aligned=c.aligned,
                               backend=c.backend)
        geo = self.geometry(box_geometry(rois, H, W).to(z.dtype))
        tokens = self.region_norm(z + geo)  # [K, C]

        # pad the flat tokens into [B, Kmax, C] for the per-image attention
        bidx = rois[:, 0].long()
        counts = torch.bincount(bidx, minlength=B)
        kmax = int(counts.max()) if len(bidx) else 0
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(bidx), device=grid.device) - offsets[bidx]
        padded = tokens.new_zeros(B, kmax, C)
        padded = padded.index_put((bidx, pos), tokens)
        keys = torch.cat([pooled[:, None].to(tokens.dtype), padded], 1)
        valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=grid.device),
                           torch.arange(kmax, device=grid.device)[None] < counts[:, None]], 1)
        fused = self.attn(pooled.to(tokens.dtype), keys, valid)
        fused = torch.where((counts > 0)[:, None], fused, pooled.to(fused.dtype))
        return tokens, fused

