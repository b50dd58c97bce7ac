"""pytest-benchmark micro benchmarks of the ROI ops on small CPU shapes (history-friendly).

    python -m pytest benchmarks/test_bench_roi.py --benchmark-only [--benchmark-autosave]

Not part of the test suite (testpaths = tests); bench_roi.py is the full comparison.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_roi import make_boxes, torchvision_path  # noqa: E402

from regionmed_fast.ops import roi_pool_fuse  # noqa: E402
from regionmed_fast.ops.roi import available_backends  # noqa: E402

B, C, H, W, PER_IMAGE, S, SR, IMAGE = 4, 128, 14, 14, 8, 7, 2, 224


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(B, H * W, C, generator=gen)
    rois = make_boxes(B, PER_IMAGE, IMAGE, gen)
    glob, w, b = torch.randn(B, C, generator=gen), 0.02 * torch.randn(2, C, generator=gen), torch.zeros(1)
    up = torch.randn(rois.shape[0], C, generator=gen)
    return feats, rois, glob, w, b, up


def _fwd_bwd(fn, feats, glob, w, b, up):
    leaves = [t.detach().clone().requires_grad_(True) for t in (feats, glob, w, b)]
    z = fn(*leaves)
    return torch.autograd.grad((z * up).sum(), leaves)


@pytest.mark.parametrize("impl", ["torchvision", "reference", "cpp"])
def test_roi_pool_fuse_fwd_bwd(benchmark, problem, impl):
    pytest.importorskip("torchvision")
    feats, rois, glob, w, b, up = problem
    if impl == "torchvision":
        def fn(f, g, ww, bb):
            return torchvision_path(f.view(B, H, W, C), rois, g, ww, bb, S, H / IMAGE, SR, "nhwc")
    else:
        if available_backends("cpu")[impl] != "ok":
            pytest.skip(available_backends("cpu")[impl])

        def fn(f, g, ww, bb):
            return roi_pool_fuse(f, rois, g, ww, bb, S, H / IMAGE, SR, False, "nhwc", grid_size=(H, W), backend=impl)
    grads = benchmark(_fwd_bwd, fn, feats, glob, w, b, up)
    assert grads[0].shape == feats.shape
