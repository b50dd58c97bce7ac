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
from regionmed_fast.ops.loss_full import full_clip_loss
from regionmed_fast.ops.loss_math import F64, log_d, rowdot, shifts, softmax_terms
from regionmed_fast.ops.loss_reference import clip_loss_reference

__all__ = ["chunked_clip_loss", "BACKENDS", "CPU_SINGLE_TILE_BYTES", "FULL_LOGITS_MAX"]

_OP = "chunked_clip_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: With ``chunk_size=None`` the cpu backend computes the logits as one row block per thread up
#: to this size (fp32) and in ``loss_cpu.DEFAULT_TILE`` tiles above, which cost O(tile) memory
#: and are no slower there (docs/loss.md; the triton backend's own limit is
#: ``kernels/loss.py: BWD_BUFFER_BYTES``).
CPU_SINGLE_TILE_BYTES = 16 * 2**20
#: ``auto`` (one process, ``chunk_size=None``) computes the whole ``N x M`` logits
#: (``torch-full``) while ``N * M`` is at most this, per device type, and tiles above; see
#: docs/loss.md (Performance) for the measured crossover.
FULL_LOGITS_MAX = {"cpu": 2048 * 2048, "cuda": 4096 * 4096}


class _LocalComm:
    """The single-process stand-in for :class:`loss_distributed.GroupComm`."""

    world = 1
    rank = 0

    def rank_sizes(self, n: int, m: int) -> tuple[list[int], list[int]]:
        return [n], [m]

    def gather(self, t: torch.Tensor, sizes=None) -> torch.Tensor:
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def lse(self, t: torch.Tensor) -> torch.Tensor:
        return t


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
    sizes_i: list[int]      # every rank's number of images
    sizes_t: list[int]      # every rank's number of texts
    local_loss: bool        # this rank's rows as queries (only under a group of 2+ ranks)
    gather_with_grad: bool  # gradients of every rank's loss reach the features' owner
    diagonal: bool = False  # one process, image i's only positive is text i (no group sums)

    @property
    def text_offset(self) -> int:
        """Index of this rank's first text among every rank's texts."""
        return sum(self.sizes_t[: self.comm.rank])


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
#: needs no compiled extension). ``auto`` takes ``torch-full`` for one process while
#: ``N * M <= FULL_LOGITS_MAX[device type]``, else the device's tiled backend.
BACKENDS = _backend.BackendTable(
    _OP,
    [_backend.Backend("reference", "plain PyTorch with the full logits (regionmed_fast/ops/loss_reference.py)",
                      ("cpu", "cuda")),
     _backend.Backend("torch-full", "PyTorch over the full logits, hand-written backward "
                      "(regionmed_fast/ops/loss_full.py); auto's choice for small N x M", ("cpu", "cuda")),
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


def _gsum(spec: _Spec, ids: torch.Tensor, v: torch.Tensor, wt: torch.Tensor | None = None) -> torch.Tensor:
    """``[G, D]``: per group id, the sum over every rank's rows of ``wt_k v_k``."""
    if wt is not None:
        v = v * wt.to(v.dtype)[:, None]
    return spec.comm.sum(_index_sum(spec.groups, ids, v))


# An engine sees only non-empty row blocks: under a group a rank's shard may have no rows, and
# it still takes part in every collective with these neutral partial results.

def _softmax_stats(eng, x, yg, scale, gi, gt, beta, tile):
    if x.shape[0] == 0:
        k = 3 if beta > 0 else 1
        return (x.new_empty((k, 0), dtype=F64),
                torch.full((k, yg.shape[0]), float("-inf"), dtype=F64, device=x.device))
    rows, cols = eng.softmax_stats(x, yg, scale, gi, gt, beta, tile)
    return rows.to(F64), cols.to(F64)


def _softmax_grads(eng, x, yg, scale, gi, gt, beta, row_shift, col_shift, tile):
    if x.shape[0] == 0:
        cd = loss_cpu.compute_dtype(x.dtype)
        return x.new_zeros(x.shape, dtype=cd), yg.new_zeros(yg.shape, dtype=cd)
    return eng.softmax_grads(x, yg, scale, gi, gt, beta, row_shift, col_shift, tile)


def _sigmoid_sum(eng, x, yg, scale, bias, tile):
    if x.shape[0] == 0:
        return x.new_zeros((), dtype=F64)
    return eng.sigmoid_sum(x, yg, scale, bias, tile).to(F64)


def _sigmoid_grads(eng, x, yg, scale, bias, coef, tile):
    if x.shape[0] == 0:
        cd = loss_cpu.compute_dtype(x.dtype)
        return (x.new_zeros(x.shape, dtype=cd), yg.new_zeros(yg.shape, dtype=cd),
                x.new_zeros((), dtype=F64))
    gx, gy, gsum = eng.sigmoid_grads(x, yg, scale, bias, coef, tile)
    return gx, gy, gsum.to(F64)


def _threading(spec: _Spec):
    # cpu backend: parallel over tiles only (see loss_cpu.threads_as_workers)
    return loss_cpu.threads_as_workers() if spec.engine is loss_cpu else contextlib.nullcontext()


def _no_autocast(device: torch.device):
    """The loss runs in float32 (float64) whatever autocast says: its GEMMs feed exps."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _ClipLossFn(torch.autograd.Function):
    """Loss = pairwise part (engine, tile by tile) - positive part (closed form, O((N+M) D)).

    The positive part uses per-group sums of the embeddings (``Ysum``, ``Xsum``, see
    :func:`_gsum`); the gradients' positive parts are their per-row weighted copies.
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, spec: _Spec):
        with _threading(spec), _no_autocast(x.device):
            return _ClipLossFn._forward(ctx, x, y, scale, bias, spec)

    @staticmethod
    def backward(ctx, grad_out):
        with _threading(ctx.spec), _no_autocast(grad_out.device):
            return _ClipLossFn._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, x, y, scale, bias, spec: _Spec):
        comm, eng = spec.comm, spec.engine
        cd = loss_cpu.compute_dtype(x.dtype)
        xc, yc = x.to(cd), y.to(cd)
        n, m = x.shape[0], y.shape[0]
        yg = comm.gather(y, spec.sizes_t)
        cnt_t = torch.bincount(spec.gt_all, minlength=spec.groups)
        cnt_i = torch.bincount(spec.gi_all, minlength=spec.groups)
        p_loc, q_loc = cnt_t[spec.gi], cnt_i[spec.gt]   # positives of each local image / text
        s64 = scale.to(F64)
        # [G, D]: each group's texts, summed (the diagonal: the texts themselves, no copies)
        ysum = None if spec.diagonal else _gsum(spec, spec.gt, yc)
        pos_r = rowdot(xc, yc if spec.diagonal else ysum[spec.gi]) * s64  # sum over i's positives of t_ij
        ll = spec.local_loss
        if spec.kind == "softmax":
            xsum = None if spec.diagonal else _gsum(spec, spec.gi, xc)
            pos_c = pos_r if spec.diagonal else rowdot(yc, xsum[spec.gt]) * s64
            q_all = cnt_i[spec.gt_all]
            valid_r, valid_c, valid_call = p_loc > 0, q_loc > 0, q_all > 0
            nv, mv = int((cnt_t[spec.gi_all] > 0).sum()), int(valid_call.sum())
            if nv == 0 or mv == 0:
                raise ValueError("positives: no image id matches any text id")
            if ll:  # each rank's own rows, each column by its owner's count
                w = valid_r.to(F64) * (0.5 / max(int(valid_r.sum()), 1))
                mv_rank = comm.gather(valid_c.sum().reshape(1), [1] * comm.world).to(F64)
                owner = torch.repeat_interleave(torch.arange(comm.world, device=x.device),
                                                torch.tensor(spec.sizes_t, device=x.device))
                v_all = valid_call.to(F64) * 0.5 / mv_rank[owner].clamp(min=1)
            else:
                w = valid_r.to(F64) * (0.5 / nv)
                v_all = valid_call.to(F64) * (0.5 / mv)
            off = spec.text_offset
            v = v_all[off: off + m]
            hard = spec.beta > 0
            rows, cols = _softmax_stats(eng, x, yg, scale, spec.gi if hard else None,
                                        spec.gt_all if hard else None, spec.beta, spec.tile)
            cols = comm.lse(cols)
            nneg_r, nneg_c = yg.shape[0] - p_loc, spec.gi_all.numel() - q_all
            logd_r, logt_r = log_d(rows, nneg_r)
            logd_c, logt_c = log_d(cols, nneg_c)
            local = softmax_terms(logd_r, pos_r, p_loc, w) + \
                softmax_terms(logd_c[off: off + m], pos_c, q_loc, v)
            ctx.shifts = (shifts(rows, logd_r, logt_r, w, nneg_r), shifts(cols, logd_c, logt_c, v_all, nneg_c))
            ctx.a, ctx.b = w / p_loc.clamp(min=1), v / q_loc.clamp(min=1)
            ctx.sums = (ysum, xsum)
        else:
            n_all = spec.gi_all.numel()
            coef = (1.0 / n if n else 0.0) if ll else 1.0 / n_all
            npos = p_loc.sum().to(F64)
            pair = _sigmoid_sum(eng, x, yg, scale, bias, spec.tile)
            local = coef * (pair - pos_r.sum() - bias.to(F64) * npos)
            ctx.coef, ctx.npos = coef, npos
            ctx.sums = (ysum,)
        loss = local if ll else comm.sum(local)
        ctx.spec, ctx.cd = spec, cd
        ctx.save_for_backward(x, y, yg, scale, bias)
        return loss.to(cd)

    @staticmethod
    def _backward(ctx, grad_out):
        x, y, yg, scale, bias = ctx.saved_tensors
        spec, cd = ctx.spec, ctx.cd
        comm, eng = spec.comm, spec.engine
        xc, yc = x.to(cd), y.to(cd)
        s = scale.to(cd)
        off = spec.text_offset
        loc = slice(off, off + y.shape[0])
        ysum = ctx.sums[0]
        ll, gg = spec.local_loss, spec.gather_with_grad
        gbias = None
        if spec.kind == "softmax":
            xsum = ctx.sums[1]
            a, b = ctx.a.to(cd), ctx.b.to(cd)
            hard = spec.beta > 0
            gi, gt = (spec.gi, spec.gt_all) if hard else (None, None)
            rs, cs = ctx.shifts
            # the positive part's gradients: query side (a row's own term) and key side
            if not spec.diagonal:
                qx = ysum[spec.gi].mul_(a[:, None])                 # x_i in its row term
                qy = xsum[spec.gt].mul_(b[:, None])                 # y_j in its column term
            if spec.diagonal:  # x_i's positive-part gradient is y_i (a_i + b_i), y_i's x_i (a_i + b_i)
                gx, gy = _softmax_grads(eng, x, yg, scale, gi, gt, spec.beta, rs, cs, spec.tile)
                ab = (a + b)[:, None]
                gx = gx.to(cd).sub_(yc * ab)
                gy = gy.to(cd).sub_(xc * (ab * s))
                gscale = rowdot(xc, gx).sum()
                grad_x, grad_y = gx.mul_(s), gy
            elif not ll:
                gx, gy = _softmax_grads(eng, x, yg, scale, gi, gt, spec.beta, rs, cs, spec.tile)
                gx = gx.to(cd).sub_(qx).sub_(_gsum(spec, spec.gt, yc, b)[spec.gi])
                gy = comm.sum(gy.to(cd))[loc].sub_((qy + _gsum(spec, spec.gi, xc, a)[spec.gt]) * s)
                gscale = comm.sum(rowdot(xc, gx).sum())
                grad_x, grad_y = gx.mul_(s), gy
            else:
                # two passes: the row part (texts as keys) and the column part (images as
                # keys, y pre-scaled so that its G.T @ x comes back unscaled)
                inf_c, inf_r = torch.full_like(cs, float("inf")), torch.full_like(rs, float("inf"))
                gxa, gya = _softmax_grads(eng, x, yg, scale, gi, gt, spec.beta, rs, inf_c, spec.tile)
                gxb, gyb = _softmax_grads(eng, x, (yg.to(cd) * s).to(yg.dtype), torch.ones_like(scale),
                                          gi, gt, spec.beta, inf_r, cs, spec.tile)
                m_all = yg.shape[0]
                red = comm.sum(torch.cat([gyb.to(cd), gya.to(cd)]) if gg else gyb.to(cd))
                gxq = gxa.to(cd).sub_(qx)                           # unscaled query gradients
                gyq = red[:m_all][loc].sub_(qy)
                gscale = rowdot(xc, gxq).sum() + rowdot(yc, gyq).sum()
                grad_x, grad_y = gxq * s, gyq * s
                if gg:
                    grad_x += gxb.to(cd) - _gsum(spec, spec.gt, yc, b)[spec.gi] * s
                    grad_y += red[m_all:][loc] - _gsum(spec, spec.gi, xc, a)[spec.gt] * s
        else:
            gx, gy, gsum = _sigmoid_grads(eng, x, yg, scale, bias, ctx.coef, spec.tile)
            if spec.diagonal:
                gx = gx.to(cd).sub_(yc * ctx.coef)
                gy = gy.to(cd).sub_(xc * (ctx.coef * s))
            else:
                gx = gx.to(cd).sub_(ysum[spec.gi].mul_(ctx.coef))
                gy = comm.sum(gy.to(cd))[loc].sub_(_gsum(spec, spec.gi, xc * ctx.coef)[spec.gt].mul_(s))
            gscale, gbias = rowdot(xc, gx).sum(), gsum - ctx.coef * ctx.npos
            if not ll:
                gscale, gbias = comm.sum(gscale), comm.sum(gbias)
            grad_x, grad_y = gx.mul_(s), gy
        if gg and not ll:  # every rank's copy of the global loss sends its gradient home
            grad_x, grad_y = grad_x * comm.world, grad_y * comm.world
        g = grad_out.to(F64)
        gcd = grad_out.to(cd)
        grad_bias = torch.zeros_like(bias) if gbias is None else (g * gbias).to(bias.dtype).reshape(bias.shape)
        return ((grad_x * gcd).to(x.dtype), (grad_y * gcd).to(y.dtype),
                (g * gscale).to(scale.dtype).reshape(scale.shape), grad_bias, None)


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
    # 0-d whatever its shape ([1] from open_clip's nonscalar_logit_scale): the loss is 0-d,
    # and autograd hands the gradient back in the caller's shape
    return v.reshape(())


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
                      kind: str = "softmax", chunk_size=None, group=None, local_loss: bool = False,
                      gather_with_grad: bool = False, backend: str = "auto") -> torch.Tensor:
    """Symmetric CLIP (or SigLIP) loss without materialising the ``N x M`` logits.

    Args:
        image_emb: ``[N, D]`` float16 / bfloat16 / float32 / float64 (not normalised here).
        text_emb: ``[M, D]``, same dtype and device.
        logit_scale: number or one-element tensor (any shape, e.g. ``[1]``), already
            exponentiated (open_clip passes ``model.logit_scale.exp()``); gets a gradient when
            it requires one.
        logit_bias: optional number or one-element tensor added to every logit (SigLIP).
        positives: ``None`` pairs image ``i`` with text ``i`` (needs ``N == M``), or
            ``(image_ids [N], text_ids [M])`` integer tensors: every pair with equal ids is a
            positive (rows with no positive are left out of the softmax means).
        hard_negative_beta: HN-NCE ``beta >= 0`` (softmax only); 0 is plain InfoNCE.
        kind: ``"softmax"`` (CLIP) or ``"sigmoid"`` (SigLIP, ``open_clip.SigLipLoss``).
        chunk_size: logits tile ``int`` or ``(rows, cols)`` (cpu backend; the triton backend
            uses it as the rows of its backward buffer). ``None``: automatic.
        group: a ``torch.distributed`` process group; each rank passes its own shard (and its
            shard's ids). No rank holds the global logits. A rank's shard may have zero rows
            (the others not all); an empty global batch raises on every rank.
        local_loss: with a group of 2+ ranks, ``open_clip.ClipLoss``'s ``local_loss``: False,
            every rank's loss is the global batch's; True, a rank's loss takes only its own
            images (texts) as queries against every text (image), averaged over its own rows.
        gather_with_grad: with a group of 2+ ranks, ``open_clip``'s ``gather_with_grad``: False,
            a rank's gradients come from its own loss only (with ``local_loss`` only through
            its own rows as queries); True, every rank's loss sends its gradient to the
            features' owner, so the features get the gradient of the sum of the ranks' losses
            (with ``local_loss=False``: ``world_size`` x the global loss's) and DDP's average
            is the global batch's gradient. ``logit_scale`` / ``logit_bias`` always get the
            gradient of this rank's loss. ``kind="sigmoid"`` with ``local_loss`` needs it
            (``open_clip.SigLipLoss`` is ``local_loss=True, gather_with_grad=True``).
        backend: ``"auto"``, ``"torch-full"``, ``"torch-tiled"`` (alias ``"cpu"``),
            ``"triton"`` or ``"reference"``; see :data:`BACKENDS`. ``auto`` takes the full
            logits in one process while ``N * M <= FULL_LOGITS_MAX``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), also under autocast: the loss of this
        rank (identical on every rank unless ``local_loss``).
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
    for name, flag in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_OP}: {name} must be True or False, got {flag!r}")
    beta = hard_negative_beta
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"{_OP}: hard_negative_beta must be a finite number >= 0, got {beta!r}")
    beta = float(beta)
    if beta > 0 and kind != "softmax":
        raise ValueError(f"{_OP}: hard_negative_beta applies to kind='softmax' only")
    if kind == "sigmoid" and local_loss and not gather_with_grad:
        raise ValueError(f"{_OP}: kind='sigmoid' with local_loss=True needs gather_with_grad=True (the "
                         "texts enter the sigmoid loss as keys only and would get no gradient; "
                         "open_clip.SigLipLoss is local_loss=True, gather_with_grad=True)")
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
    if backend == "auto" and group is None and chunk_size is None and n * m <= FULL_LOGITS_MAX.get(device.type, 0):
        chosen = "torch-full"
    else:
        chosen = BACKENDS.resolve(backend, device)
    if chosen in ("reference", "torch-full"):
        if group is not None:
            raise ValueError(f"{_OP}: backend={chosen!r} has no distributed path; use 'torch-tiled' or 'triton'")
        if positives is None and n != m:
            raise ValueError(f"{_OP}: positives=None pairs image i with text i and needs N == M, got "
                             f"N={n}, M={m}; pass positives=(image_ids, text_ids)")
        with _no_autocast(device):
            if chosen == "reference":
                return clip_loss_reference(image_emb, text_emb, scale, bias, positives=positives,
                                           hard_negative_beta=beta, kind=kind)
            bias_t = torch.zeros((), dtype=torch.float32, device=device) if bias is None else bias
            return full_clip_loss(image_emb, text_emb, scale, bias_t, kind=kind, beta=beta, ids=positives)
    tile = _tile(chunk_size, chosen, n, m, image_emb.element_size())
    if group is None:
        comm = _LocalComm()
    else:
        from regionmed_fast.ops.loss_distributed import GroupComm

        comm = GroupComm(group, device)
    gi, gt, gi_all, gt_all, groups, sizes_i, sizes_t = _group_ids(positives, n, m, comm, device)
    if bias is None:
        bias_t = torch.zeros((), dtype=torch.float32, device=device)
    else:
        bias_t = bias
    multi = comm.world > 1
    spec = _Spec(kind, beta, _engine(chosen), tile, comm, gi, gt, gi_all, gt_all, groups,
                 sizes_i, sizes_t, local_loss and multi, gather_with_grad and multi,
                 diagonal=positives is None and not multi)
    return _ClipLossFn.apply(image_emb.contiguous(), text_emb.contiguous(), scale, bias_t, spec)


def _group_ids(positives, n: int, m: int, comm, device: torch.device):
    """Compact group ids ``0..G-1`` for local and global images and texts, and every rank's
    ``(n, m)``."""
    sizes_i, sizes_t = comm.rank_sizes(n, m)
    n_tot, m_tot = sum(sizes_i), sum(sizes_t)
    if n_tot == 0 or m_tot == 0:  # every rank sees the same totals, so every rank raises
        raise ValueError(f"{_OP}: the global batch is empty (N={n_tot} images, M={m_tot} texts "
                         "over all ranks)")
    off_i, off_t = sum(sizes_i[: comm.rank]), sum(sizes_t[: comm.rank])
    if positives is None:
        if n_tot != m_tot:
            raise ValueError(f"{_OP}: positives=None pairs image i with text i and needs N == M, got "
                             f"N={n_tot}, M={m_tot}; pass positives=(image_ids, text_ids)")
        ids = torch.arange(n_tot, device=device)
        return ids[off_i: off_i + n], ids[off_t: off_t + m], ids, ids, n_tot, sizes_i, sizes_t
    ii_all, tt_all = comm.gather(positives[0], sizes_i), comm.gather(positives[1], sizes_t)
    uniq, inv = torch.unique(torch.cat([ii_all, tt_all]), return_inverse=True)
    gi_all, gt_all = inv[: ii_all.numel()], inv[ii_all.numel():]
    return (gi_all[off_i: off_i + n], gt_all[off_t: off_t + m], gi_all, gt_all, uniq.numel(),
            sizes_i, sizes_t)
