"""Tests of the ROI ops (roi_align, roi_pool_fuse) on every backend.

Ground truth: ``torchvision.ops.roi_align`` (+ mean + gate for the fused op). Backends that cannot
run here skip with the reason; Triton runs in the CPU interpreter on tiny shapes only.
Tolerances: float32 and float64 use :data:`regionmed_fast.testing.TOLERANCES`; bfloat16 / float16
are tested in test_roi_precision.py (flash-attention's criterion), box checks and invalid boxes in
test_roi_boxes.py, tracing in test_roi_trace.py, the threaded CPU paths in test_roi_threads.py.
"""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from roi_helpers import (backend_params, box_problems, check_fuzzed_problem, device_of, random_rois,  # noqa: E402
                         require, small_shape, tv_fuse, tv_nhwc)

from regionmed_fast.nn import RoIPoolFuse  # noqa: E402
from regionmed_fast.ops import roi_align, roi_pool_fuse  # noqa: E402
from regionmed_fast.ops.roi import available_backends  # noqa: E402
from regionmed_fast.ops.roi_reference import roi_pool_fuse_reference  # noqa: E402
from regionmed_fast.testing import assert_close, check_op  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(params=backend_params())
def backend(request) -> str:
    require(request.param)
    return request.param


ALIGN_CASES = [(aligned, sr, scale, layout) for aligned in (False, True) for sr in (-1, 2)
               for scale in (1.0, 0.5) for layout in ("nchw", "nhwc")]


@pytest.mark.parametrize("aligned,sr,scale,layout", ALIGN_CASES)
def test_roi_align_matches_torchvision(backend, aligned, sr, scale, layout):
    s = small_shape(backend)
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(1)
    shape = (s["B"], s["C"], s["H"], s["W"]) if layout == "nchw" else (s["B"], s["H"], s["W"], s["C"])
    feats = torch.randn(*shape, generator=gen).to(dev)
    rois = random_rois(s["K"], s["B"], s["H"], s["W"], scale, gen, device=dev)
    size = (s["S"], s["S"] + 1)
    ref = (lambda f: torchvision.ops.roi_align(f, rois, size, scale, sr, aligned)) if layout == "nchw" else (
        lambda f: tv_nhwc(f, rois, size, scale, sr, aligned))
    check_op(lambda f: roi_align(f, rois, size, scale, sr, aligned, layout, backend=backend), ref, [feats],
             name=f"roi_align[{backend}]")


def test_roi_align_token_input(backend):
    """ViT tokens [B, H*W, C] with grid_size give the same result as [B, H, W, C]."""
    s = small_shape(backend)
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(s["B"], s["H"] * s["W"], s["C"], generator=gen).to(dev)
    rois = random_rois(s["K"], s["B"], s["H"], s["W"], 1.0, gen, device=dev)
    grid = tokens.view(s["B"], s["H"], s["W"], s["C"])
    check_op(lambda t: roi_align(t, rois, s["S"], 1.0, 2, True, "nhwc", grid_size=(s["H"], s["W"]), backend=backend),
             lambda t: tv_nhwc(t.view(grid.shape), rois, s["S"], 1.0, 2, True), [tokens],
             name=f"roi_align tokens[{backend}]")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_roi_pool_fuse_matches_torchvision(backend, layout):
    s = small_shape(backend)
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(3)
    B, C, H, W = s["B"], s["C"], s["H"], s["W"]
    shape = (B, C, H, W) if layout == "nchw" else (B, H, W, C)
    feats = torch.randn(*shape, generator=gen).to(dev)
    rois = random_rois(s["K"], B, H, W, 0.5, gen, device=dev)
    glob = torch.randn(B, C, generator=gen).to(dev)
    w = (0.3 * torch.randn(2, C, generator=gen)).to(dev)
    b = torch.randn(1, generator=gen).to(dev)
    for sr, aligned in ((2, True), (-1, False)):
        check_op(lambda f, g, w, b: roi_pool_fuse(f, rois, g, w, b, s["S"], 0.5, sr, aligned, layout, backend=backend),
                 lambda f, g, w, b: tv_fuse(f, rois, g, w, b, s["S"], 0.5, sr, aligned, layout),
                 [feats, glob, w, b], name=f"roi_pool_fuse[{backend}, sr={sr}, aligned={aligned}]")
    z, r, a = roi_pool_fuse(feats, rois, glob, w, b, s["S"], 0.5, 2, True, layout, return_parts=True, backend=backend)
    r_ref = torchvision.ops.roi_align(feats if layout == "nchw" else feats.permute(0, 3, 1, 2), rois, s["S"],
                                      0.5, 2, True).mean(dim=(2, 3))
    assert_close(r, r_ref, name="r")
    assert not r.requires_grad and a.shape == (s["K"],)


def test_reference_fuse_equals_torchvision_path():
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 5, 8, 7, generator=gen, dtype=torch.float64)
    rois = random_rois(6, 2, 8, 7, 1.0, gen, dtype=torch.float64)
    glob, w, b = (torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64),
                  torch.randn(1, dtype=torch.float64))
    check_op(lambda f, g, w, b: roi_pool_fuse_reference(f, rois, g, w, b, 3, 1.0, -1, True),
             lambda f, g, w, b: tv_fuse(f, rois, g, w, b, 3, 1.0, -1, True), [feats, glob, w, b],
             name="roi_pool_fuse_reference")


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_gradcheck_float64(name):
    if available_backends("cpu")[name] != "ok":
        pytest.skip(available_backends("cpu")[name])
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = random_rois(4, 2, 5, 6, 1.0, gen, dtype=torch.float64)
    torch.autograd.gradcheck(lambda f: roi_align(f, rois, 2, 1.0, -1, False, backend=name), (feats,))
    nhwc = feats.detach().permute(0, 2, 3, 1).contiguous().requires_grad_(True)
    torch.autograd.gradcheck(lambda f: roi_align(f, rois, (2, 3), 1.0, 2, True, "nhwc", backend=name), (nhwc,))
    g = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f, g, w, b: roi_pool_fuse(f, rois, g, w, b, 2, 1.0, 2, True, backend=name),
                             (feats, g, w, b))


# ---------------------------------------------------------------- fuzzed boxes

# The Triton interpreter is too slow for many examples: Triton is fuzzed on a GPU only.
FUZZ_BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.gpu),
                 pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("name", FUZZ_BACKENDS)
# Fewer examples where a GPU runs the fuzzing: the GPU check shares one short time budget.
@settings(max_examples=20 if torch.cuda.is_available() else 30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=box_problems())
def test_fuzzed_boxes(name, p):
    check_fuzzed_problem(name, p, channels=3)


# ---------------------------------------------------------------- edge cases and errors

def test_empty_boxes(backend):
    dev = device_of(backend)
    feats = torch.randn(2, 4, 5, 5, device=dev, requires_grad=True)
    out = roi_align(feats, torch.zeros(0, 5, device=dev), 2, backend=backend)
    assert out.shape == (0, 4, 2, 2)
    out.sum().backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    glob = torch.randn(2, 4, device=dev, requires_grad=True)
    w = torch.randn(2, 4, device=dev, requires_grad=True)
    b = torch.zeros(1, device=dev, requires_grad=True)
    z = roi_pool_fuse(feats, [torch.zeros(0, 4, device=dev)] * 2, glob, w, b, 2, backend=backend)
    assert z.shape == (0, 4)
    z.sum().backward()
    assert torch.equal(glob.grad, torch.zeros_like(glob)) and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_arguments_raise():
    feats = torch.randn(2, 3, 6, 6)
    rois = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]])
    with pytest.raises(TypeError, match="features dtype"):
        roi_align(feats.long(), rois, 2)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        roi_align(feats, rois[:, 1:], 2)
    with pytest.raises(ValueError, match="list of 1 tensors but features has batch 2"):
        roi_align(feats, [rois[:, 1:]], 2)
    with pytest.raises(ValueError, match="layout"):
        roi_align(feats, rois, 2, layout="hwc")
    with pytest.raises(ValueError, match="grid_size"):
        roi_align(torch.randn(2, 36, 3), rois, 2, layout="nhwc")
    with pytest.raises(ValueError, match="has 30 cells"):
        roi_align(torch.randn(2, 36, 3), rois, 2, layout="nhwc", grid_size=(5, 6))
    with pytest.raises(ValueError, match="boxes are on meta"):
        roi_align(feats, rois.to("meta"), 2)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(feats, rois, 0)
    with pytest.raises(ValueError, match=r"global_feat must have shape \(2, 3\)"):
        roi_pool_fuse(feats, rois, torch.randn(3, 3), torch.randn(2, 3), torch.randn(1))
    with pytest.raises(ValueError, match="gate_weight must have shape"):
        roi_pool_fuse(feats, rois, torch.randn(2, 3), torch.randn(3), torch.randn(1))
    with pytest.raises(ValueError, match="backend"):
        roi_align(feats, rois, 2, backend="numpy")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            roi_align(feats, rois, 2, backend="cuda")


def test_non_contiguous_inputs(backend):
    s = small_shape(backend)
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(6)
    B, C, H, W = s["B"], s["C"], s["H"], s["W"]
    base = torch.randn(B, W, H, C, generator=gen).to(dev)
    feats = base.permute(0, 3, 2, 1)  # NCHW view, not contiguous
    rois = torch.cat([random_rois(s["K"], B, H, W, 1.0, gen, device=dev), torch.zeros(s["K"], 1, device=dev)], 1)[:, :5]
    assert not feats.is_contiguous() and not rois.is_contiguous()
    check_op(lambda f: roi_align(f, rois, s["S"], 1.0, 2, False, backend=backend),
             lambda f: torchvision.ops.roi_align(f, rois, s["S"], 1.0, 2, False), [feats], name="non-contiguous")
    glob = torch.randn(C, B, generator=gen).to(dev).t()
    w = torch.randn(C, 2, generator=gen).to(dev).t()
    check_op(lambda f, g, w: roi_pool_fuse(f, rois, g, w, torch.zeros(1, device=dev), s["S"], 1.0, 2, False,
                                           backend=backend),
             lambda f, g, w: tv_fuse(f, rois, g, w, torch.zeros(1, device=dev), s["S"], 1.0, 2, False),
             [feats, glob, w], name="non-contiguous fuse")


# ---------------------------------------------------------------- registration, compile, determinism

def _cpu_only():
    if available_backends("cpu")["cpp"] != "ok":
        pytest.skip(available_backends("cpu")["cpp"])


def test_opcheck_registered_ops():
    _cpu_only()
    from regionmed_fast.ops import roi as roi_mod

    gen = torch.Generator().manual_seed(8)
    for cl in (False, True):
        shape = (2, 5, 6, 3) if cl else (2, 3, 5, 6)
        feats = torch.randn(*shape, generator=gen, requires_grad=True)
        rois = random_rois(4, 2, 5, 6, 1.0, gen)
        torch.library.opcheck(roi_mod._roi_align_op, (feats, rois, 1.0, 2, 3, 2, True, cl, "cpp"))
        grad = torch.randn(4, 3, 2, 3, generator=gen)
        torch.library.opcheck(roi_mod._roi_align_backward_op, (grad, rois, 1.0, 2, 3, 2, 3, 5, 6, 2, True, cl, "cpp"))
        glob = torch.randn(2, 3, generator=gen, requires_grad=True)
        w = torch.randn(2, 3, generator=gen, requires_grad=True)
        b = torch.randn(1, generator=gen, requires_grad=True)
        # r and a are not differentiable outputs; their autograd check is done through z in the other tests.
        torch.library.opcheck(roi_mod._roi_pool_fuse_op, (feats, rois, glob, w, b, 1.0, 2, -1, False, cl, "cpp"),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        _, r, a = roi_mod._roi_pool_fuse_op(feats.detach(), rois, glob.detach(), w.detach(), b.detach(), 1.0, 2, -1,
                                            False, cl, "cpp")
        torch.library.opcheck(roi_mod._roi_pool_fuse_backward_op,
                              (torch.randn(4, 3, generator=gen), rois, glob.detach(), w.detach(), r, a, 1.0, 2, -1,
                               False, cl, 2, 5, 6, "cpp"))


def test_cpu_backward_deterministic():
    """Two runs, and 1 vs all threads, give bitwise equal gradients (no atomics, fixed order)."""
    _cpu_only()
    gen = torch.Generator().manual_seed(10)
    feats = torch.randn(4, 9, 10, 70, generator=gen)
    rois = random_rois(40, 4, 9, 10, 1.0, gen)
    rois[:, 0] = 1.0  # many rois on one image: the scatter-add order matters
    glob, w, b = torch.randn(4, 70, generator=gen), torch.randn(2, 70, generator=gen), torch.randn(1, generator=gen)
    up = torch.randn(40, 70, generator=gen)

    def grads():
        f = feats.clone().requires_grad_(True)
        z = roi_pool_fuse(f, rois, glob, w, b, 3, 1.0, -1, True, "nhwc", backend="cpp")
        (gz,) = torch.autograd.grad((z * up).sum(), f)
        f2 = feats.clone().requires_grad_(True)
        out = roi_align(f2, rois, 3, 1.0, -1, True, "nhwc", backend="cpp")
        (ga,) = torch.autograd.grad(out.sum(), f2)
        return gz, ga

    first, second = grads(), grads()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = grads()
    finally:
        torch.set_num_threads(threads)
    for x, y, s in zip(first, second, single):
        assert torch.equal(x, y) and torch.equal(x, s)


def test_roipoolfuse_module():
    m = RoIPoolFuse(3, output_size=2, backend="auto")
    assert m.gate_weight.shape == (2, 3) and m.gate_bias.shape == (1,)
    feats = torch.randn(2, 3, 6, 6)
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)]
    z = m(feats, boxes, torch.randn(2, 3))
    assert z.shape == (1, 3)
    z.sum().backward()
    assert m.gate_weight.grad is not None and m.gate_bias.grad is not None
    assert "channels=3" in repr(m)


@pytest.mark.slow
def test_cuda_sources_compile():
    """The ROI CUDA sources compile, link and register with nvcc on a GPU-less machine
    (scripts/check_cuda_build.sh, ~3 min). Opt-in: ``pytest -m slow``; scripts/test.sh already
    compiles them through ``FORCE_CUDA=1`` when nvcc is present."""
    script = os.path.join(REPO, "scripts", "check_cuda_build.sh")
    if not (os.path.exists("/usr/local/cuda/bin/nvcc") or subprocess.run(["which", "nvcc"],
                                                                        capture_output=True).returncode == 0):
        pytest.skip("nvcc not found")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
