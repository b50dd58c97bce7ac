"""ChunkedClipLoss / ChunkedSigLipLoss as drop-ins for open_clip's losses (one process).

Constructor and call (every argument of the installed ``open_clip.ClipLoss`` / ``SigLipLoss``,
built through ``open_clip.create_loss`` itself), 0-d losses for a ``[1]`` logit scale on every
backend, fp32 accuracy against float64 measured against open_clip's own fp32 error, and the
float32 loss under bf16 autocast.
"""
from __future__ import annotations

import argparse
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from regionmed_fast.nn import ChunkedClipLoss, ChunkedSigLipLoss
from regionmed_fast.ops import chunked_clip_loss
from regionmed_fast.ops import loss as loss_mod
from regionmed_fast.testing import assert_close

open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
TRITON_OK = loss_mod.BACKENDS.status("triton", "cpu") == ""
BACKENDS = ["reference", "torch-full", "torch-tiled"] + (["triton"] if TRITON_OK else [])


def _features(n: int, d: int, seed: int, norm: bool = True, dtype=torch.float32):
    """Image / text features whose pairs are correlated (confident and unsure rows mixed);
    unnormalised: norms spread over ~e^{+-1.4}. fp32-representable, so a float64 run on the
    same values measures only the computation's error."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3 * x, dim=1)
    if not norm:
        x = x * torch.exp(0.7 * torch.randn(n, 1, generator=g, dtype=torch.float64))
        y = y * torch.exp(0.7 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    return x.float().to(dtype), y.float().to(dtype)


def _run(loss_fn, x, y, scale, bias=None, dtype=None):
    """``(loss, grad image, grad text, grad logit_scale[, grad logit_bias])`` as float64."""
    dtype = dtype or x.dtype
    xi, yi = x.to(dtype).clone().requires_grad_(True), y.to(dtype).clone().requires_grad_(True)
    s = scale.to(dtype).clone().requires_grad_(True)
    wrt = [xi, yi, s]
    args = [xi, yi, s]
    if bias is not None:
        b = bias.to(dtype).clone().requires_grad_(True)
        wrt.append(b)
        args.append(b)
    loss = loss_fn(*args)
    return [loss.detach().double()] + [g.double() for g in torch.autograd.grad(loss, wrt)]


# --- constructor and call --------------------------------------------------------------------

@pytest.mark.parametrize("ours,theirs", [(ChunkedClipLoss, "ClipLoss"), (ChunkedSigLipLoss, "SigLipLoss")])
def test_every_open_clip_argument_is_accepted_with_its_default(ours, theirs):
    theirs = getattr(open_clip.loss, theirs)
    for method in ("__init__", "forward"):
        mine = inspect.signature(getattr(ours, method)).parameters
        for name, p in inspect.signature(getattr(theirs, method)).parameters.items():
            assert name in mine, f"{ours.__name__}.{method} lacks open_clip's argument {name!r}"
            if p.default is not inspect.Parameter.empty:
                assert mine[name].default == p.default, f"{ours.__name__}.{method}({name}=) default differs"
            assert mine[name].kind in (p.kind, inspect.Parameter.POSITIONAL_OR_KEYWORD), name


def _create_loss_args(**kw) -> argparse.Namespace:
    """The attributes open_clip's ``create_loss`` reads from its training arguments."""
    base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False,
                rank=0, world_size=1, horovod=False, loss_dist_impl=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw", [
    {}, dict(local_loss=True), dict(gather_with_grad=True), dict(local_loss=True, gather_with_grad=True),
    dict(siglip=True), dict(siglip=True, loss_dist_impl="bidir"), dict(siglip=True, loss_dist_impl="shift"),
    dict(siglip=True, loss_dist_impl="reduce"), dict(siglip=True, loss_dist_impl="gather"),
])
def test_built_by_open_clip_create_loss_gives_open_clip_values(kw, monkeypatch):
    args = _create_loss_args(**kw)
    theirs = open_clip.create_loss(args)
    monkeypatch.setattr(open_clip.factory, "ClipLoss", ChunkedClipLoss)
    monkeypatch.setattr(open_clip.factory, "SigLipLoss", ChunkedSigLipLoss)
    ours = open_clip.create_loss(args)
    assert type(ours) is (ChunkedSigLipLoss if args.siglip else ChunkedClipLoss)
    if args.siglip:
        assert ours.dist_impl == theirs.dist_impl
    else:
        assert (ours.local_loss, ours.gather_with_grad, ours.cache_labels) == \
            (theirs.local_loss, theirs.gather_with_grad, theirs.cache_labels)
    x, y = _features(12, 8, 0)
    bias = torch.tensor(-3.0) if args.siglip else None
    got, want = [], []
    for fn, out in ((ours, got), (theirs, want)):
        res = fn(x, y, torch.tensor(10.0), bias, output_dict=True)
        assert set(res) == {"contrastive_loss"}
        out += _run(lambda *a, fn=fn: fn(*a, output_dict=True)["contrastive_loss"], x, y, torch.tensor(10.0), bias)
    for name, a, e in zip(("loss", "grad image", "grad text", "grad logit_scale", "grad logit_bias"), got, want):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=f"{kw} {name}")


def test_unsupported_values_raise_one_line():
    cases = [
        (lambda: ChunkedClipLoss(use_horovod=True), "use_horovod=True is not supported"),
        (lambda: ChunkedSigLipLoss(dist_impl="ring"), "dist_impl must be None or one of"),
        (lambda: ChunkedClipLoss(rank=2, world_size=2), "rank=2 is not below world_size=2"),
        (lambda: ChunkedClipLoss(world_size=0), "world_size must be an int >= 1"),
        (lambda: ChunkedClipLoss(world_size=2)(*_features(4, 4, 0), 1.0), "torch.distributed is not initialised"),
    ]
    for make, msg in cases:
        with pytest.raises((ValueError, RuntimeError), match=msg) as info:
            make()
        assert "\n" not in str(info.value)


# --- shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_loss_is_0d_for_a_one_element_logit_scale(backend, kind):
    """open_clip's ``nonscalar_logit_scale=True`` passes a ``[1]`` parameter."""
    x, y = _features(10, 8, 1)
    want = chunked_clip_loss(x.double(), y.double(), 10.0, -1.0, kind=kind, backend="reference")
    for shape in ((1,), (1, 1)):
        s = torch.full(shape, math.log(10.0), requires_grad=True)
        b = torch.full(shape, -1.0, requires_grad=True)
        loss = ChunkedClipLoss(kind=kind, backend=backend)(x, y, s.exp(), b)
        assert loss.shape == ()
        loss.backward()
        assert s.grad.shape == shape and b.grad.shape == shape
        assert_close(loss.double(), want, atol=1e-5, rtol=1e-5, name=f"{backend} {kind} {shape}")


# --- fp32 accuracy against float64, measured against open_clip's own ------------------------

def _error_ratio(impl, n, d, norm, scale, kind, seeds):
    """Per output, ``||ours_fp32 - f64|| / ||open_clip_fp32 - f64||`` pooled over ``seeds``."""
    if kind == "softmax":
        ref_fn = lambda x, y, s: open_clip.loss.ClipLoss()(x, y, s)  # noqa: E731
        ours_fn = lambda x, y, s: chunked_clip_loss(x, y, s, backend=impl)  # noqa: E731
        bias = None
    else:
        ref_fn = lambda x, y, s, b: open_clip.loss.SigLipLoss()(x, y, s, b)  # noqa: E731
        ours_fn = lambda x, y, s, b: chunked_clip_loss(x, y, s, b, kind="sigmoid", backend=impl)  # noqa: E731
        bias = torch.tensor(-5.0)
    k = 4 if bias is None else 5
    err_ours, err_theirs = [0.0] * k, [0.0] * k
    for seed in seeds:
        x, y = _features(n, d, seed, norm)
        s = torch.tensor(scale)
        exact = _run(ref_fn, x, y, s, bias, dtype=torch.float64)
        theirs = _run(ref_fn, x, y, s, bias)
        ours = _run(ours_fn, x, y, s, bias)
        for i in range(k):
            err_ours[i] += float((ours[i] - exact[i]).norm()) ** 2
            err_theirs[i] += float((theirs[i] - exact[i]).norm()) ** 2
    return [math.sqrt(a / max(b, 1e-300)) for a, b in zip(err_ours, err_theirs)]


@pytest.mark.parametrize("impl", ["torch-full", "torch-tiled"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_fp32_gradients_no_further_from_float64_than_2x_open_clip(impl, norm, kind):
    """The flash-attention criterion: features' and logit_scale's gradients (and the bias's
    for SigLIP) at logit_scale 1, 14.3 and 100, pooled over 64 seeds (one seed's scalar error is
    a coin toss: either may land close by chance)."""
    for scale in (1.0, 14.3, 100.0):
        ratios = _error_ratio(impl, 96, 32, norm, scale, kind, range(64))
        names = ("grad image", "grad text", "grad logit_scale", "grad logit_bias")
        for name, r in zip(names, ratios[1:]):
            assert r <= 2.0, f"{impl} {kind} norm={norm} scale={scale}: {name} error {r:.2f}x open_clip's"


# --- autocast -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_runs_the_loss_in_float32(backend):
    x, y = _features(12, 8, 2)
    lin = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa, ya = lin(x), lin(y)       # bf16 under autocast, as the towers give them
        assert xa.dtype == torch.bfloat16
        loss = chunked_clip_loss(xa, ya, torch.tensor(20.0), backend=backend)
    assert loss.dtype == torch.float32
    want = chunked_clip_loss(xa.float(), ya.float(), 20.0, backend="reference")
    assert_close(loss, want, atol=1e-5, rtol=1e-5, name=f"{backend} under autocast")
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32


# --- missing open_clip -----------------------------------------------------------------------

def test_bench_loss_without_open_clip_says_what_to_install(monkeypatch):
    import pathlib
    import sys

    from regionmed_fast.errors import MissingDependency

    bench = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
    monkeypatch.syspath_prepend(bench)
    import bench_loss

    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an install without it sees
    with pytest.raises(MissingDependency, match=r"needs the package 'open-clip-torch'.*"
                                                r"pip install 'regionmed-fast\[test\]'") as info:
        bench_loss.impls("cpu", "cpu")
    assert "\n" not in str(info.value)
