"""chunked_clip_loss / ChunkedClipLoss against the full-logits reference and open_clip.

Tolerances: float64 uses the shared defaults (1e-9 abs, 1e-7 rel); float32 1e-5 / 1e-4 on the
loss and 1e-5 / 1e-4 on gradients (logit_scale gradients, sums over N*M terms, get 1e-4 abs);
bf16 inputs (computed in fp32, G stored in bf16 on the triton path) 2e-2 / 2e-2.
Triton runs in the interpreter on the CPU (N, M <= 40, D <= 24, 16 x 16 tiles).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regionmed_fast.nn import ChunkedClipLoss
from regionmed_fast.ops import chunked_clip_loss
from regionmed_fast.ops import loss as loss_mod
from regionmed_fast.ops.loss_reference import clip_loss_reference
from regionmed_fast.testing import assert_close, check_op

open_clip = pytest.importorskip("open_clip")
# the Triton interpreter evaluates log(0) = -inf for empty statistics through numpy, which warns
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
triton_ok = loss_mod.BACKENDS.status("triton", "cuda" if torch.cuda.is_available() else "cpu") == ""


def _inputs(n, m, d, dtype=torch.float64, seed=0, norm=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64)
    if norm:
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    return x.to(device, dtype), y.to(device, dtype)


def _ids(n, m, groups, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randint(0, groups, (n,), generator=g), torch.randint(0, groups, (m,), generator=g)


def _check(backend, n, m, d, *, dtype=torch.float64, kind="softmax", beta=0.0, ids=None,
           chunk=None, scale=10.0, bias=-2.0, tol=None, device="cpu"):
    x, y = _inputs(n, m, d, dtype, device=device)
    s = torch.tensor(scale, dtype=dtype, device=device)
    b = torch.tensor(bias, dtype=dtype, device=device)
    pos = None if ids is None else (ids[0].to(device), ids[1].to(device))

    def ours(x, y, s, b):
        return chunked_clip_loss(x, y, s, b, positives=pos, hard_negative_beta=beta, kind=kind,
                                 chunk_size=chunk, backend=backend)

    def ref(x, y, s, b):
        return clip_loss_reference(x, y, s, b, positives=pos, hard_negative_beta=beta, kind=kind)

    tol = tol or {}
    check_op(ours, ref, [x, y, s, b], name=f"{backend} {kind} beta={beta} {n}x{m}x{d} chunk={chunk}",
             **tol)


F32 = dict(dtype=torch.float32, atol=1e-5, rtol=1e-4, grad_atol=1e-4, grad_rtol=1e-4)
BF16 = dict(dtype=torch.bfloat16, atol=2e-2, rtol=2e-2)

CASES = [  # (n, m, d, kind, beta, groups, chunk)
    (8, 8, 4, "softmax", 0.0, None, None),
    (13, 13, 6, "softmax", 0.0, None, (4, 5)),
    (13, 13, 6, "softmax", 0.0, None, 1),
    (1, 1, 4, "softmax", 0.0, None, None),
    (13, 13, 6, "softmax", 0.5, None, (4, 5)),
    (11, 7, 5, "softmax", 0.0, 4, (3, 2)),
    (11, 7, 5, "softmax", 0.8, 4, (3, 4)),
    (11, 7, 5, "softmax", 0.8, 9, (5, 3)),      # some rows / columns without a positive
    (13, 13, 6, "sigmoid", 0.0, None, (4, 5)),
    (11, 7, 5, "sigmoid", 0.0, 4, (3, 4)),
    (1, 1, 3, "sigmoid", 0.0, None, None),
]


@pytest.mark.parametrize("n,m,d,kind,beta,groups,chunk", CASES)
def test_cpu_backend_matches_reference_float64(n, m, d, kind, beta, groups, chunk):
    ids = None if groups is None else _ids(n, m, groups)
    _check("cpu", n, m, d, kind=kind, beta=beta, ids=ids, chunk=chunk)


@pytest.mark.parametrize("n,m,d,kind,beta,groups,chunk", [c for c in CASES if c[0] > 1][:8:2] + [CASES[3], CASES[9]])
def test_cpu_backend_float32(n, m, d, kind, beta, groups, chunk):
    ids = None if groups is None else _ids(n, m, groups)
    _check("cpu", n, m, d, kind=kind, beta=beta, ids=ids, chunk=chunk, dtype=torch.float32, tol=F32)


def test_gradcheck_cpu_float64():
    x, y = _inputs(5, 4, 3)
    ids = (torch.tensor([0, 1, 1, 2, 0]), torch.tensor([1, 0, 2, 1]))
    for kw in (dict(hard_negative_beta=0.4), dict(kind="sigmoid")):
        args = [t.clone().requires_grad_(True) for t in (x, y, torch.tensor(3.0, dtype=torch.float64),
                                                         torch.tensor(0.5, dtype=torch.float64))]
        fn = lambda x, y, s, b: chunked_clip_loss(x, y, s, b, positives=ids, chunk_size=(2, 3),  # noqa: E731
                                                  backend="cpu", **kw)
        assert torch.autograd.gradcheck(fn, args)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 12), m=st.integers(1, 12), d=st.integers(1, 6), groups=st.integers(1, 5),
       beta=st.sampled_from([0.0, 0.3]), kind=st.sampled_from(["softmax", "sigmoid"]),
       cr=st.integers(1, 6), cc=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_random_shapes_cpu_vs_reference(n, m, d, groups, beta, kind, cr, cc, seed):
    ids = _ids(n, m, groups, seed)
    if kind == "softmax" and not bool((ids[0][:, None] == ids[1][None, :]).any()):
        with pytest.raises(ValueError, match="no image id matches"):
            chunked_clip_loss(*_inputs(n, m, d), 1.0, positives=ids, backend="cpu")
        return
    _check("cpu", n, m, d, kind=kind, beta=beta if kind == "softmax" else 0.0, ids=ids, chunk=(cr, cc))


def _loop_loss(s: torch.Tensor, pos: torch.Tensor, beta: float) -> torch.Tensor:
    """The softmax loss from its definition, one row at a time (docs/loss.md's formula)."""
    def direction(s, pos):
        terms = []
        for i in range(s.shape[0]):
            p, neg = s[i][pos[i]], s[i][~pos[i]]
            if p.numel() == 0:
                continue
            d = p.exp().sum()
            if neg.numel():
                w = neg.numel() * torch.exp(beta * neg) / torch.exp(beta * neg).sum()  # HN-NCE weights
                d = d + (w * neg.exp()).sum()
            terms.append(torch.log(d) - p.mean())
        return torch.stack(terms).mean()

    return 0.5 * (direction(s, pos) + direction(s.T, pos.T))


def test_reference_is_the_loss_of_its_definition():
    """The ground truth against independent writings: open_clip (diagonal) and a per-row loop
    (group ids, rows without a positive, HN-NCE); backend='reference' is this function."""
    x, y = _inputs(9, 9, 4)
    for kw, theirs in ((dict(), open_clip.loss.ClipLoss()(x, y, 7.0)),
                       (dict(kind="sigmoid"), open_clip.loss.SigLipLoss()(x, y, 7.0, -1.5))):
        assert_close(clip_loss_reference(x, y, 7.0, -1.5, **kw), theirs, name=f"reference {kw} vs open_clip")
    x, y = _inputs(9, 6, 4, seed=3)
    ids = _ids(9, 6, 4)
    pos = ids[0][:, None] == ids[1][None, :]
    assert not bool(pos.any(1).all()), "the case needs a row without a positive"
    for beta in (0.0, 0.7):
        want = _loop_loss(7.0 * x @ y.T, pos, beta)
        got = clip_loss_reference(x, y, 7.0, positives=ids, hard_negative_beta=beta)
        assert_close(got, want, name=f"reference beta={beta} vs the per-row loop")
        assert_close(chunked_clip_loss(x, y, 7.0, positives=ids, hard_negative_beta=beta, backend="reference"),
                     want, name="backend='reference'")


# --- open_clip ------------------------------------------------------------------------------

def test_matches_open_clip_cliploss_value_and_grads():
    x, y = _inputs(24, 24, 16, torch.float32)
    scale_param = torch.tensor(math.log(1 / 0.07))
    results = []
    for loss_fn in (open_clip.loss.ClipLoss(), ChunkedClipLoss(chunk_size=(5, 7)), ChunkedClipLoss()):
        xi, yi = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        p = scale_param.clone().requires_grad_(True)
        out = loss_fn(xi, yi, p.exp(), output_dict=True)
        out["contrastive_loss"].backward()
        results.append((out["contrastive_loss"].detach(), xi.grad, yi.grad, p.grad))
    for got in results[1:]:
        for name, a, e in zip(("loss", "image grad", "text grad", "logit_scale grad"), got, results[0]):
            assert_close(a, e, atol=1e-5, rtol=1e-4, name=name)


def test_matches_open_clip_sigliploss():
    x, y = _inputs(20, 20, 16, torch.float32)
    results = []
    for loss_fn in (open_clip.loss.SigLipLoss(), ChunkedClipLoss(kind="sigmoid", chunk_size=(6, 8))):
        xi, yi = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        s = torch.tensor(2.3).requires_grad_(True)
        b = torch.tensor(-10.0).requires_grad_(True)
        loss = loss_fn(xi, yi, s.exp(), b)
        loss.backward()
        results.append((loss.detach(), xi.grad, yi.grad, s.grad, b.grad))
    for name, a, e in zip(("loss", "image grad", "text grad", "scale grad", "bias grad"), *results):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=name)


# --- numerics and errors --------------------------------------------------------------------

def test_scale_100_unnormalised_inputs_do_not_overflow():
    x, y = _inputs(16, 16, 8, torch.float32, norm=False)
    x = x * 30.0  # logits reach ~1e4: any exp without a max shift overflows
    for kw in ({}, dict(hard_negative_beta=0.5), dict(kind="sigmoid")):
        for backend in ("cpu",) + (("triton",) if triton_ok else ()):
            ours = chunked_clip_loss(x, y, 100.0, 0.0, chunk_size=(5, 6), backend=backend, **kw)
            ref = clip_loss_reference(x.double(), y.double(), 100.0, 0.0, **kw)
            assert torch.isfinite(ours)
            assert_close(ours.double(), ref, atol=1e-2, rtol=1e-5, name=f"{backend} {kw}")


def test_bf16_cpu():
    _check("cpu", 16, 16, 8, dtype=torch.bfloat16, chunk=(5, 6), tol=BF16)
    _check("cpu", 12, 9, 8, dtype=torch.bfloat16, ids=_ids(12, 9, 3), beta=0.5, chunk=(5, 6), tol=BF16)


def test_auto_tiles_large_inputs_only():
    assert loss_mod._tile(None, "torch-tiled", 1024, 1024, 4) == (-(-1024 // torch.get_num_threads()), 1024)
    assert loss_mod._tile(None, "torch-tiled", 16384, 16384, 4) == loss_mod.loss_cpu.DEFAULT_TILE
    assert loss_mod._tile(7, "torch-tiled", 100, 100, 4) == (7, 7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_inputs_raise(bad):
    x, y = _inputs(6, 6, 4, torch.float32)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"image_emb has 1 NaN/Inf values \(first at index \[2, 1\]\)"):
        chunked_clip_loss(x, y, 10.0)
    with pytest.raises(ValueError, match="text_emb has 1 NaN/Inf"):
        chunked_clip_loss(y, x, 10.0)
    with pytest.raises(ValueError, match="logit_scale"):
        chunked_clip_loss(y, y, torch.tensor(bad))


def test_bad_arguments_raise_clear_errors():
    x, y = _inputs(6, 6, 4, torch.float32)
    cases = [
        ((x[0], y, 1.0), {}, ValueError, "image_emb must be 2-D"),
        ((x, y[:, :3], 1.0), {}, ValueError, "embedding sizes differ"),
        ((x, y.double(), 1.0), {}, TypeError, "image_emb is torch.float32 but text_emb is torch.float64"),
        ((x.long(), y.long(), 1.0), {}, TypeError, "image_emb must be float16"),
        ((x, y.to("meta"), 1.0), {}, ValueError, "text_emb is on meta"),
        ((x, y, torch.ones(2)), {}, ValueError, "logit_scale must have one element"),
        ((x, y, "1"), {}, TypeError, "logit_scale must be a number"),
        ((x, y[:5], 1.0), {}, ValueError, "needs N == M"),
        ((x, y, 1.0), dict(kind="hinge"), ValueError, "kind must be"),
        ((x, y, 1.0), dict(hard_negative_beta=-1.0), ValueError, "hard_negative_beta"),
        ((x, y, 1.0), dict(kind="sigmoid", hard_negative_beta=0.5), ValueError, "applies to kind='softmax' only"),
        ((x, y, 1.0), dict(chunk_size=0), ValueError, "chunk_size"),
        ((x, y, 1.0), dict(backend="cuda"), ValueError, "backend=.cuda. is not one of"),
        ((x, y, 1.0), dict(positives=(torch.zeros(6), torch.zeros(6))), TypeError, "integer tensor"),
        ((x, y, 1.0), dict(positives=(torch.zeros(5, dtype=torch.long), torch.zeros(6, dtype=torch.long))),
         ValueError, r"image_ids\) must have shape \[6\]"),
        ((x, y, 1.0), dict(positives=(torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long))),
         ValueError, "no image id matches"),
        ((x[:0], y[:0], 1.0), {}, ValueError, "image_emb is empty"),
    ]
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            chunked_clip_loss(*args, **kw)
    with pytest.raises(ValueError, match="horovod"):
        ChunkedClipLoss(use_horovod=True)


def test_noncontiguous_inputs_give_the_same_result():
    x, y = _inputs(8, 8, 6, torch.float64)
    xt, yt = x.T.contiguous().T, y.T.contiguous().T
    assert not xt.is_contiguous()
    assert_close(chunked_clip_loss(xt, yt, 5.0, backend="cpu"), clip_loss_reference(x, y, 5.0))


# --- triton (interpreter on the CPU, real kernels on a GPU) ----------------------------------

TRITON_CASES = [  # (n, m, d, kind, beta, groups, chunk)
    (40, 40, 24, "softmax", 0.0, None, None),
    (33, 21, 20, "softmax", 0.0, 5, (10, 0)),
    (33, 21, 20, "softmax", 0.6, 5, (17, 0)),
    (30, 30, 16, "sigmoid", 0.0, None, (13, 0)),
    (1, 1, 8, "softmax", 0.0, None, None),
]


@pytest.mark.skipif(not triton_ok, reason="triton not runnable here (no GPU and no TRITON_INTERPRET)")
@pytest.mark.parametrize("n,m,d,kind,beta,groups,chunk", TRITON_CASES)
def test_triton_backend_float32(n, m, d, kind, beta, groups, chunk):
    ids = None if groups is None else _ids(n, m, groups)
    chunk = None if chunk is None else (chunk[0], 1)
    _check("triton", n, m, d, kind=kind, beta=beta, ids=ids, chunk=chunk, dtype=torch.float32, tol=F32,
           device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not triton_ok, reason="triton not runnable here (no GPU and no TRITON_INTERPRET)")
def test_triton_backend_bf16():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _check("triton", 24, 24, 16, dtype=torch.bfloat16, tol=BF16, device=dev)
    _check("triton", 20, 14, 16, dtype=torch.bfloat16, ids=_ids(20, 14, 4), beta=0.5, tol=BF16, device=dev)


def test_triton_rejects_float64():
    if not triton_ok:
        pytest.skip("triton not runnable here")
    x, y = _inputs(4, 4, 4, device="cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TypeError, match="float64"):
        chunked_clip_loss(x, y, 1.0, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,beta,groups", [("softmax", 0.0, None), ("softmax", 0.5, 50), ("sigmoid", 0.0, None)])
def test_triton_gpu_large(dtype, kind, beta, groups):
    n = 1000
    ids = None if groups is None else _ids(n, n, groups)
    tol = F32 if dtype == torch.float32 else dict(dtype=torch.bfloat16, atol=2e-2, rtol=2e-2)
    _check("triton", n, n, 256, kind=kind, beta=beta, ids=ids, dtype=dtype, tol=tol, device="cuda",
           chunk=(300, 1))


@pytest.mark.gpu
def test_gpu_auto_picks_triton_and_matches_open_clip():
    x, y = _inputs(512, 512, 128, torch.float32, device="cuda")
    s = torch.tensor(50.0, device="cuda")
    assert_close(chunked_clip_loss(x, y, s), open_clip.loss.ClipLoss()(x, y, s), atol=1e-4, rtol=1e-4)
