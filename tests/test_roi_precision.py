"""bfloat16 / float16 accuracy of the ROI ops, forward and backward, on every backend.

The criterion is flash-attention's: on the same (rounded) inputs, our error against the float64
result may be at most ``K`` times the error of the plain reference computed in that dtype
(``roi_reference`` with ``compute_dtype=dtype``: bilinear sums, bin means and the gate in bf16 /
fp16, the sampling geometry in float32 as the kernels have it). A tolerance fixed in advance
would be either loose enough to hide a wrong sample weight or too tight for one rounding.
"""
from __future__ import annotations

import pytest
import torch
from roi_helpers import backend_params, interpreted, random_rois, require, small_shape

from regionmed_fast.ops import roi_align, roi_pool_fuse
from regionmed_fast.ops.roi_reference import roi_align_reference, roi_pool_fuse_reference

K_FACTOR = 2.0  # flash-attention's factor


def _max_err(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - exact.detach().double().cpu()).abs().max().item()


def _run(fn, inputs, upstream):
    """Outputs and input gradients of ``fn`` for the upstream gradient ``upstream``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return [out, *grads]


def _truncating_store(backend: str, dtype: torch.dtype) -> bool:
    """The Triton interpreter (triton 3.8) truncates float32 -> bfloat16 stores, whatever
    ``fp_downcast_rounding`` says; compiled Triton rounds to nearest. Kernel outputs written in
    bf16 under the interpreter may therefore be off by one more bf16 ulp (the same kernels are
    held to the plain criterion on a GPU, ``pytest -m gpu``)."""
    return interpreted(backend) and dtype == torch.bfloat16


def _assert_within(ours, lowp, exact, names, what, stored_lowp=(), truncating=False):
    problems = []
    for name, o, lp, ex in zip(names, ours, lowp, exact):
        err, ref_err = _max_err(o, ex), _max_err(lp, ex)
        # the small absolute term only matters when the dtype's reference happens to be exact
        bound = K_FACTOR * ref_err + 1e-5 * ex.abs().max().item()
        if truncating and name in stored_lowp:
            bound += torch.finfo(o.dtype).eps * ex.abs().max().item()
        if not err <= bound:
            problems.append(f"{what} {name}: max error {err:.3e} vs float64 > {K_FACTOR:g} x the reference's "
                            f"{ref_err:.3e} in the same dtype")
    assert not problems, "\n".join(problems)


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    require(request.param)
    return request.param


def _problem(backend: str, layout: str, seed: int):
    """Sizes, device, generator and the features' shape for ``layout``."""
    s = small_shape(backend)
    shape = (s["B"], s["C"], s["H"], s["W"]) if layout == "nchw" else (s["B"], s["H"], s["W"], s["C"])
    return s, require(backend), torch.Generator().manual_seed(seed), shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_roi_align_low_precision(backend, dtype, layout):
    s, dev, gen, shape = _problem(backend, layout, 21)
    B, C, H, W, K, S = s["B"], s["C"], s["H"], s["W"], s["K"], s["S"]
    feats = torch.randn(*shape, generator=gen).to(dev, dtype)
    rois = random_rois(K, B, H, W, 0.5, gen, device=dev)
    up = torch.randn(K, C, S, S + 1, generator=gen).to(dev, dtype)
    args = ((S, S + 1), 0.5, -1, True, layout)
    ours = _run(lambda f: roi_align(f, rois, *args, backend=backend), [feats], up)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    lowp = _run(lambda f: roi_align_reference(f, rois, *args, compute_dtype=dtype), [feats], up)
    exact = _run(lambda f: roi_align_reference(f, rois.double(), *args), [feats.double()], up.double())
    _assert_within(ours, lowp, exact, ["output", "grad features"], f"roi_align[{backend}, {dtype}]",
                   stored_lowp=("output",), truncating=_truncating_store(backend, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_roi_pool_fuse_low_precision(backend, dtype, layout):
    s, dev, gen, shape = _problem(backend, layout, 22)
    B, C, H, W, K, S = s["B"], s["C"], s["H"], s["W"], s["K"], s["S"]
    inputs = [torch.randn(*shape, generator=gen), torch.randn(B, C, generator=gen),
              0.5 * torch.randn(2, C, generator=gen), torch.randn(1, generator=gen)]
    inputs = [x.to(dev, dtype) for x in inputs]
    rois = random_rois(K, B, H, W, 1.0, gen, device=dev)
    up = torch.randn(K, C, generator=gen).to(dev, dtype)
    args = (S, 1.0, 2, False, layout)
    ours = _run(lambda *x: roi_pool_fuse(*x[:1], rois, *x[1:], *args, backend=backend), inputs, up)
    assert [t.dtype for t in ours] == [dtype] * 5
    lowp = _run(lambda *x: roi_pool_fuse_reference(*x[:1], rois, *x[1:], *args, compute_dtype=dtype), inputs, up)
    exact = _run(lambda *x: roi_pool_fuse_reference(*x[:1], rois.double(), *x[1:], *args),
                 [x.double() for x in inputs], up.double())
    _assert_within(ours, lowp, exact, ["z", "grad features", "grad global_feat", "grad gate_weight",
                                       "grad gate_bias"], f"roi_pool_fuse[{backend}, {dtype}]",
                   stored_lowp=("z",), truncating=_truncating_store(backend, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_criterion_catches_a_one_percent_gradient_error(dtype):
    """The bound is tight enough to fail a kernel whose gradient is 1 % off."""
    gen = torch.Generator().manual_seed(23)
    feats = torch.randn(2, 6, 9, 11, generator=gen).to(dtype)
    rois = random_rois(7, 2, 9, 11, 1.0, gen)
    up = torch.randn(7, 6, 3, 3, generator=gen).to(dtype)

    class OffByOnePercent(torch.autograd.Function):
        @staticmethod
        def forward(ctx, f):
            with torch.enable_grad():
                leaf = f.detach().requires_grad_(True)
                out = roi_align_reference(leaf, rois, 3, 1.0, 2, True)
            ctx.save_for_backward(leaf, out)
            return out.detach()

        @staticmethod
        def backward(ctx, g):
            leaf, out = ctx.saved_tensors
            (grad,) = torch.autograd.grad(out, leaf, g)
            return grad * 1.01

    ours = _run(OffByOnePercent.apply, [feats], up)
    lowp = _run(lambda f: roi_align_reference(f, rois, 3, 1.0, 2, True, compute_dtype=dtype), [feats], up)
    exact = _run(lambda f: roi_align_reference(f, rois.double(), 3, 1.0, 2, True), [feats.double()], up.double())
    _assert_within(ours[:1], lowp[:1], exact[:1], ["output"], "unchanged forward")
    with pytest.raises(AssertionError, match="grad features"):
        _assert_within(ours, lowp, exact, ["output", "grad features"], "1 % off")
