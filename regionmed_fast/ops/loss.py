"""``chunked_clip_loss``: CLIP / SigLIP loss over N images and M texts without the N x M logits.

Math (``t_ij = logit_scale * <image_i, text_j>``, ``s_ij = t_ij + logit_bias``):

* softmax (CLIP / InfoNCE, symmetric): ``L = 1/2 [mean_i l_i + mean_j l'_j]`` with
  ``l_i = log D_i - mean_{j in P(i)} s_ij``. ``D_i = sum_j e^{s_ij}`` for plain InfoNCE; with
  ``hard_negative_beta = b > 0`` (HN-NCE, Radenovic et al. 2023) the negatives are re-weighted by
  ``w_ij = n_neg e^{b s_ij} / sum_{k neg} e^{b s_ik}``:
  ``D_i = sum_{j in P(i)} e^{s_ij} + n_neg * sum_neg e^{(1+b) s_ij} / sum_neg e^{b s_ij}``;
  the same for columns (texts) with the column's negatives. Rows without a positive are left
  out of the mean. The bias cancels (its gradient is zero).
* sigmoid (SigLIP): ``L = 1/N sum_ij softplus(s_ij) - 1/N sum_{(i,j) positive} s_ij``, which is
  ``-1/N sum log sigmoid(z_ij s_ij)``, ``z = +-1``.

The pairwise part is computed by a backend engine tile by tile (forward keeps only per-row and
per-column log-sum-exps; backward recomputes the logits); the positive part is closed-form over
per-group sums of the embeddings (O((N + M) D)), so multi-positives cost nothing extra.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from regionmed_fast.ops import _backend
from regionmed_fast.ops import loss_cpu
from regionmed_fast.ops.loss_reference import clip_loss_reference

__all__ = ["chunked_clip_loss", "BACKENDS", "CPU_SINGLE_TILE_BYTES"]

_OP = "chunked_clip_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: With ``chunk_size=None`` the cpu backend computes the logits as one tile up to this size (fp32)
#: and in ``loss_cpu.DEFAULT_TILE`` tiles above: measured, tiles are as fast from 4096^2 on and
#: use O(tile) memory (the triton backend's own limit is ``kernels/loss.py: BWD_BUFFER_BYTES``).
CPU_SINGLE_TILE_BYTES = 16 * 2**20


class _LocalComm:
    """The single-process stand-in for :class:`loss_distributed.GroupComm`."""

    world = 1
    rank = 0

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def lse(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def offset(self, n: int) -> int:
        return 0


@dataclass
class _Spec:
    kind: str
    beta: float
    engine: Any
    tile: Any
    comm: Any
    gi: torch.Tensor        # group ids of the local images [n]
    gt: torch.Tensor        # group ids of the local texts [m]
    gi_all: torch.Tensor    # group ids of all images [N]
    gt_all: torch.Tensor    # group ids of all texts [M]
    groups: int
    local_diag: bool        # positives=None in one process: text i is image i's only positive


def _triton_check(device: torch.device) -> str:
    reason = _backend.triton_device_status(device)
    if reason:
        return reason
    try:
        from regionmed_fast.kernels import loss as _  # noqa: F401
    except Exception as exc:
        return f"regionmed_fast.kernels.loss not importable: {type(exc).__name__}: {exc}"
    return ""


#: The loss's backends; ``cpu`` means ``torch-tiled`` (PyTorch GEMMs over logit tiles, which
#: needs no compiled extension).
BACKENDS = _backend.BackendTable(
    _OP,
    [_backend.Backend("reference", "plain PyTorch with the full logits (regionmed_fast/ops/loss_reference.py)",
                      ("cpu", "cuda")),
     _backend.Backend("torch-tiled", "PyTorch GEMMs over logit tiles, fused log-sum-exp passes "
                      "(regionmed_fast/ops/loss_cpu.py)", ("cpu",)),
     _backend.Backend("triton", "Triton kernels (kernels/loss.py)", ("cuda",), _triton_check)],
    auto={"cpu": ("torch-tiled", "reference"), "cuda": ("triton", "reference")},
    aliases={"cpu": "torch-tiled"},
)


def _engine(backend: str):
    if backend == "torch-tiled":
        return loss_cpu
    from regionmed_fast.kernels import loss as triton_loss  # imports triton only when asked

    return triton_loss


def _index_sum(groups: int, ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.zeros(groups, v.shape[1], dtype=v.dtype, device=v.device).index_add_(0, ids, v)


def _log_d(stats: torch.Tensor, nneg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log D, log T)`` per row from the engine's stats (``log T``: the HN-NCE negatives' mass)."""
    if stats.shape[0] == 1:
        return stats[0], stats[0]
    ninf = torch.full_like(stats[0], float("-inf"))
    log_t = torch.where(nneg > 0, torch.log(nneg.clamp(min=1).to(stats.dtype)) + stats[1] - stats[2], ninf)
    return torch.logaddexp(stats[0], log_t), log_t


def _shifts(stats: torch.Tensor, log_d: torch.Tensor, log_t: torch.Tensor, w: torch.Tensor,
            nneg: torch.Tensor) -> torch.Tensor:
    """Per-row shifts ``a`` such that ``dL/dt`` is a sum of ``exp(c * t - a)`` terms (see loss_cpu)."""
    inf = torch.full_like(log_d, float("inf"))
    log_w = torch.where(w > 0, torch.log(w.clamp(min=1e-300)), -inf)
    s0 = torch.where(w > 0, log_d - log_w, inf)
    if stats.shape[0] == 1:
        return s0[None]
    ok = (w > 0) & (nneg > 0)
    rest = log_d - log_w - torch.where(ok, log_t, torch.zeros_like(log_t))
    s1 = torch.where(ok, stats[1] + rest, inf)
    s2 = torch.where(ok, stats[2] + rest, inf)
    return torch.stack([s0, s1, s2])


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1).to(b.dtype), b.reshape(-1))


def _pos_rows(spec: _Spec, a: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """``z_i = a_i sum_{j in P(i)} y_j + sum_{j in P(i)} b_j y_j`` for the local images."""
    # converted here, not by the caller, so that an fp32 copy of a bf16 input lives briefly
    yf = y.to(a.dtype)
    if spec.local_diag:
        return yf * (a if b is None else a + b)[:, None]
    z = spec.comm.sum(_index_sum(spec.groups, spec.gt, yf))[spec.gi].mul_(a[:, None])
    if b is not None:
        z += spec.comm.sum(_index_sum(spec.groups, spec.gt, yf * b[:, None]))[spec.gi]
    return z


def _pos_cols(spec: _Spec, a: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``sum_{i in P(j)} a_i x_i + b_j sum_{i in P(j)} x_i`` for the local texts."""
    xf = x.to(a.dtype)
    if spec.local_diag:
        return xf * (a if b is None else a + b)[:, None]
    out = spec.comm.sum(_index_sum(spec.groups, spec.gi, xf * a[:, None]))[spec.gt]
    if b is not None:
        out += spec.comm.sum(_index_sum(spec.groups, spec.gi, xf))[spec.gt].mul_(b[:, None])
    return out


# An engine sees only non-empty row blocks: under a group a rank's shard may have no rows, and
# it still takes part in every collective with these neutral partial results.

def _softmax_stats(eng, x, yg, scale, gi, gt, beta, tile):
    if x.shape[0] == 0:
        k = 3 if beta > 0 else 1
        cd = loss_cpu.compute_dtype(x.dtype)
        return (x.new_empty((k, 0), dtype=cd),
                torch.full((k, yg.shape[0]), float("-inf"), dtype=cd, device=x.device))
    return eng.softmax_stats(x, yg, scale, gi, gt, beta, tile)


def _softmax_grads(eng, x, yg, scale, gi, gt, beta, row_shift, col_shift, tile):
    if x.shape[0] == 0:
        cd = loss_cpu.compute_dtype(x.dtype)
        return x.new_zeros(x.shape, dtype=cd), yg.new_zeros(yg.shape, dtype=cd)
    return eng.softmax_grads(x, yg, scale, gi, gt, beta, row_shift, col_shift, tile)


def _sigmoid_sum(eng, x, yg, scale, bias, tile):
    if x.shape[0] == 0:
        return x.new_zeros((), dtype=loss_cpu.compute_dtype(x.dtype))
    return eng.sigmoid_sum(x, yg, scale, bias, tile)


def _sigmoid_grads(eng, x, yg, scale, bias, coef, tile):
    if x.shape[0] == 0:
        cd = loss_cpu.compute_dtype(x.dtype)
        return (x.new_zeros(x.shape, dtype=cd), yg.new_zeros(yg.shape, dtype=cd),
                x.new_zeros((), dtype=cd))
    return eng.sigmoid_grads(x, yg, scale, bias, coef, tile)


def _threading(spec: _Spec):
    # cpu backend: parallel over tiles only (see loss_cpu.threads_as_workers)
    return loss_cpu.threads_as_workers() if spec.engine is loss_cpu else contextlib.nullcontext()


class _ClipLossFn(torch.autograd.Function):
    """Loss = pairwise part (engine, tile by tile) - positive part (closed form, O((N+M) D)).

    With per-image weights ``a`` and per-text weights ``b`` the positive part is
    ``scale * sum_i <x_i, z_i>`` (+ the bias for SigLIP), see :func:`_pos_rows`.
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, spec: _Spec):
        with _threading(spec):
            return _ClipLossFn._forward(ctx, x, y, scale, bias, spec)

    @staticmethod
    def backward(ctx, grad_out):
        with _threading(ctx.spec):
            return _ClipLossFn._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, x, y, scale, bias, spec: _Spec):
        comm, eng = spec.comm, spec.engine
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        yg = comm.gather(y)
        n_all, m_all = spec.gi_all.numel(), spec.gt_all.numel()
        cnt_t = torch.bincount(spec.gt_all, minlength=spec.groups)
        cnt_i = torch.bincount(spec.gi_all, minlength=spec.groups)
        p_loc = cnt_t[spec.gi]                    # positives of each local image
        scale_c = scale.to(cd)
        if spec.kind == "softmax":
            nv = int((cnt_t[spec.gi_all] > 0).sum())
            mv = int((cnt_i[spec.gt_all] > 0).sum())
            if nv == 0 or mv == 0:
                raise ValueError("positives: no image id matches any text id")
            w = (p_loc > 0).to(cd) * (0.5 / nv)
            q_all = cnt_i[spec.gt_all]
            v_all = (q_all > 0).to(cd) * (0.5 / mv)
            hard = spec.beta > 0
            rows, cols = _softmax_stats(eng, x, yg, scale, spec.gi if hard else None,
                                        spec.gt_all if hard else None, spec.beta, spec.tile)
            rows, cols = rows.to(cd), comm.lse(cols.to(cd))
            nneg_r, nneg_c = m_all - p_loc, n_all - q_all
            logd_r, logt_r = _log_d(rows, nneg_r)
            logd_c, logt_c = _log_d(cols, nneg_c)
            lse_part = comm.sum(torch.where(w > 0, w * logd_r, 0.0).sum()) + \
                torch.where(v_all > 0, v_all * logd_c, 0.0).sum()
            a = w / p_loc.clamp(min=1)
            off = comm.offset(y.shape[0])
            b = v_all[off: off + y.shape[0]] / cnt_i[spec.gt].clamp(min=1)
            loss = lse_part - scale_c * comm.sum(_dot(x, _pos_rows(spec, a, b, y)))
            ctx.shifts = (_shifts(rows, logd_r, logt_r, w, nneg_r), _shifts(cols, logd_c, logt_c, v_all, nneg_c))
        else:
            inv_n = 1.0 / n_all
            a, b = torch.full_like(p_loc, inv_n, dtype=cd), None
            npos = float(cnt_t[spec.gi_all].sum())
            pair = comm.sum(_sigmoid_sum(eng, x, yg, scale, bias, spec.tile).to(cd))
            loss = pair * inv_n - scale_c * comm.sum(_dot(x, _pos_rows(spec, a, b, y))) \
                - bias.to(cd) * (npos * inv_n)
            ctx.npos, ctx.inv_n = npos, inv_n
        ctx.spec, ctx.a, ctx.b = spec, a, b
        ctx.save_for_backward(x, y, yg, scale, bias)
        return loss

    @staticmethod
    def _backward(ctx, grad_out):
        x, y, yg, scale, bias = ctx.saved_tensors
        spec = ctx.spec
        comm, eng = spec.comm, spec.engine
        cd = ctx.a.dtype
        scale_c = scale.to(cd)
        g = grad_out.to(cd)
        if spec.kind == "softmax":
            hard = spec.beta > 0
            gx, gy = _softmax_grads(eng, x, yg, scale, spec.gi if hard else None,
                                    spec.gt_all if hard else None, spec.beta, ctx.shifts[0],
                                    ctx.shifts[1], spec.tile)
            gbias = torch.zeros((), dtype=cd, device=x.device)
        else:
            gx, gy, gsum = _sigmoid_grads(eng, x, yg, scale, bias, ctx.inv_n, spec.tile)
            gbias = g * (comm.sum(gsum.to(cd)) - ctx.npos * ctx.inv_n)
        # in place from here on: at large N these [N, D] buffers are most of the memory we use
        gx = gx.to(cd).sub_(_pos_rows(spec, ctx.a, ctx.b, y))
        grad_scale = g * comm.sum(_dot(x, gx))
        grad_x = gx.mul_(g * scale_c)
        off = comm.offset(y.shape[0])
        grad_y = comm.sum(gy.to(cd))[off: off + y.shape[0]]
        grad_y.sub_(_pos_cols(spec, ctx.a, ctx.b, x).mul_(scale_c)).mul_(g)
        return (grad_x.to(x.dtype), grad_y.to(y.dtype), grad_scale.to(scale.dtype).reshape(scale.shape),
                gbias.to(bias.dtype).reshape(bias.shape), None)


def _as_scalar(v, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(v):
            raise ValueError(f"{_OP}: {name} must be finite, got {v}")
        return torch.tensor(float(v), device=device)
    if not torch.is_tensor(v):
        raise TypeError(f"{_OP}: {name} must be a number or a one-element tensor, got {type(v).__name__}")
    if v.numel() != 1:
        raise ValueError(f"{_OP}: {name} must have one element, got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{_OP}: {name} must be a floating tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{_OP}: {name} is on {v.device} but the embeddings are on {device}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{_OP}: {name} is not finite ({v.item()})")
    return v


def _check_emb(x, name: str, distributed: bool) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{_OP}: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{_OP}: {name} must be 2-D [batch, dim], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{_OP}: {name} must be float16/bfloat16/float32/float64, got {x.dtype}")
    # under a group a rank's shard may hold no rows (the global batch is checked in _group_ids)
    if (x.shape[0] == 0 and not distributed) or x.shape[1] == 0:
        raise ValueError(f"{_OP}: {name} is empty (shape {tuple(x.shape)})")


def _check_finite(x: torch.Tensor, name: str) -> None:
    # one reduction pass (NaN propagates through min/max); the mask only on failure
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        bad = ~torch.isfinite(x)
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"{_OP}: {name} has {int(bad.sum())} NaN/Inf values (first at index {where})")


def _check_ids(v, name: str, n: int, device: torch.device) -> torch.Tensor:
    if not torch.is_tensor(v) or v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
        raise TypeError(f"{_OP}: {name} must be an integer tensor, got "
                        f"{v.dtype if torch.is_tensor(v) else type(v).__name__}")
    if v.dim() != 1 or v.numel() != n:
        raise ValueError(f"{_OP}: {name} must have shape [{n}], got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{_OP}: {name} is on {v.device} but the embeddings are on {device}")
    return v.long()


def _tile(chunk_size, backend: str, n: int, m: int, itemsize: int):
    if chunk_size is None:
        if backend == "torch-tiled" and n * m * 4 <= CPU_SINGLE_TILE_BYTES:
            return (-(-n // max(1, torch.get_num_threads())), m)  # one row block per thread
        return loss_cpu.DEFAULT_TILE if backend == "torch-tiled" else None
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool):
        chunk_size = (chunk_size, chunk_size)
    if (not isinstance(chunk_size, (tuple, list)) or len(chunk_size) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in chunk_size)):
        raise ValueError(f"{_OP}: chunk_size must be None, an int >= 1 or (rows, cols), got {chunk_size!r}")
    return tuple(chunk_size)


def chunked_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                      logit_bias=None, *, positives=None, hard_negative_beta: float = 0.0,
                      kind: str = "softmax", chunk_size=None, group=None,
                      backend: str = "auto") -> torch.Tensor:
    """Symmetric CLIP (or SigLIP) loss without materialising the ``N x M`` logits.

    Args:
        image_emb: ``[N, D]`` float16 / bfloat16 / float32 / float64 (not normalised here).
        text_emb: ``[M, D]``, same dtype and device.
        logit_scale: number or one-element tensor, already exponentiated (open_clip passes
            ``model.logit_scale.exp()``); gets a gradient when it requires one.
        logit_bias: optional number or one-element tensor added to every logit (SigLIP).
        positives: ``None`` pairs image ``i`` with text ``i`` (needs ``N == M``), or
            ``(image_ids [N], text_ids [M])`` integer tensors: every pair with equal ids is a
            positive (rows with no positive are left out of the softmax means).
        hard_negative_beta: HN-NCE ``beta >= 0`` (softmax only); 0 is plain InfoNCE.
        kind: ``"softmax"`` (CLIP) or ``"sigmoid"`` (SigLIP, ``open_clip.SigLipLoss``).
        chunk_size: logits tile ``int`` or ``(rows, cols)`` (cpu backend; the triton backend
            uses it as the rows of its backward buffer). ``None``: automatic.
        group: a ``torch.distributed`` process group; each rank passes its own shard (and its
            shard's ids) and gets the loss of the global batch with gradients for its shard.
            A rank's shard may have zero rows (the others not all): that rank gets the same
            global loss, empty gradients for its empty inputs and the full ``logit_scale``
            gradient; an empty global batch raises on every rank.
        backend: ``"auto"``, ``"torch-tiled"`` (alias ``"cpu"``), ``"triton"`` or
            ``"reference"`` (full logits); see :data:`BACKENDS`.

    Returns:
        0-d float32 tensor (float64 for float64 inputs): the loss, identical on every rank.
    """
    _check_emb(image_emb, "image_emb", group is not None)
    _check_emb(text_emb, "text_emb", group is not None)
    if text_emb.device != image_emb.device:
        raise ValueError(f"{_OP}: text_emb is on {text_emb.device} but image_emb is on {image_emb.device}")
    if text_emb.dtype != image_emb.dtype:
        raise TypeError(f"{_OP}: image_emb is {image_emb.dtype} but text_emb is {text_emb.dtype}")
    if text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"{_OP}: embedding sizes differ: image_emb {tuple(image_emb.shape)}, "
                         f"text_emb {tuple(text_emb.shape)}")
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"{_OP}: kind must be 'softmax' or 'sigmoid', got {kind!r}")
    beta = hard_negative_beta
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"{_OP}: hard_negative_beta must be a finite number >= 0, got {beta!r}")
    beta = float(beta)
    if beta > 0 and kind != "softmax":
        raise ValueError(f"{_OP}: hard_negative_beta applies to kind='softmax' only")
    device = image_emb.device
    n, m = image_emb.shape[0], text_emb.shape[0]
    scale = _as_scalar(logit_scale, "logit_scale", device)
    bias = None if logit_bias is None else _as_scalar(logit_bias, "logit_bias", device)
    _check_finite(image_emb, "image_emb")
    _check_finite(text_emb, "text_emb")
    if positives is not None:
        if not isinstance(positives, (tuple, list)) or len(positives) != 2:
            raise TypeError(f"{_OP}: positives must be None or (image_ids [N], text_ids [M])")
        positives = (_check_ids(positives[0], "positives[0] (image_ids)", n, device),
                     _check_ids(positives[1], "positives[1] (text_ids)", m, device))
    chosen = BACKENDS.resolve(backend, device)
    if chosen == "reference":
        if group is not None:
            raise ValueError(f"{_OP}: backend='reference' has no distributed path; use 'torch-tiled' or 'triton'")
        return clip_loss_reference(image_emb, text_emb, scale, bias, positives=positives,
                                   hard_negative_beta=beta, kind=kind)
    tile = _tile(chunk_size, chosen, n, m, image_emb.element_size())
    if group is None:
        comm = _LocalComm()
    else:
        from regionmed_fast.ops.loss_distributed import GroupComm

        comm = GroupComm(group, device)
    gi, gt, gi_all, gt_all, groups = _group_ids(positives, n, m, comm, device)
    if bias is None:
        bias_t = torch.zeros((), dtype=torch.float32, device=device)
    else:
        bias_t = bias
    spec = _Spec(kind, beta, _engine(chosen), tile, comm, gi, gt, gi_all, gt_all, groups,
                 positives is None and group is None)
    return _ClipLossFn.apply(image_emb.contiguous(), text_emb.contiguous(), scale, bias_t, spec)


def _group_ids(positives, n: int, m: int, comm, device: torch.device):
    """Compact group ids ``0..G-1`` for local and global images and texts."""
    sizes = comm.gather(torch.tensor([[n, m]], device=device)).sum(0)
    n_tot, m_tot = int(sizes[0]), int(sizes[1])
    if n_tot == 0 or m_tot == 0:  # every rank sees the same totals, so every rank raises
        raise ValueError(f"{_OP}: the global batch is empty (N={n_tot} images, M={m_tot} texts "
                         "over all ranks)")
    if positives is None:
        if n_tot != m_tot:
            raise ValueError(f"{_OP}: positives=None pairs image i with text i and needs N == M, got "
                             f"N={n_tot}, M={m_tot}; pass positives=(image_ids, text_ids)")
        total = n_tot
        off_i, off_t = comm.offset(n), comm.offset(m)
        ids = torch.arange(total, device=device)
        return ids[off_i: off_i + n], ids[off_t: off_t + m], ids, ids, total
    ii_all, tt_all = comm.gather(positives[0]), comm.gather(positives[1])
    uniq, inv = torch.unique(torch.cat([ii_all, tt_all]), return_inverse=True)
    gi_all, gt_all = inv[: ii_all.numel()], inv[ii_all.numel():]
    off_i, off_t = comm.offset(n), comm.offset(m)
    return gi_all[off_i: off_i + n], gt_all[off_t: off_t + m], gi_all, gt_all, uniq.numel()
