"""The annotation-free region proposer (regionmed_fast/model/proposer.py): boxes inside the
image, a fixed count for every image, the NMS overlap bound, determinism, and that it finds a
bright blob planted in an image for a model whose saliency is known by construction."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from regionmed_fast.model import ProposerConfig, create_model, propose_from_saliency
from regionmed_fast.model.proposer import box_iou, nms_select, patch_saliency


def _check_boxes(boxes, counts, image_hw, cfg):
    H, W = image_hw
    assert boxes.dtype == torch.float32 and counts.dtype == torch.long
    assert boxes.shape == (counts.shape[0], cfg.num_boxes, 4)
    for b, n in zip(boxes, counts.tolist()):
        kept = b[:n]
        assert (kept[:, 0] >= 0).all() and (kept[:, 1] >= 0).all()
        assert (kept[:, 2] <= W).all() and (kept[:, 3] <= H).all()
        assert (kept[:, 2] > kept[:, 0]).all() and (kept[:, 3] > kept[:, 1]).all()
        assert not b[n:].any()  # padding rows are zeros
        for i, j in itertools.combinations(range(n), 2):
            assert box_iou(kept[i], kept[j]) <= cfg.iou_threshold + 1e-6, (kept[i], kept[j])


def test_planted_blob_is_the_first_box():
    sal = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    sal[0, 2:4, 5:7] += 1.0  # a 2x2-cell blob: pixels x 80..112, y 32..64 at 16 px per cell
    sal[1, 6:8, 0:1] += 1.0  # a 2x1 blob at the bottom-left border
    cfg = ProposerConfig(num_boxes=3)
    boxes, counts = propose_from_saliency(sal, (128, 128), cfg, patch_size=16)
    assert counts.tolist() == [3, 3]
    assert boxes[0, 0].tolist() == [80.0, 32.0, 112.0, 64.0]
    # boxes are squares of cells: on a 2x1 blob the best one is a cell of the blob
    assert boxes[1, 0].tolist() in ([0.0, 96.0, 16.0, 112.0], [0.0, 112.0, 16.0, 128.0])
    _check_boxes(boxes, counts, (128, 128), cfg)


@pytest.mark.parametrize("hw,grid,cfg", [
    ((128, 128), (8, 8), ProposerConfig()),
    ((96, 160), (6, 10), ProposerConfig(num_boxes=5, iou_threshold=0.1)),
    ((224, 224), (14, 14), ProposerConfig(num_boxes=4, min_size=40, max_fraction=0.4)),
    ((64, 64), (4, 4), ProposerConfig(num_boxes=2, iou_threshold=0.0)),
])
def test_inside_fixed_count_and_overlap_bound(hw, grid, cfg):
    g = torch.Generator().manual_seed(1)
    sal = torch.randn(6, *grid, generator=g)
    sal[1] = 0.0  # a flat map (a "normal" image): still the same number of boxes
    sal[2] = torch.arange(grid[0] * grid[1]).view(grid).float()  # a ramp
    boxes, counts = propose_from_saliency(sal, hw, cfg)
    assert counts.tolist() == [cfg.num_boxes] * 6
    _check_boxes(boxes, counts, hw, cfg)
    if cfg.min_size:
        sides = torch.minimum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
        assert (sides >= cfg.min_size - 1e-4).all()
    cell = min(hw[0] / grid[0], hw[1] / grid[1])
    assert ((boxes[..., 2] - boxes[..., 0]) <= cfg.max_fraction * min(grid) * cell + 1e-4).all()
    # deterministic: the same input gives the same boxes, bit for bit, also one image at a time
    again = propose_from_saliency(sal.clone(), hw, cfg)
    assert torch.equal(boxes, again[0]) and torch.equal(counts, again[1])
    one = propose_from_saliency(sal[3:4], hw, cfg)
    assert torch.equal(one[0][0], boxes[3])


def test_nms_ties_and_exhaustion():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [1, 1, 10, 10]])
    scores = torch.tensor([[1.0, 1.0, 0.5, 0.9]])
    keep, count = nms_select(boxes, scores, 0.5, 4)
    # equal scores: the lower index wins; its duplicate and the near-copy are suppressed
    assert count.tolist() == [2] and keep[0, :2].tolist() == [0, 2] and keep[0, 2:].tolist() == [0, 0]
    # a tiny grid cannot hold more non-overlapping boxes: fewer, never overlapping ones
    b, c = propose_from_saliency(torch.rand(1, 1, 1), (16, 16), ProposerConfig(num_boxes=3))
    assert c.tolist() == [1] and b[0, 0].tolist() == [0.0, 0.0, 16.0, 16.0]


def test_config_errors():
    for bad in ({"num_boxes": 0}, {"iou_threshold": 1.0}, {"max_fraction": 0.0},
                {"source": "magic"}, {"min_size": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ProposerConfig(**bad)
    with pytest.raises(ValueError, match="text_emb"):
        patch_saliency(torch.zeros(1, 2, 2, 4), torch.zeros(1, 4), "text")


class BrightnessTower(nn.Module):
    """An image tower whose saliency is known: each patch's feature is (brightness, 1 -
    brightness, 0, ...) of its pixels (mean over channels, mapped to [0, 1]); the pooled
    feature points along "bright". So cosine(patch, global) is highest on bright patches."""

    def __init__(self, width: int, patch_size: int = 16) -> None:
        super().__init__()
        self.width, self.patch_size = width, patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def forward(self, images):
        b = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), self.patch_size)[:, 0]
        b = (b - b.amin((1, 2), keepdim=True)) / (b.amax((1, 2), keepdim=True)
                                                 - b.amin((1, 2), keepdim=True) + 1e-6)
        grid = torch.zeros(*b.shape, self.width, device=images.device)
        grid[..., 0], grid[..., 1] = b, 1 - b
        pooled = torch.zeros(images.shape[0], self.width, device=images.device)
        pooled[:, 0] = 1.0
        return pooled, grid


@pytest.fixture(scope="module")
def known_model():
    torch.manual_seed(0)
    m = create_model("regionmed-tiny", text="tiny", embed_dim=192).eval()
    m.visual = BrightnessTower(m.visual.width)
    with torch.no_grad():
        m.image_proj.weight.copy_(torch.eye(192))
    return m


def _dark_image_with_blob(x0, y0, side, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, size, size, generator=g) * 0.2 - 1.5  # dark noise (normalised units)
    img[:, y0:y0 + side, x0:x0 + side] = 1.5
    return img


@pytest.mark.parametrize("source", ["global", "contrast"])
def test_model_proposer_finds_a_planted_blob(known_model, source):
    images = torch.stack([_dark_image_with_blob(70, 20, 20), _dark_image_with_blob(8, 90, 28, seed=1)])
    with torch.no_grad():
        boxes, counts = known_model.propose_boxes(images, source=source)
    assert counts.tolist() == [3, 3]
    for b, (x0, y0, side) in zip(boxes, ((70, 20, 20), (8, 90, 28))):
        x1, y1, x2, y2 = b[0].tolist()  # the first (best) box holds the blob's centre
        cx, cy = x0 + side / 2, y0 + side / 2
        assert x1 <= cx <= x2 and y1 <= cy <= y2, (b[0], (x0, y0, side))
        assert (x2 - x1) * (y2 - y1) <= 4 * 48 * 48  # a box about the blob, not the image


def test_encode_image_auto_uses_the_proposer(known_model):
    images = torch.stack([_dark_image_with_blob(70, 20, 20), torch.zeros(3, 128, 128)])
    with torch.no_grad():
        # perturb the RoI processor so region-aware differs from global
        for p in known_model.roi.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        auto = known_model.encode_image(images, boxes="auto")
        boxes, counts = known_model.propose_boxes(images)
        given = known_model.encode_image(images, boxes, box_counts=counts)
        glob = known_model.encode_image(images)
        feats = known_model.image_features(images)  # one tower pass shared by every call
        shared = known_model.encode_image(feats, boxes="auto")
        five = known_model.encode_image(images, boxes="auto", proposer={"num_boxes": 5})
        _, fused, regions, rb = known_model.encode_regions(images, "auto")
    assert torch.equal(auto, given) and torch.equal(auto, shared) and torch.equal(auto, fused)
    assert not torch.allclose(auto, glob)
    assert not torch.allclose(five, auto)
    assert rb.tolist() == [0, 0, 0, 1, 1, 1] and regions.shape == (6, 192)
    with pytest.raises(ValueError, match="'auto'"):
        known_model.encode_image(images, boxes="proposed")


def test_text_source_points_at_the_text(known_model):
    # "text" saliency: a text embedding along "dark" proposes the dark part, not the blob
    images = _dark_image_with_blob(0, 0, 64)[None]  # top-left quarter bright
    dark = torch.zeros(192)
    dark[1] = 1.0
    with torch.no_grad():
        boxes, _ = known_model.propose_boxes(images, source="text", text_emb=dark[None])
    x1, y1, x2, y2 = boxes[0, 0].tolist()
    assert x1 >= 64 or y1 >= 64


@pytest.mark.gpu
def test_cuda_proposals_equal_cpu(known_model):
    # integer-valued saliency: every sum is exact, so both devices must agree bit for bit
    g = torch.Generator().manual_seed(4)
    sal = torch.randint(0, 5, (4, 8, 8), generator=g).float()
    cfg = ProposerConfig(num_boxes=4)
    cpu = propose_from_saliency(sal, (128, 128), cfg)
    cuda = propose_from_saliency(sal.cuda(), (128, 128), cfg)
    assert torch.equal(cpu[0], cuda[0].cpu()) and torch.equal(cpu[1], cuda[1].cpu())
    images = torch.stack([_dark_image_with_blob(70, 20, 20), _dark_image_with_blob(8, 90, 28, seed=1)])
    m = known_model.cuda()
    try:
        with torch.no_grad():
            boxes, _ = m.propose_boxes(images.cuda())
            auto = m.encode_image(images.cuda(), boxes="auto")
        assert boxes.is_cuda and auto.shape == (2, 192)
    finally:
        known_model.cpu()
    with torch.no_grad():
        assert torch.equal(boxes.cpu(), known_model.propose_boxes(images)[0])
