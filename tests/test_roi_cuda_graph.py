"""The GPU path of the ROI ops makes no host synchronisation, so forward and backward can be
captured in one ``torch.cuda.CUDAGraph`` and replayed with new boxes of the same count (the boxes
are then unchecked: check_boxes defaults to off on CUDA tensors). A synchronisation anywhere in
the ops makes the capture raise."""
from __future__ import annotations

import pytest
import torch
from roi_helpers import random_rois, require

from regionmed_fast.ops import roi_align, roi_pool_fuse
from regionmed_fast.testing import assert_close

B, C, GRID, PER_IMAGE, IMAGE = 4, 64, 14, 3, 224


def _step(name, feats, rois, glob, w, b, up):
    z = roi_pool_fuse(feats, rois, glob, w, b, 7, GRID / IMAGE, 2, False, "nhwc", grid_size=(GRID, GRID),
                      backend=name)
    bins = roi_align(feats, rois, 2, GRID / IMAGE, 2, True, "nhwc", grid_size=(GRID, GRID), backend=name)
    loss = (z.float() * up).sum() + bins.float().square().sum()
    return (z, bins, *torch.autograd.grad(loss, [feats, glob, w, b]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_forward_and_backward_replay_with_new_boxes(name, dtype):
    dev = require(name)
    gen = torch.Generator().manual_seed(41)
    feats = torch.randn(B, GRID * GRID, C, generator=gen).to(dev, dtype).requires_grad_(True)
    glob = torch.randn(B, C, generator=gen).to(dev, dtype).requires_grad_(True)
    w = (0.1 * torch.randn(2, C, generator=gen)).to(dev, dtype).requires_grad_(True)
    b = torch.zeros(1, device=dev, dtype=dtype, requires_grad=True)
    up = torch.randn(B * PER_IMAGE, C, generator=gen).to(dev)
    boxes = random_rois(B * PER_IMAGE, B, IMAGE, IMAGE, 1.0, gen, device=dev)
    boxes[:, 0] = torch.arange(B, device=dev).repeat_interleave(PER_IMAGE).float()
    args = (name, feats, boxes, glob, w, b, up)

    side = torch.cuda.Stream()  # warm-up on a side stream, as CUDA graph capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(*args)

    for seed in (42, 43):
        new = random_rois(B * PER_IMAGE, B, IMAGE, IMAGE, 1.0, torch.Generator().manual_seed(seed), device=dev)
        new[:, 0] = boxes[:, 0]
        boxes.copy_(new)
        graph.replay()
        expected = _step(*args)  # eager, same boxes
        torch.cuda.synchronize()
        for i, (got, want) in enumerate(zip(captured, expected)):
            # the backward scatters with atomics: same values up to the order of the additions
            assert_close(got, want, dtype=dtype if dtype != torch.float32 else None, name=f"replay {seed} [{i}]")
