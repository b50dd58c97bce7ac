"""The ``torch-full`` backend of the chunked CLIP loss: the whole ``N x M`` logits at once.

For small batches the tiles' bookkeeping costs more than the logits save: here one GEMM makes
the logits, the statistics and ``G = dL/dt`` are whole-matrix passes, and two GEMMs give the
gradients (open_clip's ``ClipLoss`` makes the logits twice and runs four backward GEMMs). The
positives are subtracted from ``G`` element by element, as autograd does for open_clip, so a
confident row's small gradient is not the difference of two large ones. Same math and
conventions as ``ops/loss.py`` (multi-positives, HN-NCE, sigmoid); one process only.
``ops/loss.py: FULL_LOGITS_MAX`` says when ``auto`` takes this path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from regionmed_fast.ops import loss_cpu
from regionmed_fast.ops.loss_math import F64, log_d, rowdot, shifts, softmax_terms

_HALF = (torch.float16, torch.bfloat16)


def _mm(a: torch.Tensor, b: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``cd``; on CUDA, half inputs run a half GEMM with a float32 result."""
    if a.is_cuda and b.dtype in _HALF:
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    return torch.mm(a.to(cd), b.to(cd))


def _positives(n: int, m: int, ids, device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(mask [n, m] or None for the diagonal, positives per row [n], per column [m])``."""
    if ids is None:
        one = torch.ones(n, dtype=torch.long, device=device)
        return None, one, one
    pos = ids[0][:, None] == ids[1][None, :]
    return pos, pos.sum(1), pos.sum(0)


def _pos_sums(t: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if pos is None:
        d = t.diagonal().to(F64)
        return d, d
    tp = torch.where(pos, t, torch.zeros((), dtype=t.dtype, device=t.device))
    return tp.sum(1, dtype=F64), tp.sum(0, dtype=F64)


def _softmax_g(t: torch.Tensor, mask: torch.Tensor | None, ctx) -> torch.Tensor:
    """``G = dL/dt`` with the positives subtracted element by element.

    Plain InfoNCE: per direction ``(softmax - positives / n_pos)`` times the row's weight, so a
    confident row's ``P_ii - 1`` is formed before any weighting (exactly 0 where ``P_ii`` rounds
    to 1, as in open_clip). HN-NCE: the engines' formula, then the positives' weights.
    """
    cd = t.dtype
    (w, v), (p, q) = ctx.w, ctx.npos
    zero = torch.zeros((), dtype=cd, device=t.device)
    if ctx.beta == 0.0:
        out = []
        for shift, npos, wt, dim in ((ctx.shifts[0], p, w, 1), (ctx.shifts[1], q, v, 0)):
            hl = loss_cpu.split_shift(shift, cd)
            idx = (slice(None), None) if dim == 1 else (None, slice(None))
            e = loss_cpu.exp_shifted(t, *loss_cpu.shift_slices(hl, idx)[0], torch.empty_like(t))
            inv = (1.0 / npos.clamp(min=1).to(F64)).to(cd)
            if mask is None:
                e.diagonal().sub_(inv)
            else:
                e.sub_(torch.where(mask, inv[idx], zero))
            out.append(e.mul_(wt.to(cd)[idx]))
        return out[0].add_(out[1])
    rs, cs = (loss_cpu.split_shift(sh, cd) for sh in ctx.shifts)
    g = loss_cpu.tile_softmax_grad(t, loss_cpu.shift_slices(rs, (slice(None), None)),
                                   loss_cpu.shift_slices(cs, (None, slice(None))), mask, ctx.beta,
                                   torch.empty_like(t), torch.empty_like(t))
    a, b = (w / p.clamp(min=1)).to(cd), (v / q.clamp(min=1)).to(cd)
    return g.sub_(torch.where(mask, a[:, None] + b[None, :], zero))


class FullLossFn(torch.autograd.Function):
    """``forward(x [N, D], y [M, D], scale 0-d, bias 0-d, kind, beta, ids)`` -> 0-d loss."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, kind: str, beta: float, ids):
        cd = loss_cpu.compute_dtype(x.dtype)
        n, m = x.shape[0], y.shape[0]
        t = _mm(x, y.T, cd).mul_(scale.to(cd))
        pos, p, q = _positives(n, m, ids, x.device)
        ctx.kind, ctx.beta, ctx.cd = kind, beta, cd
        if kind == "sigmoid":
            # -log sigmoid(z t) = softplus(-z t): negate the positives, then one softplus pass
            u = t.add_(bias.to(cd))
            if pos is None:
                u.diagonal().neg_()
            else:
                u = torch.where(pos, -u, u)
            ctx.save_for_backward(x, y, scale, bias, u, pos)
            return (F.softplus(u).sum(dtype=F64) / n).to(cd)
        valid_r, valid_c = p > 0, q > 0
        nv, mv = int(valid_r.sum()), int(valid_c.sum())
        if nv == 0 or mv == 0:
            raise ValueError("chunked_clip_loss: positives: no image id matches any text id")
        w, v = valid_r.to(F64) * (0.5 / nv), valid_c.to(F64) * (0.5 / mv)
        buf = torch.empty_like(t)
        hard = beta > 0
        mask = pos if pos is not None or not hard else torch.eye(n, dtype=torch.bool, device=x.device)
        if hard:
            neg = ~mask
            parts = ((t, mask), (t * (1.0 + beta), neg), (t * beta, neg))
            rows = torch.stack([loss_cpu.tile_lse(v_, buf, 1, k) for v_, k in parts])
            cols = torch.stack([loss_cpu.tile_lse(v_, buf, 0, k) for v_, k in parts])
        else:
            rows, cols = loss_cpu.tile_lse(t, buf, 1)[None], loss_cpu.tile_lse(t, buf, 0)[None]
        nneg_r, nneg_c = m - p, n - q
        logd_r, logt_r = log_d(rows, nneg_r)
        logd_c, logt_c = log_d(cols, nneg_c)
        pos_r, pos_c = _pos_sums(t, pos)
        loss = softmax_terms(logd_r, pos_r, p, w) + softmax_terms(logd_c, pos_c, q, v)
        if hard:
            ctx.shifts = (shifts(rows, logd_r, logt_r, w, nneg_r), shifts(cols, logd_c, logt_c, v, nneg_c))
        else:
            ctx.shifts = (logd_r[None], logd_c[None])
        ctx.w, ctx.npos = (w, v), (p, q)
        ctx.save_for_backward(x, y, scale, bias, t, mask)
        return loss.to(cd)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, bias, t, mask = ctx.saved_tensors
        cd = ctx.cd
        s = scale.to(cd)
        gbias = None
        if ctx.kind == "sigmoid":
            g = torch.sigmoid(t)  # t holds u = -z t
            if mask is None:
                g.diagonal().neg_()
            else:
                g = torch.where(mask, -g, g)
            g.mul_(1.0 / x.shape[0])
            gbias = g.sum(dtype=F64)
        else:
            g = _softmax_g(t, mask, ctx)
        gx = _mm(g, y, cd)
        gy = _mm(g.T, x, cd).mul_(s)
        # dL/dscale = sum_ij G_ij <x_i, y_j> = sum_i <x_i, (G @ y)_i>
        gscale = rowdot(x.to(cd), gx).sum()
        go = grad_out.to(cd)
        grad_bias = None if gbias is None else (gbias * grad_out.to(F64)).to(bias.dtype).reshape(bias.shape)
        return (gx.mul_(s * go).to(x.dtype), gy.mul_(go).to(y.dtype),
                (gscale * grad_out.to(F64)).to(scale.dtype).reshape(scale.shape),
                grad_bias if grad_bias is not None else torch.zeros_like(bias), None, None, None)


def full_clip_loss(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *,
                   kind: str, beta: float, ids) -> torch.Tensor:
    """The loss of ``ops/loss.py`` over the full logits. ``scale`` / ``bias`` 0-d tensors,
    ``ids`` None (image i pairs with text i) or ``(image_ids [N], text_ids [M])``.
    Returns a 0-d tensor in the compute dtype (float32, float64 for float64 inputs)."""
    return FullLossFn.apply(x, y, scale, bias, kind, beta, ids)
