"""The CPU kernels' threaded paths (csrc/roi/roi_cpu.cpp): a loop is split over threads only above
a work threshold (2^17 multiply-adds, ``kParallelMinWork``'s default), which the small shapes of the
other tests stay under. Here: shapes above it as shipped, and the fuzzed problems with the
threshold at 0 (every loop split into one-item chunks), against torchvision, forward and backward,
and the backward bitwise equal across thread counts."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from roi_helpers import box_problems, check_fuzzed_problem, random_rois, require, tv_fuse, tv_nhwc

from regionmed_fast import _ext
from regionmed_fast.ops import roi_align, roi_pool_fuse
from regionmed_fast.testing import check_op

THREADS = 4  # more than the CI machine's 2 cores on purpose: chunks then interleave


@pytest.fixture
def threads():
    require("cpp")
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def always_parallel(threads):
    """Every CPU ROI loop split over the threads, one item per chunk."""
    mod, _ = _ext.load()
    before = mod._roi_set_parallel_min_work(0.0)
    yield
    mod._roi_set_parallel_min_work(before)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_above_the_parallel_threshold(threads, layout):
    """K=48 rois, C=192 (three 64-channel blocks), 14x14, S=7: every heavy loop of both ops is
    above the shipped threshold (the fused forward reads ~48 x 30 pixels x 192 channels)."""
    gen = torch.Generator().manual_seed(31)
    B, C, H, W, K, S = 4, 192, 14, 14, 48, 7
    shape = (B, C, H, W) if layout == "nchw" else (B, H, W, C)
    feats = torch.randn(*shape, generator=gen)
    rois = random_rois(K, B, H, W, 1 / 16, gen)
    glob, w, b = torch.randn(B, C, generator=gen), 0.1 * torch.randn(2, C, generator=gen), torch.randn(1)
    tv = (lambda f: torch.ops.torchvision.roi_align(f, rois, 1 / 16, S, S, 2, True)) if layout == "nchw" else (
        lambda f: tv_nhwc(f, rois, S, 1 / 16, 2, True))
    check_op(lambda f: roi_align(f, rois, S, 1 / 16, 2, True, layout, backend="cpp"), tv, [feats],
             name=f"roi_align {layout}")
    check_op(lambda f, g, ww, bb: roi_pool_fuse(f, rois, g, ww, bb, S, 1 / 16, -1, False, layout, backend="cpp"),
             lambda f, g, ww, bb: tv_fuse(f, rois, g, ww, bb, S, 1 / 16, -1, False, layout),
             [feats, glob, w, b], name=f"roi_pool_fuse {layout}")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_backward_bitwise_equal_across_thread_counts(always_parallel, layout):
    gen = torch.Generator().manual_seed(32)
    B, C, H, W, K = 3, 130, 9, 10, 40
    shape = (B, C, H, W) if layout == "nchw" else (B, H, W, C)
    feats = torch.randn(*shape, generator=gen)
    rois = random_rois(K, B, H, W, 1.0, gen)
    rois[::2, 0] = 1.0  # many rois on one image: the order of the scatter-adds matters
    glob, w, b = torch.randn(B, C, generator=gen), torch.randn(2, C, generator=gen), torch.randn(1)
    up_z, up_a = torch.randn(K, C, generator=gen), torch.randn(K, C, 3, 3, generator=gen)

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (feats, glob, w, b)]
        z = roi_pool_fuse(leaves[0], rois, *leaves[1:], 3, 1.0, -1, True, layout, backend="cpp")
        out = roi_align(leaves[0], rois, 3, 1.0, -1, True, layout, backend="cpp")
        return torch.autograd.grad((z * up_z).sum() + (out * up_a).sum(), leaves)

    parallel, again = grads(), grads()
    torch.set_num_threads(1)
    single = grads()
    for x, y, s in zip(parallel, again, single):
        assert torch.equal(x, y) and torch.equal(x, s)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=box_problems(), channels=st.sampled_from([1, 3, 64, 65, 130]))  # channel-block remainders
def test_fuzzed_boxes_every_loop_threaded(always_parallel, p, channels):
    check_fuzzed_problem("cpp", p, channels)
