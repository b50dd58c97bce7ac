"""Plain PyTorch references of the ROI ops: the ground truth every backend is tested against.

:func:`roi_align_reference` reproduces ``torchvision.ops.roi_align`` (same sampling grid, same
bilinear clamping rules) for NCHW and NHWC inputs, in float32 (float64 for float64 inputs) for
any input dtype. :func:`roi_pool_fuse_reference` is the fused op of docs/roi.md written out with
it. Both are differentiable through ordinary autograd; they favour clarity over speed and memory
(they gather one ``[K * S * S * samples, C]`` tensor per bilinear corner). An invalid roi (a
non-finite coordinate, a batch index that is not an integer in ``[0, B)``) gives NaN outputs and
no gradient, as in every backend.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["roi_align_reference", "roi_pool_fuse_reference", "as_rois", "valid_rois", "to_nhwc", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the ROI ops: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rois(boxes: Tensor | Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``[K, 5]`` rois (batch index, x1, y1, x2, y2) from a ``[K, 5]`` tensor or a list of
    per-image ``[K_i, 4]`` tensors (torchvision's two box formats). No validation here, and no
    host synchronisation (the counts come from the shapes)."""
    if isinstance(boxes, Tensor):
        rois = boxes
    else:
        boxes = list(boxes)
        if not boxes:
            raise ValueError("boxes: an empty list has no device or dtype; pass a [0, 5] tensor")
        n = boxes[0].shape[0]
        if all(b.shape[0] == n and b.dtype == boxes[0].dtype for b in boxes):  # 3 launches, not 2B + 1
            stacked = torch.stack(boxes)  # [B, n, 4]
            idx = torch.arange(len(boxes), device=stacked.device, dtype=stacked.dtype)
            rois = torch.cat([idx.view(-1, 1, 1).expand(-1, n, 1), stacked], dim=2).reshape(-1, 5)
        else:
            parts = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
            rois = torch.cat(parts, dim=0)
    return rois if dtype is None else rois.to(dtype)


def valid_rois(rois: Tensor, batch: int) -> Tensor:
    """``[K]`` bool: the roi's coordinates are finite and its batch index is an integer in
    ``[0, batch)`` (computed on the rois' device, no host synchronisation)."""
    idx = rois[:, 0]
    return torch.isfinite(rois).all(dim=1) & (idx >= 0) & (idx < batch) & (idx == idx.floor())


def to_nhwc(features: Tensor, layout: str, grid_size: tuple[int, int] | None) -> Tensor:
    """``[B, H, W, C]`` view of ``features`` given in ``layout`` (``nchw`` is permuted)."""
    if layout == "nchw":
        return features.permute(0, 2, 3, 1)
    if features.dim() == 3:
        if grid_size is None:
            raise ValueError("features is [B, H*W, C]: pass grid_size=(H, W)")
        h, w = grid_size
        return features.reshape(features.shape[0], h, w, features.shape[2])
    return features


def _sample_grid(start: Tensor, bin_size: Tensor, grid: Tensor, n_bins: int, n_max: int) -> tuple[Tensor, Tensor]:
    """Sample coordinates ``[K, n_bins, n_max]`` along one axis and which of them are real
    (rois with fewer adaptive samples than ``n_max`` mask the rest)."""
    dev, dt = start.device, start.dtype
    p = torch.arange(n_bins, device=dev, dtype=dt).view(1, -1, 1)
    i = torch.arange(n_max, device=dev, dtype=dt).view(1, 1, -1)
    g = grid.to(dt).clamp(min=1).view(-1, 1, 1)
    # Same operation order as torchvision, so float32 coordinates round identically.
    coord = start.view(-1, 1, 1) + p * bin_size.view(-1, 1, 1) + (i + 0.5) * bin_size.view(-1, 1, 1) / g
    valid = torch.arange(n_max, device=dev).view(1, 1, -1) < grid.view(-1, 1, 1)
    return coord, valid.expand_as(coord)


def _corners(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torchvision's clamping: returns (inside, low, high, low weight, high weight)."""
    inside = (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0)
    low = c.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    return inside, low, high, 1 - frac, frac


def _bins(features_nhwc: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
          sampling_ratio: int, aligned: bool, compute_dtype: torch.dtype | None = None) -> Tensor:
    """RoIAlign bins ``[K, PH, PW, C]`` of valid rois (``rois`` already sanitised). The geometry
    is in the accumulation dtype; the feature arithmetic in ``compute_dtype`` (default: the same)."""
    geo = acc_dtype(features_nhwc.dtype)
    acc = compute_dtype or geo
    B, H, W, C = features_nhwc.shape
    PH, PW = output_size
    rois = rois.to(geo)
    K = rois.shape[0]
    if K == 0:
        # Tied to the features (an empty sum) so that backward still reaches them, with zeros.
        return features_nhwc.new_zeros((0, PH, PW, C), dtype=acc) + features_nhwc.flatten()[:0].sum().to(acc)
    off = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - off, rois[:, 2] * spatial_scale - off
    roi_w, roi_h = rois[:, 3] * spatial_scale - off - x1, rois[:, 4] * spatial_scale - off - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_h, bin_w = roi_h / PH, roi_w / PW
    if sampling_ratio > 0:
        gh = torch.full((K,), sampling_ratio, dtype=torch.long, device=rois.device)
        gw = gh
    else:
        gh, gw = torch.ceil(roi_h / PH).long(), torch.ceil(roi_w / PW).long()
    gh, gw = gh.clamp(min=0), gw.clamp(min=0)
    nh, nw = max(int(gh.max()), 1), max(int(gw.max()), 1)
    y, vy = _sample_grid(y1, bin_h, gh, PH, nh)  # [K, PH, nh]
    x, vx = _sample_grid(x1, bin_w, gw, PW, nw)  # [K, PW, nw]
    in_y, y_lo, y_hi, wy_lo, wy_hi = _corners(y, H)
    in_x, x_lo, x_hi, wx_lo, wx_hi = _corners(x, W)
    count = (gh * gw).clamp(min=1).to(geo).view(K, 1, 1, 1, 1)
    keep = ((vy & in_y)[:, :, :, None, None] & (vx & in_x)[:, None, None, :, :]).to(geo) / count
    flat = features_nhwc.reshape(B * H * W, C)
    base = (rois[:, 0].long() * (H * W)).view(K, 1, 1, 1, 1)
    out = None
    for yi, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for xi, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            idx = base + (yi * W)[:, :, :, None, None] + xi[:, None, None, :, :]  # [K, PH, nh, PW, nw]
            w = (wy[:, :, :, None, None] * wx[:, None, None, :, :] * keep).to(acc)
            vals = flat.index_select(0, idx.reshape(-1)).to(acc).view(*idx.shape, C)
            term = (vals * w.unsqueeze(-1)).sum(dim=(2, 4))
            out = term if out is None else out + term
    return out


def _sanitised(rois: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """The rois with every invalid one replaced by a harmless box on image 0, and the valid mask."""
    valid = valid_rois(rois, batch)
    return torch.where(valid[:, None], rois, torch.zeros_like(rois)), valid


def roi_align_reference(features: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
                        spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
                        layout: str = "nchw", *, grid_size: tuple[int, int] | None = None,
                        compute_dtype: torch.dtype | None = None) -> Tensor:
    """RoIAlign exactly as ``torchvision.ops.roi_align``, for ``[B, C, H, W]`` (``nchw``) or
    ``[B, H, W, C]`` / ``[B, H*W, C]`` (``nhwc``) features of any float dtype.

    Returns ``[K, C, PH, PW]`` in the features' dtype (computed in float32, float64 for float64;
    ``compute_dtype`` sets the dtype of the feature arithmetic, which the tests use to measure
    what plain low-precision arithmetic loses). Invalid rois give NaN rows.
    """
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    f = to_nhwc(features, layout, grid_size)
    rois, valid = _sanitised(as_rois(boxes), f.shape[0])
    bins = _bins(f, rois, size, spatial_scale, sampling_ratio, aligned, compute_dtype)
    bins = torch.where(valid.view(-1, 1, 1, 1), bins, torch.full_like(bins, float("nan")))
    return bins.permute(0, 3, 1, 2).to(features.dtype)


def roi_pool_fuse_reference(features: Tensor, boxes: Tensor | Sequence[Tensor], global_feat: Tensor,
                            gate_weight: Tensor, gate_bias: Tensor, output_size: int = 7,
                            spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
                            layout: str = "nchw", *, grid_size: tuple[int, int] | None = None,
                            return_parts: bool = False, compute_dtype: torch.dtype | None = None
                            ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The fused op of docs/roi.md in plain PyTorch: ``r`` = mean of the S x S RoIAlign bins, gate
    ``a = sigmoid(<w0, r> + <w1, g> + b)``, ``z = a r + (1 - a) g`` with ``g = global_feat[b_k]``.

    Returns ``z [K, C]`` in the features' dtype, or ``(z, r, a)`` with ``r [K, C]`` and ``a [K]``
    in the accumulation dtype (``compute_dtype``: as :func:`roi_align_reference`). Invalid rois
    give NaN rows of ``z``, ``r`` and ``a`` and no gradient.
    """
    f = to_nhwc(features, layout, grid_size)
    rois, valid = _sanitised(as_rois(boxes), f.shape[0])
    acc = compute_dtype or acc_dtype(features.dtype)
    r = _bins(f, rois, (output_size, output_size), spatial_scale, sampling_ratio, aligned, compute_dtype)
    r = r.mean(dim=(1, 2))
    g = global_feat.to(acc).index_select(0, rois[:, 0].long())
    w = gate_weight.to(acc)
    a = torch.sigmoid(r @ w[0] + g @ w[1] + gate_bias.to(acc).reshape(()))
    z = a[:, None] * r + (1 - a[:, None]) * g
    nan = torch.tensor(float("nan"), dtype=acc, device=r.device)
    z, r, a = (torch.where(valid[:, None], z, nan), torch.where(valid[:, None], r, nan),
               torch.where(valid, a, nan))
    z = z.to(features.dtype)
    return (z, r, a) if return_parts else z
