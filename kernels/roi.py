"""Triton kernels of the ROI ops: RoIAlign and the fused RoIAlign-mean-gate ``roi_pool_fuse``.

The four launchers keep the raw-kernel contract of docs/roi.md (same names and arguments as
``torch.ops.regionmed_fast_C.*``): they trust their caller, ``regionmed_fast/ops/roi.py``, which
checks the boxes. An invalid roi (a non-finite coordinate, a batch index that is not an integer
in [0, B)) gets NaN outputs and contributes no gradient, as in the C++ and CUDA kernels.

Design (docs/roi-gpu-kernels.md has the measurements):

* torchvision's bilinear sampling is *separable*. The samples of one roi form a Cartesian grid
  (y depends on (ph, iy) only, x on (pw, ix) only), the "outside the map" test is a per-axis
  test and the clamping is per axis, so the weight of feature pixel (i, j) in bin (ph, pw) is
  ``Ay[ph, i] * Ax[pw, j] / count`` with ``Ay[ph, i]`` the summed row weights of the bin's
  y samples. A program therefore visits each feature pixel of a roi's support once (forward:
  one coalesced [channels x columns] load per row; backward: one atomic add per pixel and
  channel) instead of once per sample tap (4 taps x samples per bin, as torchvision does).
* Grid: one program per (roi, channel block) for roi_align forward/backward and for the fused
  backward; one program per roi for the fused forward, which needs the whole channel vector of
  r_k before the scalar gate a_k can be formed (it loops over channel blocks twice).
* Accumulation in float32 (float64 for float64 inputs). Backward scatters with relaxed
  ``tl.atomic_add`` into float32/float64 buffers that the launcher casts to the grad dtype.
* Feature addressing is by strides, so NCHW (channels_last=False) and NHWC (True) share the
  kernels; with NHWC the channel stride is 1 and the loads/atomics are contiguous along C.
"""
from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton
import triton.language as tl

__all__ = ["roi_align_forward", "roi_align_backward", "roi_pool_fuse_forward",
           "roi_pool_fuse_backward"]

_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_enabled() -> bool:
    # The interpreter has no driver to time configs with; REGIONMED_TRITON_AUTOTUNE=0 pins the
    # first config on a GPU too (reproducible timings without a tuning pass).
    return not _interpret() and os.environ.get("REGIONMED_TRITON_AUTOTUNE", "1") != "0"


# Runtime scalars are not specialised on their value (== 1, % 16): each distinct pattern would
# be another compilation, and shape fuzzing on a GPU would spend minutes compiling.
_NO_SPECIALIZE = ["sampling_ratio", "aligned", "B", "C", "H", "W", "s_b", "s_c", "s_y", "s_x"]


def _prune_small(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Tune only problems big enough for the choice to matter: small ones (tests, fuzzing) take
    the first config, which saves a benchmark pass and three compilations per shape."""
    if named_args["C"] * named_args["H"] * named_args["W"] < (1 << 16):
        return configs[:1]
    return configs


_PRUNE = {"early_config_prune": _prune_small}


def _configs(gpu: list[tuple[int, int]], interp_block_c: int) -> list[triton.Config]:
    """Autotune candidates ``(BLOCK_C, num_warps)``; a single config when not tuning. Kept to
    two per kernel: each costs a compilation and a timing pass on the first call per shape."""
    if _interpret():
        return [triton.Config({"BLOCK_C": interp_block_c}, num_warps=1)]
    cands = gpu if _autotune_enabled() else gpu[:1]
    return [triton.Config({"BLOCK_C": bc}, num_warps=nw) for bc, nw in cands]


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _div(x, y):
    # Correctly rounded division: Triton's fp32 '/' is approximate (div.full.f32).
    if x.dtype == tl.float64:
        q = x / y
    else:
        q = tl.math.div_rn(x, y)
    return q


@triton.jit
def _scaled(v, scale_hi, scale_lo):
    # Float arguments reach kernels as float32: float64 launches pass the scale as a float32
    # pair (hi + lo, ~48 bits); the others pass lo = 0, which leaves v * hi unchanged.
    return v * scale_hi + v * scale_lo


@triton.jit
def _roi_geometry(rois_ptr, k, B, scale_hi, scale_lo, sampling_ratio, aligned, PH: tl.constexpr,
                  PW: tl.constexpr, ACC: tl.constexpr):
    """torchvision's per-roi sampling geometry (start, bin size, samples per bin, count), and
    whether the roi is valid. An invalid roi gets image 0, no samples and a NaN count, so its
    outputs come out NaN and its loops do nothing."""
    base = rois_ptr + k.to(tl.int64) * 5
    bf = tl.load(base).to(ACC)
    x1 = tl.load(base + 1).to(ACC)
    y1 = tl.load(base + 2).to(ACC)
    x2 = tl.load(base + 3).to(ACC)
    y2 = tl.load(base + 4).to(ACC)
    # v - v is 0 exactly for finite v (NaN for NaN and infinities)
    finite = ((bf - bf) == 0.0) & ((x1 - x1) == 0.0) & ((y1 - y1) == 0.0) & ((x2 - x2) == 0.0) & ((y2 - y2) == 0.0)
    valid = finite & (bf >= 0.0) & (bf < B * 1.0) & (bf == tl.floor(bf))
    b = tl.where(valid, bf, 0.0).to(tl.int32)
    is_aligned = aligned != 0
    off = tl.where(is_aligned, 0.5, 0.0)
    start_w = _scaled(x1, scale_hi, scale_lo) - off
    start_h = _scaled(y1, scale_hi, scale_lo) - off
    roi_w = _scaled(x2, scale_hi, scale_lo) - off - start_w
    roi_h = _scaled(y2, scale_hi, scale_lo) - off - start_h
    # the legacy (not aligned) mode forces malformed rois to 1x1
    roi_w = tl.where(is_aligned, roi_w, tl.maximum(roi_w, 1.0))
    roi_h = tl.where(is_aligned, roi_h, tl.maximum(roi_h, 1.0))
    # ceil() of an exact quotient such as 14 / 7 must not become 3: hence _div.
    bin_h = _div(roi_h, PH * 1.0)
    bin_w = _div(roi_w, PW * 1.0)
    adaptive = sampling_ratio <= 0
    grid_h = tl.where(adaptive, tl.ceil(bin_h).to(tl.int32), sampling_ratio)
    grid_w = tl.where(adaptive, tl.ceil(bin_w).to(tl.int32), sampling_ratio)
    grid_h = tl.where(valid, tl.maximum(grid_h, 0), 0)
    grid_w = tl.where(valid, tl.maximum(grid_w, 0), 0)
    count = tl.where(valid, tl.maximum(grid_h * grid_w, 1).to(ACC), float("nan"))
    return b, valid, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _tap_weight(pos, idx, size):
    """Bilinear weight that a sample at ``pos`` puts on pixel ``idx`` along one axis of length
    ``size`` (torchvision: 0 beyond one pixel outside, clamped to the edge otherwise)."""
    valid = (pos >= -1.0) & (pos <= size)
    last = size - 1.0
    p = tl.minimum(tl.maximum(pos, 0.0), last)  # the clamp also keeps the int cast in range
    low = p.to(tl.int32)
    at_edge = p >= last
    high = tl.where(at_edge, low, low + 1)
    frac = p - low.to(p.dtype)
    w = tl.where(low == idx, 1.0 - frac, 0.0) + tl.where(high == idx, frac, 0.0)
    return tl.where(valid, w, 0.0)


@triton.jit
def _sample_pos(start, bin_sz, p_idx, s, grid):
    # Same operation order as torchvision so that sample coordinates agree bit for bit.
    return start + p_idx * bin_sz + _div((s + 0.5) * bin_sz, grid)


@triton.jit
def _support(start, bin_sz, grid, P: tl.constexpr, size):
    """Conservative [first, last] pixel range touched by the samples along one axis (empty
    when the roi has no samples); pixels inside it may still get zero weight. A reversed box
    in aligned mode has a negative bin size: its samples run backwards from ``start``."""
    gridf = tl.maximum(grid, 1).to(start.dtype)
    end0 = _sample_pos(start, bin_sz, 0, 0, gridf)
    end1 = _sample_pos(start, bin_sz, P - 1, (gridf - 1.0), gridf)
    first = tl.minimum(end0, end1)
    last = tl.maximum(end0, end1)
    top = size - 1.0
    lo = tl.maximum(tl.minimum(tl.maximum(first, 0.0), top).to(tl.int32), 0)  # 0 rows: empty
    hi = tl.minimum(tl.minimum(tl.maximum(last, 0.0), top).to(tl.int32) + 1, size - 1)
    hi = tl.where(grid > 0, hi, lo - 1)
    return lo, hi


@triton.jit
def _axis_weights(start, bin_sz, grid, p_idx, pix, size):
    """``A[p, pix]``: summed weight of bin p's samples on pixel ``pix`` along one axis.
    ``p_idx`` is a vector of bin indices (masked to the valid bins by the caller) and ``pix``
    a scalar or a vector (giving a 2D [bins, pixels] result)."""
    gridf = tl.maximum(grid, 1).to(start.dtype)
    acc = tl.zeros_like(_tap_weight(_sample_pos(start, bin_sz, p_idx, 0, gridf), pix, size))
    for s in range(0, grid):
        pos = _sample_pos(start, bin_sz, p_idx, s, gridf)
        acc += _tap_weight(pos, pix, size)
    return acc


@triton.jit
def _map_ptrs(base_ptr, boff, i, j, cc, s_c, s_y, s_x, CL: tl.constexpr, VEC: tl.constexpr):
    """Pointers [BLOCK_C, BLOCK_J] to channels ``cc`` of pixels (i, j) of the image at element
    offset ``boff``. Strides are runtime values (not specialised, which keeps the number of
    compiled variants small); the layout says which axis has stride 1, and ``VEC`` (NHWC with
    C % 16 == 0) tells the compiler that pixel offsets are multiples of 16 elements so that the
    loads along C are vectorised."""
    if CL:
        pix = boff + i * s_y + j.to(tl.int64) * s_x
        if VEC:
            pix = tl.multiple_of(pix, 16)
        p = base_ptr + pix[None, :] + cc[:, None]
    else:
        chan = boff + i * s_y + cc.to(tl.int64) * s_c
        p = base_ptr + chan[:, None] + j[None, :]
    return p


# ----------------------------------------------------------------------------- roi_align

def _align_fwd_configs():
    return _configs([(32, 4), (64, 8)], interp_block_c=32)


@triton.autotune(configs=_align_fwd_configs(), key=["C", "H", "W", "PH", "PW", "CL"],
                 prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _roi_align_fwd_kernel(feat_ptr, rois_ptr, out_ptr, scale_hi, scale_lo, sampling_ratio, aligned,
                          B, C, H, W, s_b, s_c, s_y, s_x,
                          PH: tl.constexpr, PW: tl.constexpr, CL: tl.constexpr,
                          VEC: tl.constexpr, ACC: tl.constexpr, BLOCK_PH: tl.constexpr,
                          BLOCK_PW: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    cb = tl.program_id(1)
    b, valid, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _roi_geometry(
        rois_ptr, k, B, scale_hi, scale_lo, sampling_ratio, aligned, PH, PW, ACC)
    hf = H * 1.0
    wf = W * 1.0
    ph = tl.arange(0, BLOCK_PH)
    pw = tl.arange(0, BLOCK_PW)
    jj = tl.arange(0, BLOCK_J)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    ph_f = ph.to(ACC)
    pw_f = pw.to(ACC)
    boff = b.to(tl.int64) * s_b
    acc = tl.zeros([BLOCK_C, BLOCK_PH, BLOCK_PW], dtype=ACC)
    r0, r1 = _support(start_h, bin_h, grid_h, PH, H)
    c0, c1 = _support(start_w, bin_w, grid_w, PW, W)
    for j0 in range(c0, c1 + 1, BLOCK_J):
        j = j0 + jj
        ax = _axis_weights(start_w, bin_w, grid_w, pw_f[:, None], j[None, :], wf)      # [PW, J]
        ax = tl.where((pw < PW)[:, None], ax, 0.0)
        colw = tl.sum(ax, axis=0)                                             # [J]
        jmask = (j <= c1) & (colw > 0.0)
        for i in range(r0, r1 + 1):
            ay = _axis_weights(start_h, bin_h, grid_h, ph_f, i, hf)           # [PH]
            ay = tl.where(ph < PH, ay, 0.0)
            # A zero-weight row is masked rather than branched over: straight-line loop body.
            live = jmask & ((colw * tl.sum(ay, axis=0)) > 0.0)
            ptrs = _map_ptrs(feat_ptr, boff, i, j, cc, s_c, s_y, s_x, CL, VEC)
            f = tl.load(ptrs, mask=cmask[:, None] & live[None, :], other=0.0).to(ACC)
            t = tl.sum(f[:, None, :] * ax[None, :, :], axis=2)                 # [C, PW]
            acc += t[:, None, :] * ay[None, :, None]
    acc = acc / count
    out_base = out_ptr + k.to(tl.int64) * C * PH * PW
    optrs = out_base + cc[:, None, None] * (PH * PW) + ph[None, :, None] * PW + pw[None, None, :]
    omask = cmask[:, None, None] & (ph < PH)[None, :, None] & (pw < PW)[None, None, :]
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _align_bwd_configs():
    return _configs([(32, 4), (64, 8)], interp_block_c=32)


# Backward kernels accumulate with atomics into their outputs, so they are not tuned: a timing
# pass would run them on the live buffers and rely on reset_to_zero for correctness. One config
# means no timing pass at all.
@triton.autotune(configs=_align_bwd_configs()[:1], key=["C", "H", "W", "PH", "PW", "CL"],
                 prune_configs_by=_PRUNE,
                 reset_to_zero=["gfeat_ptr"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _roi_align_bwd_kernel(grad_ptr, rois_ptr, gfeat_ptr, scale_hi, scale_lo, sampling_ratio,
                          aligned,
                          B, C, H, W, s_b, s_c, s_y, s_x,
                          PH: tl.constexpr, PW: tl.constexpr, CL: tl.constexpr,
                          VEC: tl.constexpr, ACC: tl.constexpr, BLOCK_PH: tl.constexpr,
                          BLOCK_PW: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    cb = tl.program_id(1)
    b, valid, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _roi_geometry(
        rois_ptr, k, B, scale_hi, scale_lo, sampling_ratio, aligned, PH, PW, ACC)
    hf = H * 1.0
    wf = W * 1.0
    ph = tl.arange(0, BLOCK_PH)
    jj = tl.arange(0, BLOCK_J)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    ph_f = ph.to(ACC)
    # The value handed to tl.atomic_add must not come out of a reduction over an axis of a 3-D
    # register tensor: compiled (triton 3.6), such a SliceLayout is replicated across the threads
    # that held the reduced axis, every replica issues the atomic and the gradient comes back
    # 2x/8x (docs/roi-gpu-kernels.md). So `d` [C, J] is built only from 1-D factors broadcast into 2-D (as the fused
    # backward does): one grad column [C, PH] per bin column pw, reduced over PH with `ay`.
    g_base = grad_ptr + k.to(tl.int64) * C * PH * PW
    g_rows = g_base + cc[:, None] * (PH * PW) + ph[None, :] * PW                 # [C, PH]
    gmask = cmask[:, None] & (ph < PH)[None, :]
    boff = b.to(tl.int64) * s_b
    r0, r1 = _support(start_h, bin_h, grid_h, PH, H)
    c0, c1 = _support(start_w, bin_w, grid_w, PW, W)
    for j0 in range(c0, c1 + 1, BLOCK_J):
        j = j0 + jj
        colw = tl.zeros([BLOCK_J], dtype=ACC)                                 # [J]
        for pw in tl.static_range(PW):
            colw += _axis_weights(start_w, bin_w, grid_w, tl.full([], pw, ACC), j, wf)
        jmask = (j <= c1) & (colw > 0.0)
        for i in range(r0, r1 + 1):
            ay = _axis_weights(start_h, bin_h, grid_h, ph_f, i, hf)           # [PH]
            ay = tl.where(ph < PH, ay, 0.0)
            live = jmask & ((colw * tl.sum(ay, axis=0)) > 0.0)
            d = tl.zeros([BLOCK_C, BLOCK_J], dtype=ACC)                       # [C, J]
            for pw in tl.static_range(PW):
                # tiny reload (cached) of grad column pw rather than slicing a 3-D register tile
                g = tl.load(g_rows + pw, mask=gmask, other=0.0).to(ACC) / count   # [C, PH]
                u_pw = tl.sum(g * ay[None, :], axis=1)                        # [C]
                ax_pw = _axis_weights(start_w, bin_w, grid_w, tl.full([], pw, ACC), j, wf)  # [J]
                d += u_pw[:, None] * ax_pw[None, :]
            ptrs = _map_ptrs(gfeat_ptr, boff, i, j, cc, s_c, s_y, s_x, CL, VEC)
            tl.atomic_add(ptrs, d, mask=cmask[:, None] & live[None, :], sem="relaxed")


# ----------------------------------------------------------------------------- roi_pool_fuse

@triton.jit
def _region_sum(feat_ptr, boff, start_h, start_w, bin_h, bin_w, grid_h, grid_w, cc, cmask, H, W,
                s_c, s_y, s_x, S: tl.constexpr, CL: tl.constexpr, VEC: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                ACC: tl.constexpr):
    """sum over the roi's pixels of wy[i] * wx[j] * F[i, j, c] for one channel block, where
    wy / wx are the row / column weights summed over all bins and samples."""
    hf = H * 1.0
    wf = W * 1.0
    sb = tl.arange(0, BLOCK_S)
    sb_f = sb.to(ACC)
    jj = tl.arange(0, BLOCK_J)
    acc = tl.zeros([BLOCK_C, BLOCK_J], dtype=ACC)
    r0, r1 = _support(start_h, bin_h, grid_h, S, H)
    c0, c1 = _support(start_w, bin_w, grid_w, S, W)
    for j0 in range(c0, c1 + 1, BLOCK_J):
        j = j0 + jj
        ax = _axis_weights(start_w, bin_w, grid_w, sb_f[:, None], j[None, :], wf)      # [S, J]
        wx = tl.sum(tl.where((sb < S)[:, None], ax, 0.0), axis=0)             # [J]
        jmask = (j <= c1) & (wx > 0.0)
        for i in range(r0, r1 + 1):
            ay = _axis_weights(start_h, bin_h, grid_h, sb_f, i, hf)
            wy = tl.sum(tl.where(sb < S, ay, 0.0), axis=0)
            ptrs = _map_ptrs(feat_ptr, boff, i, j, cc, s_c, s_y, s_x, CL, VEC)
            live = jmask & ((wx * wy) > 0.0)
            f = tl.load(ptrs, mask=cmask[:, None] & live[None, :], other=0.0).to(ACC)
            acc += f * (wy * wx)[None, :]
    return tl.sum(acc, axis=1)


def _fuse_fwd_configs():
    # One program per roi walks all of C: wide blocks shorten its serial chain of row loads.
    return _configs([(256, 8), (128, 4), (512, 16)], interp_block_c=64)


@triton.autotune(configs=_fuse_fwd_configs(), key=["C", "H", "W", "S", "CL"],
                 prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _roi_pool_fuse_fwd_kernel(feat_ptr, rois_ptr, glob_ptr, wgt_ptr, bias_ptr, z_ptr, r_ptr,
                              a_ptr, scale_hi, scale_lo, sampling_ratio, aligned, B, C, H, W,
                              s_b, s_c, s_y, s_x, S: tl.constexpr, CL: tl.constexpr,
                              VEC: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                              BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    b, valid, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _roi_geometry(
        rois_ptr, k, B, scale_hi, scale_lo, sampling_ratio, aligned, S, S, ACC)
    norm = count * (S * S)
    boff = b.to(tl.int64) * s_b
    glob_b = glob_ptr + b.to(tl.int64) * C
    r_k = r_ptr + k.to(tl.int64) * C
    logit = tl.load(bias_ptr).to(ACC)
    for c_start in range(0, C, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        cmask = cc < C
        r = _region_sum(feat_ptr, boff, start_h, start_w, bin_h, bin_w, grid_h, grid_w, cc, cmask,
                        H, W, s_c, s_y, s_x, S, CL, VEC, BLOCK_S, BLOCK_J, BLOCK_C, ACC) / norm
        g = tl.load(glob_b + cc, mask=cmask, other=0.0).to(ACC)
        w0 = tl.load(wgt_ptr + cc, mask=cmask, other=0.0).to(ACC)
        w1 = tl.load(wgt_ptr + C + cc, mask=cmask, other=0.0).to(ACC)
        logit += tl.sum(w0 * r + w1 * g, axis=0)
        tl.store(r_k + cc, r, mask=cmask)
    a = 1.0 / (1.0 + tl.exp(-logit))
    tl.store(a_ptr + k, a)
    # r_k was written above by this program; the barrier makes it visible across its threads.
    tl.debug_barrier()
    z_k = z_ptr + k.to(tl.int64) * C
    for c_start in range(0, C, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        cmask = cc < C
        r = tl.load(r_k + cc, mask=cmask, other=0.0)
        g = tl.load(glob_b + cc, mask=cmask, other=0.0).to(ACC)
        tl.store(z_k + cc, (a * r + (1.0 - a) * g).to(z_ptr.dtype.element_ty), mask=cmask)


def _fuse_bwd_configs():
    return _configs([(128, 4), (256, 8)], interp_block_c=64)


@triton.autotune(configs=_fuse_bwd_configs()[:1], key=["C", "H", "W", "S", "CL"],  # untuned: see above
                 prune_configs_by=_PRUNE,
                 reset_to_zero=["gfeat_ptr", "gglob_ptr", "gw_ptr", "gb_ptr"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _roi_pool_fuse_bwd_kernel(gz_ptr, rois_ptr, glob_ptr, wgt_ptr, r_ptr, a_ptr,
                              gfeat_ptr, gglob_ptr, gw_ptr, gb_ptr,
                              scale_hi, scale_lo, sampling_ratio, aligned, B, C, H, W,
                              s_b, s_c, s_y, s_x, S: tl.constexpr, CL: tl.constexpr,
                              VEC: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                              BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    cb = tl.program_id(1)
    b, valid, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _roi_geometry(
        rois_ptr, k, B, scale_hi, scale_lo, sampling_ratio, aligned, S, S, ACC)
    norm = count * (S * S)
    gz_k = gz_ptr + k.to(tl.int64) * C
    r_k = r_ptr + k.to(tl.int64) * C
    glob_b = glob_ptr + b.to(tl.int64) * C
    a = tl.load(a_ptr + k).to(ACC)
    # dL/da needs the whole channel vector; every channel block recomputes it (3 reads of C
    # values, cheaper than a second launch).
    da = a * 0.0  # an ACC-typed zero: the loop-carried type must not change
    for c_start in range(0, C, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        cmask = cc < C
        gz = tl.load(gz_k + cc, mask=cmask, other=0.0).to(ACC)
        r = tl.load(r_k + cc, mask=cmask, other=0.0).to(ACC)
        g = tl.load(glob_b + cc, mask=cmask, other=0.0).to(ACC)
        da += tl.sum(gz * (r - g), axis=0)
    ds = da * a * (1.0 - a)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    gz = tl.load(gz_k + cc, mask=cmask, other=0.0).to(ACC)
    r = tl.load(r_k + cc, mask=cmask, other=0.0).to(ACC)
    g = tl.load(glob_b + cc, mask=cmask, other=0.0).to(ACC)
    w0 = tl.load(wgt_ptr + cc, mask=cmask, other=0.0).to(ACC)
    w1 = tl.load(wgt_ptr + C + cc, mask=cmask, other=0.0).to(ACC)
    # an invalid roi (NaN r and a) adds nothing; its scatter below has no samples
    vmask = tl.where(valid, cmask, False)  # (not cmask & valid: the interpreter cannot broadcast it)
    tl.atomic_add(gglob_ptr + b.to(tl.int64) * C + cc, (1.0 - a) * gz + ds * w1, mask=vmask,
                  sem="relaxed")
    tl.atomic_add(gw_ptr + cc, ds * r, mask=vmask, sem="relaxed")
    tl.atomic_add(gw_ptr + C + cc, ds * g, mask=vmask, sem="relaxed")
    if cb == 0:
        tl.atomic_add(gb_ptr, ds, mask=valid, sem="relaxed")
    dr = (a * gz + ds * w0) / norm
    # Scatter dr through the separable roi weights: one atomic per (pixel, channel).
    hf = H * 1.0
    wf = W * 1.0
    sb = tl.arange(0, BLOCK_S)
    sb_f = sb.to(ACC)
    jj = tl.arange(0, BLOCK_J)
    boff = b.to(tl.int64) * s_b
    r0, r1 = _support(start_h, bin_h, grid_h, S, H)
    c0, c1 = _support(start_w, bin_w, grid_w, S, W)
    for j0 in range(c0, c1 + 1, BLOCK_J):
        j = j0 + jj
        ax = _axis_weights(start_w, bin_w, grid_w, sb_f[:, None], j[None, :], wf)
        wx = tl.sum(tl.where((sb < S)[:, None], ax, 0.0), axis=0)
        jmask = (j <= c1) & (wx > 0.0)
        for i in range(r0, r1 + 1):
            ay = _axis_weights(start_h, bin_h, grid_h, sb_f, i, hf)
            wy = tl.sum(tl.where(sb < S, ay, 0.0), axis=0)
            ptrs = _map_ptrs(gfeat_ptr, boff, i, j, cc, s_c, s_y, s_x, CL, VEC)
            live = jmask & ((wx * wy) > 0.0)
            tl.atomic_add(ptrs, dr[:, None] * (wy * wx)[None, :],
                          mask=cmask[:, None] & live[None, :], sem="relaxed")


# ----------------------------------------------------------------------------- launchers

def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(t: torch.Tensor, name: str, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"roi triton kernels: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"roi triton kernels: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"roi triton kernels: {name} has dtype {t.dtype}; expected one of "
                        f"float32, float64, bfloat16, float16")
    return t.contiguous()


def _check_rois(rois: torch.Tensor, device: torch.device) -> torch.Tensor:
    rois = _check(rois, "rois", 2)
    if rois.shape[1] != 5:
        raise ValueError(f"roi triton kernels: rois must be [K, 5], got {tuple(rois.shape)}")
    if rois.device != device:
        raise ValueError(f"roi triton kernels: rois on {rois.device}, features on {device}")
    return rois


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _split_scale(spatial_scale: float, dtype: torch.dtype) -> tuple[float, float]:
    """The scale as float32 hi (+ lo for float64 kernels, whose float args arrive as float32)."""
    hi = _f32(float(spatial_scale))
    return (hi, _f32(float(spatial_scale) - hi)) if dtype == torch.float64 else (hi, 0.0)


def _strides(B: int, C: int, H: int, W: int, channels_last: bool) -> tuple[int, int, int, int]:
    """Element strides (batch, channel, row, column) of a contiguous feature map."""
    if channels_last:
        return H * W * C, 1, W * C, C
    return C * H * W, H * W, W, 1


def _vec(C: int, channels_last: bool) -> bool:
    """NHWC with C % 16 == 0: every pixel offset is a multiple of 16 elements."""
    return bool(channels_last and C % 16 == 0)


def _block_j(W: int) -> int:
    # Columns per load. Fixed on a GPU (masks cover narrow maps) so that the map width does not
    # multiply the compiled variants; the interpreter pays per op, so it takes whole rows.
    if _interpret():
        return min(triton.next_power_of_2(max(W, 1)), 64)
    return 16


def _dims(features: torch.Tensor, channels_last: bool) -> tuple[int, int, int, int]:
    if channels_last:
        B, H, W, C = features.shape
    else:
        B, C, H, W = features.shape
    return B, C, H, W


def roi_align_forward(features: torch.Tensor, rois: torch.Tensor, spatial_scale: float,
                      pooled_h: int, pooled_w: int, sampling_ratio: int, aligned: bool,
                      channels_last: bool) -> torch.Tensor:
    """RoIAlign forward. ``features`` [B, C, H, W] (or [B, H, W, C] when ``channels_last``),
    ``rois`` [K, 5]; returns [K, C, pooled_h, pooled_w] in ``features.dtype``."""
    features = _check(features, "features", 4)
    rois = _check_rois(rois, features.device)
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError(f"roi_align_forward: pooled size must be positive, "
                         f"got {pooled_h}x{pooled_w}")
    B, C, H, W = _dims(features, channels_last)
    K = rois.shape[0]
    out = torch.empty((K, C, pooled_h, pooled_w), dtype=features.dtype, device=features.device)
    if K == 0 or C == 0 or H == 0 or W == 0:
        return out.zero_()
    s_hi, s_lo = _split_scale(spatial_scale, features.dtype)
    s_b, s_c, s_y, s_x = _strides(B, C, H, W, channels_last)
    grid = lambda meta: (K, triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    with _on(features.device):
        _roi_align_fwd_kernel[grid](
            features, rois, out, s_hi, s_lo, int(sampling_ratio), int(bool(aligned)), B, C, H, W,
            s_b, s_c, s_y, s_x,
            PH=int(pooled_h), PW=int(pooled_w), CL=bool(channels_last),
                VEC=_vec(C, channels_last),
            ACC=_tl_acc(features.dtype), BLOCK_PH=triton.next_power_of_2(pooled_h),
            BLOCK_PW=triton.next_power_of_2(pooled_w), BLOCK_J=_block_j(W))
    return out


def roi_align_backward(grad: torch.Tensor, rois: torch.Tensor, spatial_scale: float,
                       pooled_h: int, pooled_w: int, batch: int, channels: int, height: int,
                       width: int, sampling_ratio: int, aligned: bool,
                       channels_last: bool) -> torch.Tensor:
    """RoIAlign backward. ``grad`` [K, C, pooled_h, pooled_w]; returns the features gradient
    [B, C, H, W] (or [B, H, W, C] when ``channels_last``) in ``grad.dtype``."""
    grad = _check(grad, "grad", 4)
    rois = _check_rois(rois, grad.device)
    K = rois.shape[0]
    B, C, H, W = int(batch), int(channels), int(height), int(width)
    if tuple(grad.shape) != (K, C, pooled_h, pooled_w):
        raise ValueError(f"roi_align_backward: grad must be [K, C, PH, PW] = "
                         f"{[K, C, pooled_h, pooled_w]}, got {list(grad.shape)}")
    shape = (B, H, W, C) if channels_last else (B, C, H, W)
    acc_dt = _acc_dtype(grad.dtype)
    gfeat = torch.zeros(shape, dtype=acc_dt, device=grad.device)
    if K > 0 and C > 0 and H > 0 and W > 0:
        s_hi, s_lo = _split_scale(spatial_scale, grad.dtype)
        s_b, s_c, s_y, s_x = _strides(B, C, H, W, channels_last)
        grid = lambda meta: (K, triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
        with _on(grad.device):
            _roi_align_bwd_kernel[grid](
                grad, rois, gfeat, s_hi, s_lo, int(sampling_ratio), int(bool(aligned)), B, C, H, W,
                s_b, s_c, s_y, s_x,
                PH=int(pooled_h), PW=int(pooled_w), CL=bool(channels_last),
                VEC=_vec(C, channels_last),
                ACC=_tl_acc(grad.dtype), BLOCK_PH=triton.next_power_of_2(pooled_h),
                BLOCK_PW=triton.next_power_of_2(pooled_w), BLOCK_J=_block_j(W))
    return gfeat if gfeat.dtype == grad.dtype else gfeat.to(grad.dtype)


def roi_pool_fuse_forward(features: torch.Tensor, rois: torch.Tensor, global_feat: torch.Tensor,
                          gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                          spatial_scale: float, output_size: int, sampling_ratio: int,
                          aligned: bool, channels_last: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused RoIAlign + bin mean + scalar gate (docs/roi.md) without the [K, C, S, S] tensor.

    Returns ``z`` [K, C] in ``features.dtype`` and ``r`` [K, C], ``a`` [K] in the accumulation
    dtype (float32; float64 for float64 features)."""
    features = _check(features, "features", 4)
    rois = _check_rois(rois, features.device)
    B, C, H, W = _dims(features, channels_last)
    global_feat = _check(global_feat, "global_feat", 2)
    gate_weight = _check(gate_weight, "gate_weight", 2)
    if tuple(global_feat.shape) != (B, C):
        raise ValueError(f"roi_pool_fuse_forward: global_feat must be [B, C] = [{B}, {C}], "
                         f"got {list(global_feat.shape)}")
    if tuple(gate_weight.shape) != (2, C):
        raise ValueError(f"roi_pool_fuse_forward: gate_weight must be [2, {C}], "
                         f"got {list(gate_weight.shape)}")
    if gate_bias.numel() != 1:
        raise ValueError(f"roi_pool_fuse_forward: gate_bias must have one element, "
                         f"got shape {list(gate_bias.shape)}")
    if output_size <= 0:
        raise ValueError(f"roi_pool_fuse_forward: output_size must be positive, got {output_size}")
    gate_bias = gate_bias.reshape(1).contiguous()
    K = rois.shape[0]
    acc_dt = _acc_dtype(features.dtype)
    dev = features.device
    z = torch.empty((K, C), dtype=features.dtype, device=dev)
    r = torch.empty((K, C), dtype=acc_dt, device=dev)
    a = torch.empty((K,), dtype=acc_dt, device=dev)
    if K == 0:
        return z, r, a
    s_hi, s_lo = _split_scale(spatial_scale, features.dtype)
    s_b, s_c, s_y, s_x = _strides(B, C, H, W, channels_last)
    with _on(features.device):
        _roi_pool_fuse_fwd_kernel[(K,)](
            features, rois, global_feat, gate_weight, gate_bias, z, r, a, s_hi, s_lo,
            int(sampling_ratio), int(bool(aligned)), B, C, H, W, s_b, s_c, s_y, s_x,
            S=int(output_size),
            CL=bool(channels_last), VEC=_vec(C, channels_last), ACC=_tl_acc(features.dtype),
            BLOCK_S=triton.next_power_of_2(output_size), BLOCK_J=_block_j(W))
    return z, r, a


def roi_pool_fuse_backward(grad_z: torch.Tensor, rois: torch.Tensor, global_feat: torch.Tensor,
                           gate_weight: torch.Tensor, r: torch.Tensor, a: torch.Tensor,
                           spatial_scale: float, output_size: int, sampling_ratio: int,
                           aligned: bool, channels_last: bool, batch: int, height: int,
                           width: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`roi_pool_fuse_forward`: gradients of features (input layout, in
    ``grad_z.dtype``), global_feat [B, C], gate_weight [2, C] and gate_bias [1] (in the dtypes
    of global_feat and gate_weight)."""
    grad_z = _check(grad_z, "grad_z", 2)
    rois = _check_rois(rois, grad_z.device)
    global_feat = _check(global_feat, "global_feat", 2)
    gate_weight = _check(gate_weight, "gate_weight", 2)
    K = rois.shape[0]
    B, H, W = int(batch), int(height), int(width)
    C = global_feat.shape[1]
    if tuple(grad_z.shape) != (K, C) or global_feat.shape[0] != B:
        raise ValueError(f"roi_pool_fuse_backward: grad_z must be [K, C] = [{K}, {C}] and global_feat "
                         f"[B, C] = [{B}, {C}], got {list(grad_z.shape)} and {list(global_feat.shape)}")
    acc_dt = _acc_dtype(grad_z.dtype)
    r = r.to(acc_dt).contiguous()
    a = a.to(acc_dt).reshape(-1).contiguous()
    if tuple(r.shape) != (K, C) or a.shape[0] != K:
        raise ValueError(f"roi_pool_fuse_backward: r must be [K, C] and a [K], got "
                         f"{list(r.shape)} and {list(a.shape)}")
    dev = grad_z.device
    shape = (B, H, W, C) if channels_last else (B, C, H, W)
    gfeat = torch.zeros(shape, dtype=acc_dt, device=dev)
    gglob = torch.zeros((B, C), dtype=acc_dt, device=dev)
    gw = torch.zeros((2, C), dtype=acc_dt, device=dev)
    gb = torch.zeros((1,), dtype=acc_dt, device=dev)
    if K > 0 and C > 0:
        s_hi, s_lo = _split_scale(spatial_scale, grad_z.dtype)
        s_b, s_c, s_y, s_x = _strides(B, C, H, W, channels_last)
        grid = lambda meta: (K, triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
        with _on(grad_z.device):
            _roi_pool_fuse_bwd_kernel[grid](
                grad_z, rois, global_feat, gate_weight, r, a, gfeat, gglob, gw, gb, s_hi, s_lo,
                int(sampling_ratio), int(bool(aligned)), B, C, H, W, s_b, s_c, s_y, s_x,
                S=int(output_size),
                CL=bool(channels_last), VEC=_vec(C, channels_last), ACC=_tl_acc(grad_z.dtype),
                BLOCK_S=triton.next_power_of_2(output_size), BLOCK_J=_block_j(W))
    return (gfeat.to(grad_z.dtype), gglob.to(global_feat.dtype), gw.to(gate_weight.dtype),
            gb.to(gate_weight.dtype))
