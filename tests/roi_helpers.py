"""Shared pieces of the ROI op tests (tests/test_roi*.py): the backend fixture, devices, shapes,
random boxes and the torchvision paths the ops are compared with."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import strategies as st

from regionmed_fast.ops import roi_align, roi_pool_fuse
from regionmed_fast.ops.roi import available_backends
from regionmed_fast.testing import check_op

torchvision = pytest.importorskip("torchvision")

BACKENDS = ("reference", "cpp", "triton", "cuda")
# One fixed Triton config on a GPU too: the tests check results, not tuning (and stay short).
os.environ.setdefault("REGIONMED_TRITON_AUTOTUNE", "0")


def device_of(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def interpreted(backend: str) -> bool:
    return backend == "triton" and device_of(backend) == "cpu"


def backend_params(names=BACKENDS) -> list:
    """Backends as pytest params; those that run on the GPU carry the ``gpu`` marker so that
    ``pytest -m gpu`` (benchmarks/gpu_check.sh) selects them."""
    on_gpu = torch.cuda.is_available()
    return [pytest.param(b, marks=[pytest.mark.gpu] if b == "cuda" or (b == "triton" and on_gpu) else [], id=b)
            for b in names]


def require(backend: str) -> str:
    """Skip (with the reason) when ``backend`` cannot run here; returns its device."""
    dev = device_of(backend)
    reason = available_backends(dev)[backend]
    if reason != "ok":
        pytest.skip(f"backend {backend} unavailable: {reason}")
    return dev


def small_shape(backend: str) -> dict:
    # The Triton interpreter costs ~5 ms per program step: tiny shapes only.
    if interpreted(backend):
        return dict(B=2, C=4, H=6, W=6, K=3, S=2)
    return dict(B=3, C=6, H=9, W=11, K=7, S=3)


def random_rois(K: int, B: int, H: int, W: int, scale: float, gen: torch.Generator, dtype=torch.float32,
                device="cpu") -> torch.Tensor:
    """Boxes in image coordinates (the map times 1/scale), some partly outside the map."""
    ih, iw = H / scale, W / scale
    xy = torch.rand(K, 2, generator=gen) * torch.tensor([iw + 2, ih + 2]) - 1
    wh = torch.rand(K, 2, generator=gen) * torch.tensor([iw, ih]) * 0.6
    b = torch.randint(0, B, (K, 1), generator=gen).float()
    return torch.cat([b, xy, xy + wh], 1).to(dtype=dtype, device=device)


def tv_nhwc(features, rois, size, scale, sr, aligned):
    return torchvision.ops.roi_align(features.permute(0, 3, 1, 2), rois, size, scale, sr, aligned)


def tv_fuse(features, rois, global_feat, w, b, S, scale, sr, aligned, layout="nchw"):
    """torchvision's roi_align + mean over bins + the gate: the fused op written out."""
    f = features if layout == "nchw" else features.permute(0, 3, 1, 2)
    r = torchvision.ops.roi_align(f, rois, S, scale, sr, aligned).mean(dim=(2, 3))
    g = global_feat[rois[:, 0].long()]
    a = torch.sigmoid(r @ w[0] + g @ w[1] + b)
    return a[:, None] * r + (1 - a[:, None]) * g


# ---------------------------------------------------------------- fuzzed boxes

def _box(draw, H: int, W: int, reversed_ok: bool):
    kinds = ["inside", "outside", "partial", "zero", "subpixel", "line"] + (["reversed"] if reversed_ok else [])
    kind = draw(st.sampled_from(kinds))
    x1 = draw(st.floats(-3, W + 3, allow_nan=False))
    y1 = draw(st.floats(-3, H + 3, allow_nan=False))
    if kind == "zero":
        return [x1, y1, x1, y1]
    if kind == "subpixel":
        return [x1, y1, x1 + draw(st.floats(0, 0.9)), y1 + draw(st.floats(0, 0.9))]
    if kind == "line":
        return [x1, y1, x1 + draw(st.floats(0, W)), y1]
    if kind == "outside":
        return [W + 2 + abs(x1), H + 2 + abs(y1), W + 5 + abs(x1), H + 6 + abs(y1)]
    if kind == "partial":
        return [-4.0, y1, x1 + 2, y1 + 3]
    if kind == "reversed":
        return [x1, y1, x1 - draw(st.floats(0, 3)), y1 - draw(st.floats(0, 3))]
    return [x1, y1, x1 + draw(st.floats(0, W)), y1 + draw(st.floats(0, H))]


@st.composite
def box_problems(draw):
    """Random problems for the fuzz tests: map sizes 1..7, 0..3 boxes per image of every kind."""
    B = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    counts = [draw(st.integers(0, 3)) for _ in range(B)]  # images with no boxes, K = 0
    sr, aligned = draw(st.sampled_from([-1, 1, 2])), draw(st.booleans())
    # reversed boxes pass unchecked only; torchvision's CPU kernel cannot take them with
    # aligned=True and adaptive sampling (docs/roi.md)
    reversed_ok = sr > 0 or not aligned
    boxes = [[_box(draw, H, W, reversed_ok) for _ in range(n)] for n in counts]
    return dict(B=B, H=H, W=W, boxes=boxes, S=draw(st.integers(1, 3)), sr=sr, aligned=aligned,
                layout=draw(st.sampled_from(["nchw", "nhwc"])), as_list=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def check_fuzzed_problem(name: str, p: dict, channels: int) -> None:
    """Both ops on backend ``name`` against torchvision, forward and backward, for one problem
    of :func:`box_problems` (boxes unchecked: reversed ones follow torchvision)."""
    dev = require(name)
    C = channels
    gen = torch.Generator().manual_seed(p["seed"])
    B, H, W = p["B"], p["H"], p["W"]
    shape = (B, C, H, W) if p["layout"] == "nchw" else (B, H, W, C)
    feats = torch.randn(*shape, generator=gen).to(dev)
    per_image = [torch.tensor(b, dtype=torch.float32, device=dev).reshape(-1, 4) for b in p["boxes"]]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=dev), b], 1)
                      for i, b in enumerate(per_image)])
    boxes = per_image if p["as_list"] else rois
    S, sr, aligned, layout = p["S"], p["sr"], p["aligned"], p["layout"]
    tv = (lambda f: torchvision.ops.roi_align(f, rois, S, 1.0, sr, aligned)) if layout == "nchw" else (
        lambda f: tv_nhwc(f, rois, S, 1.0, sr, aligned))
    check_op(lambda f: roi_align(f, boxes, S, 1.0, sr, aligned, layout, check_boxes=False, backend=name), tv,
             [feats], name=f"roi_align[{name}]")
    glob, w, b = (torch.randn(B, C, generator=gen).to(dev), torch.randn(2, C, generator=gen).to(dev),
                  torch.randn(1, generator=gen).to(dev))
    check_op(lambda f, g, w, b: roi_pool_fuse(f, boxes, g, w, b, S, 1.0, sr, aligned, layout, check_boxes=False,
                                              backend=name),
             lambda f, g, w, b: tv_fuse(f, rois, g, w, b, S, 1.0, sr, aligned, layout),
             [feats, glob, w, b], name=f"roi_pool_fuse[{name}]")
