"""Full-logits CLIP loss with the signature of ``regionmed_fast.ops.chunked_clip_loss``.

Used by the trainer only while the fused op is absent from the install (it holds the N x M
logits, so it is for small batches). Distributed: embeddings are all-gathered with gradient
(rows of different length per rank are padded, then dropped), as OpenCLIP does.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn

    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    pad = F.pad(x, (0, 0, 0, top - x.shape[0])) if x.dim() == 2 else F.pad(x, (0, top - x.shape[0]))
    with warnings.catch_warnings():  # deprecated in 2.14, still the autograd-aware gather in 2.11
        warnings.simplefilter("ignore", FutureWarning)
        parts = dnn.all_gather(pad, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)


def chunked_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor | None = None, *, positives=None,
                      hard_negative_beta: float = 0.0, kind: str = "softmax",
                      chunk_size: int | None = None, group=None, backend: str = "reference") -> torch.Tensor:
    """Symmetric InfoNCE with group-id positives and HN-NCE hard-negative weights (see DESIGN 3.3)."""
    del chunk_size, backend
    if kind != "softmax":
        raise NotImplementedError("the trainer's fallback loss implements kind='softmax' only")
    if group is not None:
        image_emb, text_emb = _gather(image_emb, group), _gather(text_emb, group)
        if positives is not None:
            positives = (_gather(positives[0], group), _gather(positives[1], group))
    n, m = image_emb.shape[0], text_emb.shape[0]
    s = logit_scale * image_emb @ text_emb.t()
    if logit_bias is not None:
        s = s + logit_bias
    if positives is None:
        if n != m:
            raise ValueError(f"diagonal positives need N == M, got {n} and {m}")
        pos = torch.eye(n, dtype=torch.bool, device=s.device)
    else:
        pos = positives[0][:, None] == positives[1][None, :]

    def side(sim: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        logits = sim
        if hard_negative_beta > 0:
            neg = ~p
            w = torch.softmax((hard_negative_beta * sim).masked_fill(p, float("-inf")), dim=1)
            w = w * neg.sum(1, keepdim=True)
            logits = torch.where(neg, sim + torch.log(w.clamp_min(1e-30)), sim)
        lse = torch.logsumexp(logits, dim=1)
        pos_mean = (sim * p).sum(1) / p.sum(1).clamp_min(1)
        return (lse - pos_mean).mean()

    return 0.5 * (side(s, pos) + side(s.t(), pos.t()))
