"""Region proposals that need no annotation: boxes from the model's own patch saliency.

A saliency map on the patch grid ``[B, h, w]`` (from :func:`patch_saliency`) is turned into
boxes in three steps, all deterministic and batched:

1. candidates: every square of ``k x k`` patch cells at every grid position, for ``k`` from the
   smallest allowed size (``min_size`` pixels, default one patch) to ``max_fraction`` of the
   shorter grid side;
2. each candidate is scored centre minus surround: the mean saliency inside it minus the mean
   over the ring of cells around it (a box that fits a salient blob scores higher than one
   that is larger or smaller than the blob);
3. greedy non-maximum suppression: candidates by score (ties: smaller index first), a candidate
   is kept unless its IoU with a kept box exceeds ``iou_threshold``, until ``num_boxes`` are kept.

Every image gets the same number of boxes (``num_boxes``, unless the grid is too small to hold
that many under the overlap bound), whatever it shows: the count carries no information about
the image. See docs/model.md ("Regions without given boxes").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SOURCES = ("global", "contrast", "text")


@dataclass
class ProposerConfig:
    """Knobs of the region proposer (saved with the model; each can be overridden per call).

    ``num_boxes``: boxes per image. ``min_size``: smallest box side in pixels (``None``: one
    patch). ``max_fraction``: largest box side as a fraction of the shorter image side.
    ``iou_threshold``: the NMS overlap bound (kept boxes overlap at most this much, IoU).
    ``source``: the saliency (see :func:`patch_saliency`): ``"global"``, ``"contrast"`` or
    ``"text"`` (needs text embeddings at call time).
    """
    num_boxes: int = 3
    min_size: float | None = None
    max_fraction: float = 0.5
    iou_threshold: float = 0.3
    source: str = "global"

    def __post_init__(self) -> None:
        if not isinstance(self.num_boxes, int) or isinstance(self.num_boxes, bool) \
                or self.num_boxes < 1:
            raise ValueError(f"proposer num_boxes must be a positive int, got {self.num_boxes!r}")
        if self.min_size is not None and not self.min_size >= 0:
            raise ValueError(f"proposer min_size must be >= 0 pixels or None, got {self.min_size!r}")
        if not 0.0 < self.max_fraction <= 1.0:
            raise ValueError(f"proposer max_fraction must be in (0, 1], got {self.max_fraction!r}")
        if not 0.0 <= self.iou_threshold < 1.0:
            raise ValueError(f"proposer iou_threshold must be in [0, 1), got {self.iou_threshold!r}")
        if self.source not in SOURCES:
            raise ValueError(f"proposer source must be one of {SOURCES}, got {self.source!r}")


def patch_saliency(patches: torch.Tensor, image_emb: torch.Tensor, source: str = "global",
                   text_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Saliency of every patch, float32 ``[B, h, w]``.

    ``patches``: L2-normalised patch embeddings ``[B, h, w, D]`` (the patch grid through the
    image projection); ``image_emb``: the L2-normalised global embeddings ``[B, D]``.

    * ``"global"``: cosine of each patch with its image's global embedding (the patches that
      carry what the image embedding says);
    * ``"contrast"``: one minus the cosine with the image's mean patch direction (the patches
      least like the rest of the image);
    * ``"text"``: the best cosine of each patch over ``text_emb`` ``[T, D]`` (L2-normalised;
      for example class prompts: a task-level input, not a per-image annotation).
    """
    p = patches.float()
    if source == "global":
        return torch.einsum("bhwd,bd->bhw", p, image_emb.float())
    if source == "contrast":
        mean = F.normalize(p.mean(dim=(1, 2)), dim=-1)
        return 1.0 - torch.einsum("bhwd,bd->bhw", p, mean)
    if source == "text":
        if text_emb is None:
            raise ValueError("proposer source 'text' needs text_emb [T, D]")
        t = text_emb.float().reshape(-1, p.shape[-1])
        return torch.einsum("bhwd,td->bhwt", p, t).amax(dim=-1)
    raise ValueError(f"proposer source must be one of {SOURCES}, got {source!r}")


def _candidates(h: int, w: int, kmin: int, kmax: int, device) -> torch.Tensor:
    """Every ``k x k`` cell square, ``kmin <= k <= kmax``: int64 ``[N, 4]`` (y0, x0, y1, x1),
    end exclusive, ordered by size then row then column."""
    out = []
    for k in range(kmin, kmax + 1):
        ys, xs = torch.meshgrid(torch.arange(h - k + 1, device=device),
                                torch.arange(w - k + 1, device=device), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        out.append(torch.stack([ys, xs, ys + k, xs + k], 1))
    return torch.cat(out)


def _box_sums(integral: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Sums over cell boxes ``c`` [N, 4] (y0, x0, y1, x1) of each map: integral [B, h+1, w+1]
    -> [B, N]."""
    y0, x0, y1, x1 = c.unbind(1)
    return integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``a`` [..., 4] with boxes ``b`` [..., 4] (x1, y1, x2, y2, broadcast)."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp_min(1e-12)


def nms_select(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
               max_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS over candidates shared by a batch.

    ``boxes`` [N, 4] (x1, y1, x2, y2), ``scores`` [B, N]. Returns ``(index int64 [B, max_keep],
    count int64 [B])``: per image the kept candidates in the order chosen (rows past ``count``
    are 0). Equal scores go to the lower candidate index, so the result is deterministic.
    """
    B, N = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [B, N]
    sorted_boxes = boxes[order]  # [B, N, 4]
    alive = torch.ones(B, N, dtype=torch.bool, device=scores.device)
    keep = torch.zeros(B, max_keep, dtype=torch.long, device=scores.device)
    count = torch.zeros(B, dtype=torch.long, device=scores.device)
    rows = torch.arange(B, device=scores.device)
    for t in range(max_keep):
        has = alive.any(dim=1)
        first = alive.to(torch.uint8).argmax(dim=1)  # first alive in score order
        chosen = sorted_boxes[rows, first]  # [B, 4]
        keep[:, t] = torch.where(has, order[rows, first], keep[:, t])
        count += has.long()
        overlap = box_iou(sorted_boxes, chosen[:, None, :]) > iou_threshold
        overlap[rows, first] = True
        alive &= ~(overlap & has[:, None])
    return keep, count


def propose_from_saliency(saliency: torch.Tensor, image_hw: tuple[int, int],
                          config: ProposerConfig, patch_size: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes from a saliency map (see the module docstring).

    ``saliency`` float ``[B, h, w]``; ``image_hw`` the pixel size of the images the grid came
    from. Returns ``(boxes float32 [B, K, 4], counts int64 [B])`` with ``K = num_boxes``, in
    pixels (x1, y1, x2, y2) inside the image, on the saliency's device; rows past ``counts``
    are zeros.
    """
    if saliency.ndim != 3:
        raise ValueError(f"saliency must be [B, h, w], got {tuple(saliency.shape)}")
    B, h, w = saliency.shape
    H, W = image_hw
    cell_h, cell_w = H / h, W / w
    min_px = (patch_size or min(cell_h, cell_w)) if config.min_size is None else config.min_size
    kmin = max(1, math.ceil(min_px / min(cell_h, cell_w) - 1e-6))
    kmax = max(1, math.floor(config.max_fraction * min(h, w) + 1e-6))
    kmin = min(kmin, kmax, h, w)
    kmax = min(max(kmax, kmin), h, w)
    dev = saliency.device
    cells = _candidates(h, w, kmin, kmax, dev)
    s = saliency.float()
    integral = F.pad(s.cumsum(1).cumsum(2), (1, 0, 1, 0))  # [B, h+1, w+1]
    inner = _box_sums(integral, cells)
    inner_area = ((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])).float()
    outer = torch.stack([(cells[:, 0] - 1).clamp_min(0), (cells[:, 1] - 1).clamp_min(0),
                         (cells[:, 2] + 1).clamp_max(h), (cells[:, 3] + 1).clamp_max(w)], 1)
    outer_area = ((outer[:, 2] - outer[:, 0]) * (outer[:, 3] - outer[:, 1])).float()
    ring_area = outer_area - inner_area
    inner_mean = inner / inner_area
    ring_mean = torch.where(ring_area > 0, (_box_sums(integral, outer) - inner)
                            / ring_area.clamp_min(1), inner_mean)
    scores = inner_mean - ring_mean
    scale = torch.tensor([cell_w, cell_h, cell_w, cell_h], device=dev)
    px = cells[:, [1, 0, 3, 2]].float() * scale  # (x1, y1, x2, y2) pixels
    keep, counts = nms_select(px, scores, config.iou_threshold, config.num_boxes)
    boxes = px[keep]  # [B, K, 4]
    valid = torch.arange(config.num_boxes, device=dev)[None] < counts[:, None]
    return boxes.masked_fill(~valid[..., None], 0.0), counts
