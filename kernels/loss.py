"""Triton kernels of the chunked CLIP / SigLIP loss (the ``triton`` backend).

Same contract as ``regionmed_fast/ops/loss_cpu.py`` (``t_ij = scale * <x_i, y_j>``):

* ``softmax_stats``: ONE pass over the logits tiles gives both directions. A program owns a
  block of rows and walks every column tile: the rows' log-sum-exps merge in registers, and
  the tile's column log-sum-exps are written to a ``[row blocks, M]`` partial buffer (one
  float per 128 logits), reduced by a logsumexp afterwards. HN-NCE keeps three statistics.
* ``softmax_grads`` / ``sigmoid_grads``: recompute the logits tile by tile (flash style),
  write ``G = dL/dt`` for a chunk of rows into a buffer of the input dtype, and let cuBLAS do
  ``G @ Y`` and ``G.T @ X`` (tensor cores in bf16/fp16, fp32 accumulation). Embedding sizes of
  CLIP (512-1024) are too wide for an ``[rows, D]`` register accumulator, which is why the two
  gradient GEMMs are not fused: fusing them would recompute the logits once per D block.
* Inputs fp16 / bf16 / fp32; every dot accumulates in fp32; fp32 inputs use ``tf32x3`` dots
  (fp32-accurate logits; plain tf32 would err by ~0.1 at logit_scale 100).

Under ``TRITON_INTERPRET=1`` (CPU tests) the autotuner cannot run, so each kernel gets one fixed
small config there.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Rows per program of the forward kernels; fixed (not tuned) because the size of the column
#: partial buffer depends on it.
FWD_BN = 16 if _INTERPRET else 128
#: Bytes of the backward ``G`` buffer when ``chunk_size`` does not say (per chunk of rows).
BWD_BUFFER_BYTES = 128 * 2**20
# The interpreter's tl.dot gets bf16 operands wrong (it multiplies their raw bits): upcast there.
_UPCAST = tl.constexpr(_INTERPRET)


def _fill_partials(nargs) -> None:
    # Slots of splits that a config does not use keep what an earlier (autotuning) launch wrote:
    # reset them to the reduction's identity before every launch.
    if "ROWS" in nargs:
        nargs["ROWS"].fill_(float("-inf"))
    else:
        nargs["OUT"].zero_()


def _configs(fwd: bool):
    """Candidates per kernel; the GPU check has ~2 minutes for every benchmark, compiles included.

    Forward: ``SPLIT`` programs share a row block's columns, so that ``cdiv(n, FWD_BN)`` row
    blocks (128 at B = 16384) still fill the GPU several programs per multiprocessor deep.
    """
    if _INTERPRET:
        return None
    if fwd:  # BN is fixed (FWD_BN)
        shapes = [(64, 64, 4, 3, 1), (128, 64, 8, 3, 1), (64, 64, 4, 3, 2), (64, 64, 4, 3, 4),
                  (128, 64, 8, 3, 2), (128, 64, 8, 3, 4), (128, 32, 8, 4, 4), (64, 32, 4, 4, 8)]
        return [triton.Config({"BM": bm, "BK": bk, "SPLIT": sp}, num_warps=w, num_stages=st,
                              pre_hook=_fill_partials)
                for bm, bk, w, st, sp in shapes]
    # (128, 128, 64) with 4 warps and BN = 256 spill under HN-NCE on sm_90 (check_triton_compile)
    shapes = [(128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4),
              (128, 256, 64, 8, 3)]
    return [triton.Config({"BN": bn, "BM": bm, "BK": bk}, num_warps=w, num_stages=st)
            for bn, bm, bk, w, st in shapes]


def _tune(kernel, fwd: bool):
    cfgs = _configs(fwd)
    if cfgs is None:
        return kernel
    # Keyed on D (and HN-NCE), and for the forward on the power of two above the row count (the
    # best split depends on how many row blocks there are): a batch size, its last chunk or a
    # region count that varies from step to step does not re-tune.
    key = ["d"] + (["n_key"] if fwd else []) + (["HARD"] if "HARD" in kernel.arg_names else [])
    return triton.autotune(configs=cfgs, key=key)(kernel)


#: Column splits per row block in the interpreter (no autotuning there): more than one, so that
#: the CPU tests cover the merge of split partials.
_INTERPRET_SPLIT = 2
#: Most splits a forward config may use (size of the row-partial buffer).
MAX_SPLIT = 8


def _n_key(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


@triton.jit
def _tile_logits(X, Y, rows, cols, rmask, cmask, d, sxn, syn, scale,
                 BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, d, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < d
        xt = tl.load(X + rows[:, None] * sxn + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        yt = tl.load(Y + cols[:, None] * syn + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if _UPCAST:
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=PREC)
    return acc * scale


@triton.jit
def _lse_rows(v):
    mx = tl.max(v, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.sum(tl.exp(v - mx[:, None]), 1))


@triton.jit
def _lse_cols(v):
    mx = tl.max(v, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.sum(tl.exp(v - mx[None, :]), 0))


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _softmax_stats_kernel(X, Y, SCALE, GI, GT, ROWS, COLS, n, m, d, beta, sxn, syn, nblocks, n_key,
                          HARD: tl.constexpr, PREC: tl.constexpr,
                          BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    # ROWS: [MAX_SPLIT, k, n] row partials (split sp in slot sp); COLS: [k, nblocks, m]
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    per = tl.cdiv(tl.cdiv(m, SPLIT), BM) * BM
    c_lo = sp * per
    c_hi = tl.minimum(m, c_lo + per)
    rows = pid * BN + tl.arange(0, BN)
    rmask = rows < n
    scale = tl.load(SCALE)
    ninf = float("-inf")
    r0 = tl.full((BN,), ninf, tl.float32)
    r1 = tl.full((BN,), ninf, tl.float32)
    r2 = tl.full((BN,), ninf, tl.float32)
    if HARD:
        gi = tl.load(GI + rows, mask=rmask, other=-1)
    for c0 in range(c_lo, c_hi, BM):
        cols = c0 + tl.arange(0, BM)
        cmask = cols < c_hi
        t = _tile_logits(X, Y, rows, cols, rmask, cmask, d, sxn, syn, scale, BN, BM, BK, PREC)
        valid = rmask[:, None] & cmask[None, :]
        if HARD:
            gt = tl.load(GT + cols, mask=cmask, other=-2)
            pos = gi[:, None] == gt[None, :]
            va = tl.where(valid & pos, t, ninf)
            vb = tl.where(valid & (~pos), (1.0 + beta) * t, ninf)
            vc = tl.where(valid & (~pos), beta * t, ninf)
            r0 = _logaddexp(r0, _lse_rows(va))
            r1 = _logaddexp(r1, _lse_rows(vb))
            r2 = _logaddexp(r2, _lse_rows(vc))
            tl.store(COLS + pid * m + cols, _lse_cols(va), mask=cmask)
            tl.store(COLS + (nblocks + pid) * m + cols, _lse_cols(vb), mask=cmask)
            tl.store(COLS + (2 * nblocks + pid) * m + cols, _lse_cols(vc), mask=cmask)
        else:
            v = tl.where(valid, t, ninf)
            r0 = _logaddexp(r0, _lse_rows(v))
            tl.store(COLS + pid * m + cols, _lse_cols(v), mask=cmask)
    if HARD:
        base = ROWS + sp * 3 * n
        tl.store(base + rows, r0, mask=rmask)
        tl.store(base + n + rows, r1, mask=rmask)
        tl.store(base + 2 * n + rows, r2, mask=rmask)
    else:
        tl.store(ROWS + sp * n + rows, r0, mask=rmask)


@triton.jit
def _softmax_grad_kernel(X, Y, SCALE, GI, GT, RS, CS, G, n, m, d, beta, sxn, syn, total_n,
                         HARD: tl.constexpr, PREC: tl.constexpr,
                         BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BM + tl.arange(0, BM)
    rmask = rows < n
    cmask = cols < m
    scale = tl.load(SCALE)
    t = _tile_logits(X, Y, rows, cols, rmask, cmask, d, sxn, syn, scale, BN, BM, BK, PREC)
    # masked shifts are +inf, so padded rows / columns contribute exp(-inf) = 0
    a0 = tl.load(RS + rows, mask=rmask, other=float("inf"))
    e0 = tl.load(CS + cols, mask=cmask, other=float("inf"))
    if HARD:
        gi = tl.load(GI + rows, mask=rmask, other=-1)
        gt = tl.load(GT + cols, mask=cmask, other=-2)
        pos = gi[:, None] == gt[None, :]
        a1 = tl.load(RS + total_n + rows, mask=rmask, other=float("inf"))
        a2 = tl.load(RS + 2 * total_n + rows, mask=rmask, other=float("inf"))
        e1 = tl.load(CS + m + cols, mask=cmask, other=float("inf"))
        e2 = tl.load(CS + 2 * m + cols, mask=cmask, other=float("inf"))
        hb = (1.0 + beta) * t
        bb = beta * t
        on_pos = tl.exp(t - a0[:, None]) + tl.exp(t - e0[None, :])
        on_neg = (1.0 + beta) * (tl.exp(hb - a1[:, None]) + tl.exp(hb - e1[None, :])) \
            - beta * (tl.exp(bb - a2[:, None]) + tl.exp(bb - e2[None, :]))
        g = tl.where(pos, on_pos, on_neg)
    else:
        g = tl.exp(t - a0[:, None]) + tl.exp(t - e0[None, :])
    g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
    tl.store(G + rows[:, None] * m + cols[None, :], g.to(G.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _sigmoid_sum_kernel(X, Y, SCALE, BIAS, OUT, n, m, d, sxn, syn, nblocks, n_key, PREC: tl.constexpr,
                        BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    # OUT: [MAX_SPLIT, nblocks] partial sums
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    per = tl.cdiv(tl.cdiv(m, SPLIT), BM) * BM
    c_lo = sp * per
    c_hi = tl.minimum(m, c_lo + per)
    rows = pid * BN + tl.arange(0, BN)
    rmask = rows < n
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BM):
        cols = c0 + tl.arange(0, BM)
        cmask = cols < c_hi
        v = _tile_logits(X, Y, rows, cols, rmask, cmask, d, sxn, syn, scale, BN, BM, BK, PREC) + bias
        soft = tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v)))
        acc += tl.sum(tl.where(rmask[:, None] & cmask[None, :], soft, 0.0), 1)
    tl.store(OUT + sp * nblocks + pid, tl.sum(acc, 0))


@triton.jit
def _sigmoid_grad_kernel(X, Y, SCALE, BIAS, G, n, m, d, sxn, syn, coef, PREC: tl.constexpr,
                         BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BM + tl.arange(0, BM)
    rmask = rows < n
    cmask = cols < m
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    v = _tile_logits(X, Y, rows, cols, rmask, cmask, d, sxn, syn, scale, BN, BM, BK, PREC) + bias
    g = coef / (1.0 + tl.exp(-v))
    tl.store(G + rows[:, None] * m + cols[None, :], g.to(G.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


_softmax_stats = _tune(_softmax_stats_kernel, fwd=True)
_softmax_grad = _tune(_softmax_grad_kernel, fwd=False)
_sigmoid_sum = _tune(_sigmoid_sum_kernel, fwd=True)
_sigmoid_grad = _tune(_sigmoid_grad_kernel, fwd=False)
_FIXED_FWD = {"BM": 16, "BK": 16, "SPLIT": _INTERPRET_SPLIT} if _INTERPRET else {}
_FIXED_BWD = {"BN": 16, "BM": 16, "BK": 16} if _INTERPRET else {}


def _splits() -> int:
    return _INTERPRET_SPLIT if _INTERPRET else MAX_SPLIT


def _check(x: torch.Tensor, y: torch.Tensor) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"chunked_clip_loss: the triton backend takes float16/bfloat16/float32, got "
                        f"{x.dtype} (use backend='cpu' or 'reference' for float64)")
    return "tf32x3" if x.dtype == torch.float32 else None  # None: the dtype's native dot


def _f32(v: torch.Tensor) -> torch.Tensor:
    return v.detach().to(torch.float32).reshape(1).contiguous()


def _chunk_rows(tile, n: int, m: int, itemsize: int) -> int:
    if tile is not None:
        return max(1, min(n, tile[0]))
    return max(1, min(n, BWD_BUFFER_BYTES // max(1, m * itemsize) // 128 * 128 or 128))


def softmax_stats(x, y, scale, gi, gt, beta, tile):
    """See ``loss_cpu.softmax_stats``: ``([k, n], [k, M])`` float32, ``k = 1`` or ``3``."""
    prec = _check(x, y)
    x, y = x.contiguous(), y.contiguous()
    n, d = x.shape
    m = y.shape[0]
    hard = beta > 0
    k = 3 if hard else 1
    nb = triton.cdiv(n, FWD_BN)
    rows = torch.full((_splits(), k, n), float("-inf"), dtype=torch.float32, device=x.device)
    cols = torch.empty(k, nb, m, dtype=torch.float32, device=x.device)
    dummy = torch.zeros(1, dtype=torch.int64, device=x.device)
    grid = lambda meta: (nb, meta["SPLIT"])  # noqa: E731
    _softmax_stats[grid](x, y, _f32(scale), gi if hard else dummy, gt if hard else dummy, rows, cols,
                         n, m, d, float(beta), x.stride(0), y.stride(0), nb, _n_key(n), HARD=hard,
                         PREC=prec, BN=FWD_BN, **_FIXED_FWD)
    return torch.logsumexp(rows, dim=0), torch.logsumexp(cols, dim=1)


def _grads(x, y, scale, tile, launch, want_sum: bool):
    n, d = x.shape
    m = y.shape[0]
    chunk = _chunk_rows(tile, n, m, x.element_size())
    gbuf = torch.empty(chunk, m, dtype=x.dtype, device=x.device)
    gx = torch.empty(n, d, dtype=torch.float32, device=x.device)
    gy = torch.zeros(m, d, dtype=torch.float32, device=x.device)
    gsum = torch.zeros((), dtype=torch.float32, device=x.device)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        g = gbuf[: r1 - r0]
        launch(r0, r1, g)
        gx[r0:r1] = (g @ y).float()
        gy += (g.T @ x[r0:r1]).float()
        if want_sum:
            gsum += g.float().sum()
    return gx, gy.mul_(scale.detach().float()), gsum


def softmax_grads(x, y, scale, gi, gt, beta, row_shift, col_shift, tile):
    """See ``loss_cpu.softmax_grads``: ``(G @ y, G.T @ (scale x))`` in float32."""
    prec = _check(x, y)
    x, y = x.contiguous(), y.contiguous()
    n, d = x.shape
    m = y.shape[0]
    hard = beta > 0
    rs = row_shift.to(torch.float32).contiguous()
    cs = col_shift.to(torch.float32).contiguous()
    sc = _f32(scale)
    dummy = torch.zeros(1, dtype=torch.int64, device=x.device)

    def launch(r0, r1, g):
        grid = lambda meta: (triton.cdiv(r1 - r0, meta["BN"]), triton.cdiv(m, meta["BM"]))  # noqa: E731
        _softmax_grad[grid](x[r0:r1], y, sc, gi[r0:r1] if hard else dummy, gt if hard else dummy,
                            rs[:, r0:r1].contiguous(), cs, g, r1 - r0, m, d, float(beta),
                            x.stride(0), y.stride(0), r1 - r0, HARD=hard, PREC=prec, **_FIXED_BWD)

    gx, gy, _ = _grads(x, y, scale, tile, launch, False)
    return gx, gy


def sigmoid_sum(x, y, scale, bias, tile):
    """See ``loss_cpu.sigmoid_sum``: ``sum softplus(t + bias)`` (0-d float32)."""
    prec = _check(x, y)
    x, y = x.contiguous(), y.contiguous()
    n, d = x.shape
    m = y.shape[0]
    nb = triton.cdiv(n, FWD_BN)
    out = torch.zeros(_splits(), nb, dtype=torch.float32, device=x.device)
    grid = lambda meta: (nb, meta["SPLIT"])  # noqa: E731
    _sigmoid_sum[grid](x, y, _f32(scale), _f32(bias), out, n, m, d, x.stride(0), y.stride(0), nb,
                       _n_key(n), PREC=prec, BN=FWD_BN, **_FIXED_FWD)
    return out.sum()


def sigmoid_grads(x, y, scale, bias, coef, tile):
    """See ``loss_cpu.sigmoid_grads``: ``(G @ y, G.T @ (scale x), sum G)`` in float32."""
    prec = _check(x, y)
    x, y = x.contiguous(), y.contiguous()
    n, d = x.shape
    m = y.shape[0]
    sc, bc = _f32(scale), _f32(bias)

    def launch(r0, r1, g):
        grid = lambda meta: (triton.cdiv(r1 - r0, meta["BN"]), triton.cdiv(m, meta["BM"]))  # noqa: E731
        _sigmoid_grad[grid](x[r0:r1], y, sc, bc, g, r1 - r0, m, d, x.stride(0), y.stride(0),
                            float(coef), PREC=prec, **_FIXED_BWD)

    return _grads(x, y, scale, tile, launch, True)
