"""Plain PyTorch CLIP / SigLIP loss over the full ``N x M`` logits: the ground truth.

Every other backend of :func:`regionmed_fast.ops.chunked_clip_loss` is tested against
:func:`clip_loss_reference`. It is written for clarity, not speed: it materialises the logits
and the positive mask and lets autograd do the backward pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["clip_loss_reference", "positive_mask"]


def positive_mask(n: int, m: int, positives, device: torch.device) -> torch.Tensor:
    """``[n, m]`` bool: ``True`` where image ``i`` and text ``j`` are a positive pair.

    ``positives=None`` is the diagonal (needs ``n == m``); otherwise a pair
    ``(image_ids [n], text_ids [m])`` of integer tensors where equal ids are positives.
    """
    if positives is None:
        if n != m:
            raise ValueError(f"positives=None pairs image i with text i and needs N == M, got N={n}, M={m}")
        return torch.eye(n, dtype=torch.bool, device=device)
    image_ids, text_ids = positives
    return image_ids.to(device).view(-1, 1) == text_ids.to(device).view(1, -1)


def _row_terms(s: torch.Tensor, pos: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ``log D_i - mean_{j in P(i)} s_ij`` and whether the row has a positive."""
    npos = pos.sum(1)
    valid = npos > 0
    if beta == 0.0:
        log_d = torch.logsumexp(s, 1)
    else:
        neg = ~pos
        nneg = neg.sum(1)
        ninf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
        lse_pos = torch.logsumexp(torch.where(pos, s, ninf), 1)
        lse_b = torch.logsumexp(torch.where(neg, (1.0 + beta) * s, ninf), 1)
        lse_c = torch.logsumexp(torch.where(neg, beta * s, ninf), 1)
        # HN-NCE: the negatives' mass is (n_neg) * sum_neg e^{(1+b)s} / sum_neg e^{b s}
        hard = torch.where(nneg > 0, torch.log(nneg.clamp(min=1).to(s.dtype)) + lse_b - lse_c, ninf)
        log_d = torch.logaddexp(lse_pos, hard)
    mean_pos = torch.where(pos, s, torch.zeros_like(s)).sum(1) / npos.clamp(min=1).to(s.dtype)
    return log_d - mean_pos, valid


def clip_loss_reference(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                        logit_bias=None, *, positives=None, hard_negative_beta: float = 0.0,
                        kind: str = "softmax") -> torch.Tensor:
    """CLIP (``kind="softmax"``) or SigLIP (``kind="sigmoid"``) loss from the full logits.

    ``image_emb [N, D]``, ``text_emb [M, D]`` (any float dtype; computed in float32, or float64
    for float64 inputs); ``logit_scale`` and ``logit_bias`` are numbers or one-element tensors
    (already exponentiated, as open_clip passes them). ``s = logit_scale * image @ text.T + bias``.

    softmax: ``1/2 [mean_i (LSE_j s_ij - mean_{P(i)} s_ij) + mean_j (LSE_i s_ij - mean_{P(j)} s_ij)]``
    over the rows (columns) that have at least one positive; with ``hard_negative_beta > 0`` the
    LSE becomes HN-NCE's ``log(sum_P e^s + n_neg * sum_neg e^{(1+b)s} / sum_neg e^{bs})``.
    sigmoid: ``-1/N sum_ij log sigmoid(z_ij s_ij)`` with ``z = +1`` on positives, ``-1`` elsewhere.
    Returns a 0-d tensor in the compute dtype.
    """
    cd = torch.float64 if image_emb.dtype == torch.float64 else torch.float32
    x, y = image_emb.to(cd), text_emb.to(cd)
    scale = logit_scale.to(cd).reshape(()) if torch.is_tensor(logit_scale) else logit_scale
    s = scale * (x @ y.T)
    if logit_bias is not None:
        s = s + (logit_bias.to(cd).reshape(()) if torch.is_tensor(logit_bias) else logit_bias)
    pos = positive_mask(x.shape[0], y.shape[0], positives, s.device)
    if kind == "sigmoid":
        z = pos.to(cd) * 2.0 - 1.0
        return -F.logsigmoid(z * s).sum() / x.shape[0]
    if kind != "softmax":
        raise ValueError(f"kind must be 'softmax' or 'sigmoid', got {kind!r}")
    beta = float(hard_negative_beta)
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"hard_negative_beta must be a finite number >= 0, got {hard_negative_beta!r}")
    rows, rvalid = _row_terms(s, pos, beta)
    cols, cvalid = _row_terms(s.T, pos.T, beta)
    if not bool(rvalid.any()) or not bool(cvalid.any()):
        raise ValueError("positives: no image id matches any text id")
    return 0.5 * (rows[rvalid].mean() + cols[cvalid].mean())
