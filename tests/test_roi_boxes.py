"""Boxes are checked once, at the public op (``check_boxes``), and a box that is not checked has
one defined result on every backend: a NaN output row and no gradient (reversed corners follow
torchvision). The kernels themselves never read outside the features, whatever the box."""
from __future__ import annotations

import pytest
import torch
from roi_helpers import backend_params, random_rois, require, small_shape, tv_fuse, tv_nhwc

from regionmed_fast.ops import roi_align, roi_pool_fuse
from regionmed_fast.testing import assert_close, check_op

NAN = float("nan")
# (roi, error message of the check): every way a box can be invalid or malformed
BAD = [([0, 5.0, 1.0, 2.0, 3.0], "reversed corners"),
       ([0, 1.0, 4.0, 2.0, 3.0], "reversed corners"),
       ([3, 1.0, 1.0, 2.0, 3.0], "batch index 3, outside"),
       ([-1, 1.0, 1.0, 2.0, 3.0], "batch index -1"),
       ([0.5, 1.0, 1.0, 2.0, 3.0], "batch index 0.5"),
       ([0, NAN, 1.0, 2.0, 3.0], "NaN"),
       ([1, 1.0, 1.0, float("inf"), 3.0], "infinite"),
       ([NAN, 1.0, 1.0, 2.0, 3.0], "NaN")]
INVALID = [roi for roi, msg in BAD if "reversed" not in msg]


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    require(request.param)
    return request.param


def _problem(backend: str, seed: int):
    s = small_shape(backend)
    dev = require(backend)
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W = 3, s["C"], s["H"], s["W"]
    feats = torch.randn(B, H, W, C, generator=gen).to(dev)
    rois = random_rois(s["K"], B, H, W, 1.0, gen, device=dev)
    glob = torch.randn(B, C, generator=gen).to(dev)
    w = torch.randn(2, C, generator=gen).to(dev)
    b = torch.randn(1, generator=gen).to(dev)
    return s, dev, feats, rois, glob, w, b


@pytest.mark.parametrize("bad,match", BAD)
def test_checked_boxes_raise_naming_the_box(backend, bad, match):
    """check_boxes=True raises on every backend; on CPU tensors it is the default."""
    _, dev, feats, rois, glob, w, b = _problem(backend, 1)
    rois = torch.cat([rois, torch.tensor([bad], device=dev)])
    k = rois.shape[0] - 1
    kwargs = {} if dev == "cpu" else {"check_boxes": True}
    with pytest.raises(ValueError, match=f"box {k} has .*{match}"):
        roi_align(feats, rois, 2, layout="nhwc", backend=backend, **kwargs)
    with pytest.raises(ValueError, match=match):
        roi_pool_fuse(feats, rois, glob, w, b, 2, layout="nhwc", backend=backend, **kwargs)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_unchecked_invalid_boxes_give_nan_rows_and_no_gradient(backend):
    """The rows of valid boxes, and every gradient, are those of the valid boxes alone."""
    s, dev, feats, rois, glob, w, b = _problem(backend, 2)
    bad = torch.tensor(INVALID, device=dev)
    mixed = torch.cat([rois[:2], bad, rois[2:]])
    is_bad = torch.zeros(mixed.shape[0], dtype=torch.bool, device=dev)
    is_bad[2:2 + len(bad)] = True
    gen = torch.Generator().manual_seed(3)
    up_align = torch.randn(mixed.shape[0], feats.shape[3], 2, 2, generator=gen).to(dev)
    up_fuse = torch.randn(mixed.shape[0], feats.shape[3], generator=gen).to(dev)
    check_boxes = False if dev == "cpu" else None  # unchecked is the default on a GPU

    def run(r, ua, uf):
        leaves = [t.clone().requires_grad_(True) for t in (feats, glob, w, b)]
        out = roi_align(leaves[0], r, 2, 1.0, 2, True, "nhwc", check_boxes=check_boxes, backend=backend)
        z, r_, a = roi_pool_fuse(leaves[0], r, *leaves[1:], 2, 1.0, -1, False, "nhwc", return_parts=True,
                                 check_boxes=check_boxes, backend=backend)
        # the upstream gradient of a NaN row is finite: it must not reach any input
        grads = torch.autograd.grad((out * ua).sum() + (z * uf).sum(), leaves)
        return out, z, r_, a, grads

    out, z, r_, a, grads = run(mixed, up_align, up_fuse)
    for name, t in (("roi_align", out), ("z", z), ("r", r_), ("a", a)):
        assert torch.isnan(t[is_bad]).all(), f"{name}: invalid boxes must give NaN rows"
        assert not torch.isnan(t[~is_bad]).any(), f"{name}: a valid box got NaN"
    out_v, z_v, r_v, a_v, grads_v = run(mixed[~is_bad], up_align[~is_bad], up_fuse[~is_bad])
    assert_close(out[~is_bad], out_v, name="roi_align rows of valid boxes")
    assert_close(z[~is_bad], z_v, name="z rows of valid boxes")
    for name, g, g_v in zip(("features", "global_feat", "gate_weight", "gate_bias"), grads, grads_v):
        assert_close(g, g_v, name=f"grad {name} with invalid boxes in the batch")


def test_unchecked_reversed_corners_follow_torchvision(backend):
    s, dev, feats, rois, glob, w, b = _problem(backend, 4)
    rev = torch.tensor([[0, 5.0, 1.0, 2.0, 3.0], [1, 1.0, 4.0, 2.0, 3.0], [2, 4.0, 5.0, 1.0, 0.5]], device=dev)
    mixed = torch.cat([rois, rev])
    for aligned, sr in ((False, 2), (True, 2), (False, -1)):
        check_op(lambda f: roi_align(f, mixed, 2, 1.0, sr, aligned, "nhwc", check_boxes=False, backend=backend),
                 lambda f: tv_nhwc(f, mixed, 2, 1.0, sr, aligned), [feats], name=f"reversed, aligned={aligned}")
        check_op(lambda f, g, ww, bb: roi_pool_fuse(f, mixed, g, ww, bb, 2, 1.0, sr, aligned, "nhwc",
                                                    check_boxes=False, backend=backend),
                 lambda f, g, ww, bb: tv_fuse(f, mixed, g, ww, bb, 2, 1.0, sr, aligned, "nhwc"),
                 [feats, glob, w, b], name=f"fuse reversed, aligned={aligned}, sr={sr}")
    # aligned with adaptive sampling: a reversed box has no samples, so its bins are 0 (torchvision's
    # CUDA kernel gives 0 too; its CPU kernel fails to allocate a buffer of negative size)
    f = feats.clone().requires_grad_(True)
    out = roi_align(f, rev, 2, 1.0, -1, True, "nhwc", check_boxes=False, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    (g,) = torch.autograd.grad(out.sum(), f)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("counts", [(2, 2, 2), (3, 0, 1)])
def test_box_lists_equal_the_roi_tensor(counts):
    """Per-image [K_i, 4] lists (equal counts take the stacked path, others the per-image one)."""
    require("cpp")
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 4, 8, 9, generator=gen)
    rois = torch.cat([random_rois(n, 1, 8, 9, 1.0, gen) + torch.tensor([i, 0, 0, 0, 0.0])
                      for i, n in enumerate(counts)])
    boxes, start = [], 0
    for n in counts:
        boxes.append(rois[start:start + n, 1:])
        start += n
    assert torch.equal(roi_align(feats, boxes, 3, backend="cpp"), roi_align(feats, rois, 3, backend="cpp"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_path_never_synchronises(name):
    """Forward and backward with the default (unchecked) boxes make no host synchronisation."""
    dev = require(name)
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(4, 14 * 14, 32, generator=gen).to(dev).requires_grad_(True)
    rois = random_rois(12, 4, 224, 224, 1.0, gen, device=dev)
    glob, w, b = (torch.randn(4, 32, device=dev, requires_grad=True), torch.randn(2, 32, device=dev),
                  torch.zeros(1, device=dev))
    boxes = [rois[:3, 1:], rois[3:6, 1:], rois[6:9, 1:], rois[9:, 1:]]
    for bx in (rois, boxes):  # warm-up: first calls compile, load and allocate
        roi_pool_fuse(feats, bx, glob, w, b, 7, 1 / 16, 2, False, "nhwc", grid_size=(14, 14), backend=name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for bx in (rois, boxes):
            z = roi_pool_fuse(feats, bx, glob, w, b, 7, 1 / 16, 2, False, "nhwc", grid_size=(14, 14), backend=name)
            out = roi_align(feats, bx, 7, 1 / 16, 2, False, "nhwc", grid_size=(14, 14), backend=name)
            torch.autograd.grad(z.sum() + out.sum(), [feats, glob])
    finally:
        torch.cuda.set_sync_debug_mode("default")
