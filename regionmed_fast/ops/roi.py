"""Public ROI ops: :func:`roi_align` and :func:`roi_pool_fuse` with interchangeable backends.

Backends (the table :data:`BACKENDS`, which ``regionmed-fast info`` prints): ``reference`` (plain
PyTorch, :mod:`regionmed_fast.ops.roi_reference`), ``cpp`` (C++/OpenMP, ``torch.ops.regionmed_fast_C``;
``cpu`` is its alias), ``cuda`` (CUDA C++, same ops on CUDA tensors), ``triton``
(:mod:`regionmed_fast.kernels.roi`), ``auto`` (``cpp`` on CPU tensors; ``cuda`` then ``triton`` on
GPUs).

The raw kernels (the contract in docs/roi.md) are wrapped twice over the same functions: eagerly
by a light ``torch.autograd.Function`` (a ``torch.library`` custom op's Python dispatch costs more
host time than the millisecond GPU kernels; docs/roi-gpu-kernels.md), and, while
``torch.compile`` or ``torch.export`` traces, by ``torch.library`` custom ops in the
``regionmed_fast`` namespace with fake kernels and autograd. ``torch.fx.symbolic_trace`` records
each public op as one call.

Boxes are checked here and nowhere below (``check_boxes``, see :func:`roi_align`): the values
once, with one host synchronisation, by default on CPU tensors only, so that the GPU path never
waits for the device and can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.fx
from torch import Tensor
from torch.autograd.function import once_differentiable

from regionmed_fast import _ext
from regionmed_fast.ops import _backend
from regionmed_fast.ops.roi_reference import acc_dtype, as_rois, roi_align_reference, roi_pool_fuse_reference

__all__ = ["roi_align", "roi_pool_fuse", "available_backends", "BACKENDS", "KERNEL_NAMES"]

KERNEL_NAMES = ("roi_align_forward", "roi_align_backward", "roi_pool_fuse_forward", "roi_pool_fuse_backward")
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LAYOUTS = ("nchw", "nhwc")


# ---------------------------------------------------------------- backends

@functools.lru_cache(maxsize=None)
def _compiled_status() -> str:
    mod, reason = _ext.load()
    if mod is None:
        return reason
    ns = torch.ops.regionmed_fast_C
    missing = [n for n in KERNEL_NAMES if not hasattr(ns, n)]
    return f"regionmed_fast._C lacks ops {missing} (rebuild the extension)" if missing else ""


def _compiled_check(key: str):
    def check(device: torch.device) -> str:
        reason = _compiled_status()
        if reason:
            return reason
        missing = [n for n in KERNEL_NAMES
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"regionmed_fast_C::{n}", key)]
        if missing and key == "CUDA":
            return ("regionmed_fast._C was built without CUDA kernels (reinstall with FORCE_CUDA=1 "
                    "or on a GPU machine)")
        return f"regionmed_fast._C has no {key} kernel for {missing}" if missing else ""
    return check


@functools.lru_cache(maxsize=None)
def _triton_module():
    # Imported on first use, not at the top: triton is optional (CPU builds of torch come
    # without it) and its import is not free (docs/roi.md, "Import cost").
    from regionmed_fast.kernels import roi as triton_roi

    return triton_roi


@functools.lru_cache(maxsize=None)
def _triton_module_status() -> str:
    try:
        triton_roi = _triton_module()
    except Exception as exc:
        return f"regionmed_fast.kernels.roi not importable: {type(exc).__name__}: {exc}"
    missing = [n for n in KERNEL_NAMES if not callable(getattr(triton_roi, n, None))]
    return f"regionmed_fast.kernels.roi lacks {missing}" if missing else ""


def _triton_check(device: torch.device) -> str:
    return _backend.triton_device_status(device) or _triton_module_status()


#: The ROI ops' backends; ``cpu`` means ``cpp`` (the C++/OpenMP kernels).
BACKENDS = _backend.BackendTable(
    "roi",
    [_backend.Backend("reference", "plain PyTorch (regionmed_fast/ops/roi_reference.py)", ("cpu", "cuda")),
     _backend.Backend("cpp", "C++/OpenMP kernels of regionmed_fast._C (csrc/roi/roi_cpu.cpp)", ("cpu",),
                      _compiled_check("CPU")),
     _backend.Backend("cuda", "CUDA kernels of regionmed_fast._C (csrc/roi/roi_cuda.cu)", ("cuda",),
                      _compiled_check("CUDA")),
     _backend.Backend("triton", "Triton kernels (kernels/roi.py)", ("cuda",), _triton_check)],
    auto={"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")},
    aliases={"cpu": "cpp"},
)


def available_backends(device: torch.device | str) -> dict[str, str]:
    """Every ROI backend on ``device``: name -> ``"ok"`` or the reason it cannot run."""
    return BACKENDS.report(device)


def _kernel(backend: str, name: str) -> Callable:
    """Raw kernel ``name`` of a compiled or Triton backend (the contract in docs/roi.md)."""
    if backend == "triton":
        return getattr(_triton_module(), name)
    return getattr(torch.ops.regionmed_fast_C, name)


# ---------------------------------------------------------------- kernels with autograd
# Each op is four plain functions: forward, backward (the raw kernels of `backend`), autograd
# set-up and backward formula. Both wrappers below use the same four.

def _align_fwd(features: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
               sampling_ratio: int, aligned: bool, channels_last: bool, backend: str) -> Tensor:
    return _kernel(backend, "roi_align_forward")(features, rois, spatial_scale, pooled_h, pooled_w,
                                                 sampling_ratio, aligned, channels_last)


def _align_bwd_kernel(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                      batch: int, channels: int, height: int, width: int, sampling_ratio: int,
                      aligned: bool, channels_last: bool, backend: str) -> Tensor:
    return _kernel(backend, "roi_align_backward")(grad.contiguous(), rois, spatial_scale, pooled_h, pooled_w,
                                                  batch, channels, height, width, sampling_ratio,
                                                  aligned, channels_last)


def _align_setup(ctx, inputs, output) -> None:
    features, rois, scale, ph, pw, sr, aligned, cl, backend = inputs
    ctx.save_for_backward(rois)
    b, c, h, w = ((features.shape[0], features.shape[3], features.shape[1], features.shape[2]) if cl
                  else tuple(features.shape))
    ctx.args = (scale, ph, pw, b, c, h, w, sr, aligned, cl, backend)


def _align_grads(backward: Callable):
    def grads(ctx, grad):
        (rois,) = ctx.saved_tensors
        scale, ph, pw, b, c, h, w, sr, aligned, cl, backend = ctx.args
        gf = backward(grad, rois, scale, ph, pw, b, c, h, w, sr, aligned, cl, backend)
        return gf, None, None, None, None, None, None, None, None
    return grads


def _fuse_fwd(features: Tensor, rois: Tensor, global_feat: Tensor, gate_weight: Tensor, gate_bias: Tensor,
              spatial_scale: float, output_size: int, sampling_ratio: int, aligned: bool, channels_last: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    z, r, a = _kernel(backend, "roi_pool_fuse_forward")(features, rois, global_feat, gate_weight, gate_bias,
                                                         spatial_scale, output_size, sampling_ratio,
                                                         aligned, channels_last)
    return z, r, a


def _fuse_bwd_kernel(grad_z: Tensor, rois: Tensor, global_feat: Tensor, gate_weight: Tensor, r: Tensor,
                     a: Tensor, spatial_scale: float, output_size: int, sampling_ratio: int, aligned: bool,
                     channels_last: bool, batch: int, height: int, width: int, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    outs = _kernel(backend, "roi_pool_fuse_backward")(grad_z.contiguous(), rois, global_feat, gate_weight, r, a,
                                                      spatial_scale, output_size, sampling_ratio, aligned,
                                                      channels_last, batch, height, width)
    return tuple(outs)


def _fuse_setup(ctx, inputs, output) -> None:
    features, rois, global_feat, gate_weight, gate_bias, scale, s, sr, aligned, cl, backend = inputs
    _, r, a = output
    ctx.save_for_backward(rois, global_feat, gate_weight, r, a)
    b, h, w = (features.shape[0], features.shape[1], features.shape[2]) if cl else (
        features.shape[0], features.shape[2], features.shape[3])
    ctx.args = (scale, s, sr, aligned, cl, b, h, w, backend)
    ctx.bias_dtype = gate_bias.dtype
    ctx.z_dtype = features.dtype


def _fuse_grads(backward: Callable):
    def grads(ctx, grad_z, grad_r, grad_a):
        # r and a are handed to users detached, so only z carries gradient.
        rois, global_feat, gate_weight, r, a = ctx.saved_tensors
        scale, s, sr, aligned, cl, b, h, w, backend = ctx.args
        if grad_z is None:
            grad_z = torch.zeros((r.shape[0], r.shape[1]), dtype=ctx.z_dtype, device=r.device)
        gf, gg, gw, gb = backward(grad_z, rois, global_feat, gate_weight, r, a, scale, s, sr, aligned, cl,
                                  b, h, w, backend)
        return gf, None, gg, gw, gb.to(ctx.bias_dtype), None, None, None, None, None, None
    return grads


# Eager: autograd.Function straight onto the raw kernels. (forward takes ctx: the setup_context
# form binds the arguments with inspect.signature on every call, which costs more than the rest.)

class _RoIAlignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        out = _align_fwd(*args)
        _align_setup(ctx, args, out)
        return out

    backward = staticmethod(once_differentiable(_align_grads(_align_bwd_kernel)))


class _RoIPoolFuseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        out = _fuse_fwd(*args)
        _fuse_setup(ctx, args, out)
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    backward = staticmethod(once_differentiable(_fuse_grads(_fuse_bwd_kernel)))


# Traced (torch.compile / torch.export): torch.library custom ops with fake kernels.

_roi_align_op = torch.library.custom_op("regionmed_fast::roi_align", _align_fwd, mutates_args=())
_roi_align_backward_op = torch.library.custom_op("regionmed_fast::roi_align_backward", _align_bwd_kernel,
                                                 mutates_args=())
_roi_pool_fuse_op = torch.library.custom_op("regionmed_fast::roi_pool_fuse", _fuse_fwd, mutates_args=())
_roi_pool_fuse_backward_op = torch.library.custom_op("regionmed_fast::roi_pool_fuse_backward", _fuse_bwd_kernel,
                                                     mutates_args=())


@_roi_align_op.register_fake
def _(features, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, channels_last, backend):
    c = features.shape[3] if channels_last else features.shape[1]
    return features.new_empty((rois.shape[0], c, pooled_h, pooled_w))


@_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scale, pooled_h, pooled_w, batch, channels, height, width, sampling_ratio,
      aligned, channels_last, backend):
    shape = (batch, height, width, channels) if channels_last else (batch, channels, height, width)
    return grad.new_empty(shape)


@_roi_pool_fuse_op.register_fake
def _(features, rois, global_feat, gate_weight, gate_bias, spatial_scale, output_size, sampling_ratio,
      aligned, channels_last, backend):
    k = rois.shape[0]
    c = features.shape[3] if channels_last else features.shape[1]
    acc = acc_dtype(features.dtype)
    return (features.new_empty((k, c)), features.new_empty((k, c), dtype=acc),
            features.new_empty((k,), dtype=acc))


@_roi_pool_fuse_backward_op.register_fake
def _(grad_z, rois, global_feat, gate_weight, r, a, spatial_scale, output_size, sampling_ratio, aligned,
      channels_last, batch, height, width, backend):
    c = global_feat.shape[1]
    shape = (batch, height, width, c) if channels_last else (batch, c, height, width)
    return (grad_z.new_empty(shape), global_feat.new_empty(global_feat.shape),
            gate_weight.new_empty(gate_weight.shape), gate_weight.new_empty((1,)))


_roi_align_op.register_autograd(_align_grads(_roi_align_backward_op), setup_context=_align_setup)
_roi_pool_fuse_op.register_autograd(_fuse_grads(_roi_pool_fuse_backward_op), setup_context=_fuse_setup)


def _run_align(*args) -> Tensor:
    return _roi_align_op(*args) if torch.compiler.is_compiling() else _RoIAlignFn.apply(*args)


def _run_fuse(*args) -> tuple[Tensor, Tensor, Tensor]:
    return _roi_pool_fuse_op(*args) if torch.compiler.is_compiling() else _RoIPoolFuseFn.apply(*args)


# ---------------------------------------------------------------- validation

def _features_nhwc_or_nchw(op: str, features: Tensor, layout: str, grid_size) -> tuple[Tensor, bool]:
    """Features as the contiguous 4-d tensor the kernels take, and whether it is channels-last."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{op}: features must be a torch.Tensor, got {type(features).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {_LAYOUTS}, got {layout!r}")
    if features.dtype not in _FLOATS:
        raise TypeError(f"{op}: features dtype must be one of {_FLOATS}, got {features.dtype}")
    if layout == "nhwc" and features.dim() == 3:
        if grid_size is None:
            raise ValueError(f"{op}: features {tuple(features.shape)} is [B, H*W, C]: pass grid_size=(H, W)")
        h, w = (int(v) for v in grid_size)
        if h * w != features.shape[1]:
            raise ValueError(f"{op}: grid_size={tuple(grid_size)} has {h * w} cells but features has "
                             f"{features.shape[1]} tokens")
        return features.contiguous().view(features.shape[0], h, w, features.shape[2]), True
    if features.dim() != 4:
        want = "[B, C, H, W]" if layout == "nchw" else "[B, H, W, C] or [B, H*W, C]"
        raise ValueError(f"{op}: features must be {want} for layout={layout!r}, got {tuple(features.shape)}")
    f = features.contiguous()
    cl = layout == "nhwc"
    h, w = (f.shape[1], f.shape[2]) if cl else (f.shape[2], f.shape[3])
    if h < 1 or w < 1:
        raise ValueError(f"{op}: feature map is empty ({h}x{w})")
    return f, cl


def _rois(op: str, boxes, features: Tensor, batch: int, check_boxes: bool | None) -> Tensor:
    """``[K, 5]`` rois in the kernels' coordinate dtype (float32, float64 for float64 features);
    their values are checked when ``check_boxes`` says so (default: on CPU tensors, eagerly)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{op}: boxes as a tensor must be [K, 5] (batch index, x1, y1, x2, y2), "
                             f"got {tuple(boxes.shape)}; per-image [K_i, 4] boxes go in a list")
    elif isinstance(boxes, (list, tuple)):
        if len(boxes) != batch:
            raise ValueError(f"{op}: boxes is a list of {len(boxes)} tensors but features has batch {batch}")
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"{op}: boxes[{i}] must be a [K_i, 4] tensor (x1, y1, x2, y2), got {shape}")
        if not boxes:
            return features.new_zeros((0, 5), dtype=acc_dtype(features.dtype))
    else:
        raise TypeError(f"{op}: boxes must be a [K, 5] tensor or a list of [K_i, 4] tensors, "
                        f"got {type(boxes).__name__}")
    rois = as_rois(boxes)
    if rois.device != features.device:
        raise ValueError(f"{op}: boxes are on {rois.device} but features are on {features.device}")
    rois = rois.to(acc_dtype(features.dtype)).contiguous()
    check = features.device.type == "cpu" if check_boxes is None else bool(check_boxes)
    if check and rois.shape[0] > 0 and not torch.compiler.is_compiling():
        _check_rois(op, rois, batch)
    return rois


def _check_rois(op: str, rois: Tensor, batch: int) -> None:
    """Raise on the first bad box; one host synchronisation (on a GPU) when all are good. CPU
    rois are checked through numpy, whose small-array operations cost a tenth of torch's."""
    on_cpu = rois.device.type == "cpu"
    xp, r = (np, rois.detach().numpy()) if on_cpu else (torch, rois)
    idx, x1, y1, x2, y2 = (r[:, i] for i in range(5))
    # NaN compares false, so `x2 >= x1` also fails for NaN coordinates
    good = (xp.isfinite(r).all(1) & (idx >= 0) & (idx < batch) & (idx == xp.floor(idx))
            & (x2 >= x1) & (y2 >= y1))
    if bool(good.all()):
        return
    k = int(np.flatnonzero(~good)[0]) if on_cpu else int((~good).nonzero()[0])
    row = rois[k].tolist()
    if not all(np.isfinite(row)):
        raise ValueError(f"{op}: box {k} has a NaN or infinite coordinate: {row}")
    b = row[0]
    if not (0 <= b < batch and b == int(b)):
        raise ValueError(f"{op}: box {k} has batch index {b:g}, outside [0, {batch}) or not an integer "
                         f"(features batch size is {batch})")
    raise ValueError(f"{op}: box {k} has reversed corners (x2 < x1 or y2 < y1): (x1, y1, x2, y2) = {row[1:]}")


def _output_size(op: str, output_size) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"{op}: output_size must be a positive int or a pair of them, got {output_size!r}")
    return size


def _same_device_dtype(op: str, name: str, t: Tensor, features: Tensor, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != features.device:
        raise ValueError(f"{op}: {name} is on {t.device} but features are on {features.device}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} dtype must be one of {_FLOATS}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    return t.contiguous()


def _fx_leaf(fn: Callable) -> Callable:
    """Makes ``fn`` one node of a ``torch.fx.symbolic_trace`` graph wherever it is called from
    (``torch.fx.wrap`` covers only calls made inside the defining module)."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            for x in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(x, torch.fx.Proxy):
                    return x.tracer.create_proxy("call_function", op, args, kwargs)
        return fn(*args, **kwargs)
    return op


# ---------------------------------------------------------------- public API

@_fx_leaf
def roi_align(features: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              layout: str = "nchw", *, grid_size: tuple[int, int] | None = None,
              check_boxes: bool | None = None, backend: str = "auto") -> Tensor:
    """RoIAlign with ``torchvision.ops.roi_align`` semantics.

    Args:
        features: ``[B, C, H, W]`` (``layout="nchw"``), or ``[B, H, W, C]`` / ``[B, H*W, C]`` with
            ``grid_size=(H, W)`` (``layout="nhwc"``, e.g. ViT patch tokens; no permute copy).
            float32, float64, bfloat16 or float16 (accumulated in float32; float64 in float64).
        boxes: ``[K, 5]`` (batch index, x1, y1, x2, y2) or a list of B ``[K_i, 4]`` tensors, in
            input-image coordinates (multiplied by ``spatial_scale``).
        output_size: ``S`` or ``(PH, PW)`` bins per roi.
        sampling_ratio: samples per bin side; ``<= 0`` means adaptive ``ceil(roi_size / S)``.
        aligned: shift by half a pixel (torchvision's ``aligned=True``).
        check_boxes: raise ``ValueError`` naming the first box with a NaN/infinite coordinate, a
            batch index that is not an integer in ``[0, B)``, or reversed corners. Costs one host
            synchronisation; ``None`` (default) checks CPU tensors only. Unchecked, such a box gives
            a NaN output row and no gradient (reversed corners follow torchvision). Not done while
            ``torch.compile`` / ``torch.export`` trace.
        backend: ``reference``, ``cpp`` (alias ``cpu``), ``triton``, ``cuda`` or ``auto``.

    Returns:
        ``[K, C, PH, PW]`` in the features' dtype, whatever the layout.
    """
    op = "roi_align"
    ph, pw = _output_size(op, output_size)
    f, cl = _features_nhwc_or_nchw(op, features, layout, grid_size)
    rois = _rois(op, boxes, f, f.shape[0], check_boxes)
    chosen = BACKENDS.resolve(backend, f.device)
    if chosen == "reference":
        return roi_align_reference(f, rois, (ph, pw), spatial_scale, sampling_ratio, aligned,
                                   "nhwc" if cl else "nchw")
    return _run_align(f, rois, float(spatial_scale), ph, pw, int(sampling_ratio), bool(aligned), cl, chosen)


@_fx_leaf
def roi_pool_fuse(features: Tensor, boxes: Tensor | Sequence[Tensor], global_feat: Tensor, gate_weight: Tensor,
                  gate_bias: Tensor, output_size: int = 7, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                  aligned: bool = False, layout: str = "nchw", *, grid_size: tuple[int, int] | None = None,
                  return_parts: bool = False, check_boxes: bool | None = None,
                  backend: str = "auto") -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Fused RoIAlign + mean over the S x S bins + scalar sigmoid gate + blend (docs/roi.md).

    ``r_k`` = mean of RoIAlign(features[b_k], box_k) over its bins, ``g_k = global_feat[b_k]``,
    ``a_k = sigmoid(<gate_weight[0], r_k> + <gate_weight[1], g_k> + gate_bias)``,
    ``z_k = a_k r_k + (1 - a_k) g_k``. The compiled and Triton backends never form the
    ``[K, C, S, S]`` RoIAlign output.

    Args:
        features, boxes, spatial_scale, sampling_ratio, aligned, layout, grid_size, check_boxes,
            backend: as :func:`roi_align` (an unchecked invalid box gives NaN ``z``, ``r``, ``a``
            rows and no gradient).
        global_feat: ``[B, C]`` image-level features.
        gate_weight: ``[2, C]``; gate_bias: ``[1]`` (or a 0-d tensor).
        output_size: ``S`` bins per side.
        return_parts: also return ``r [K, C]`` and ``a [K]`` (accumulation dtype, detached: for
            inspection; gradients flow through ``z``).

    Returns:
        ``z [K, C]`` in the features' dtype, or ``(z, r, a)``.
    """
    op = "roi_pool_fuse"
    if not isinstance(output_size, int) or output_size < 1:
        raise ValueError(f"{op}: output_size must be a positive int, got {output_size!r}")
    f, cl = _features_nhwc_or_nchw(op, features, layout, grid_size)
    b = f.shape[0]
    c = f.shape[3] if cl else f.shape[1]
    rois = _rois(op, boxes, f, b, check_boxes)
    global_feat = _same_device_dtype(op, "global_feat", global_feat, f, (b, c))
    gate_weight = _same_device_dtype(op, "gate_weight", gate_weight, f, (2, c))
    if isinstance(gate_bias, Tensor) and gate_bias.dim() == 0:
        gate_bias = gate_bias.reshape(1)
    gate_bias = _same_device_dtype(op, "gate_bias", gate_bias, f, (1,))
    chosen = BACKENDS.resolve(backend, f.device)
    if chosen == "reference":
        z, r, a = roi_pool_fuse_reference(f, rois, global_feat, gate_weight, gate_bias, output_size, spatial_scale,
                                          sampling_ratio, aligned, "nhwc" if cl else "nchw", return_parts=True)
    else:
        z, r, a = _run_fuse(f, rois, global_feat, gate_weight, gate_bias, float(spatial_scale), int(output_size),
                            int(sampling_ratio), bool(aligned), cl, chosen)
    return (z, r.detach(), a.detach()) if return_parts else z
