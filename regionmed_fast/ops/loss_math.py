"""Per-row bookkeeping shared by the tiled (``ops/loss.py``) and full-logits (``ops/loss_full.py``)
paths of the chunked CLIP loss: ``log D`` from the log-sum-exp statistics, the backward shifts,
and row dot products. All of it is ``O(N + M)`` (or ``O((N + M) D)``) and runs in float64.
"""
from __future__ import annotations

import torch

F64 = torch.float64


def log_d(stats: torch.Tensor, nneg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log D, log T)`` per row from ``[k, n]`` statistics (``log T``: HN-NCE's negatives' mass).

    ``k = 1``: the log-sum-exp of the row is ``log D``. ``k = 3`` (HN-NCE): LSE over positives
    of ``t``, over negatives of ``(1+b) t`` and of ``b t``;
    ``D = sum_pos e^t + n_neg * sum_neg e^{(1+b)t} / sum_neg e^{bt}``.
    """
    if stats.shape[0] == 1:
        return stats[0], stats[0]
    ninf = torch.full_like(stats[0], float("-inf"))
    log_t = torch.where(nneg > 0, torch.log(nneg.clamp(min=1).to(stats.dtype)) + stats[1] - stats[2], ninf)
    return torch.logaddexp(stats[0], log_t), log_t


def shifts(stats: torch.Tensor, logd: torch.Tensor, log_t: torch.Tensor, w: torch.Tensor,
           nneg: torch.Tensor) -> torch.Tensor:
    """``[k, n]`` shifts ``a`` such that a row's ``dL/dt`` is a sum of ``exp(c t - a)`` terms.

    ``w``: the row's weight in the loss (0: the row takes no part, shift ``+inf``). See
    ``loss_cpu.softmax_grads`` for how the engines use them.
    """
    inf = torch.full_like(logd, float("inf"))
    log_w = torch.where(w > 0, torch.log(w.clamp(min=1e-300)), -inf)
    s0 = torch.where(w > 0, logd - log_w, inf)
    if stats.shape[0] == 1:
        return s0[None]
    ok = (w > 0) & (nneg > 0)
    rest = logd - log_w - torch.where(ok, log_t, torch.zeros_like(log_t))
    s1 = torch.where(ok, stats[1] + rest, inf)
    s2 = torch.where(ok, stats[2] + rest, inf)
    return torch.stack([s0, s1, s2])


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 ``<a_i, b_i>`` (products in the inputs' dtype, sums in float64)."""
    return (a * b.to(a.dtype)).sum(1, dtype=F64)


def softmax_terms(logd: torch.Tensor, pos_sum: torch.Tensor, npos: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i (log D_i - pos_sum_i / npos_i)`` over the rows with ``w_i > 0`` (0-d float64).

    Each row's difference is taken before the sum: summing ``log D`` and the positive logits
    separately would cancel ``N |t|``-sized totals instead of ``|t|``-sized terms.
    """
    terms = torch.where(w > 0, logd - pos_sum / npos.clamp(min=1).to(F64), torch.zeros_like(logd))
    return (w * terms).sum()
