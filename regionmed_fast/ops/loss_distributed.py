"""The collectives the chunked CLIP loss needs over a ``torch.distributed`` process group.

Each rank holds its own ``n_r`` images and ``m_r`` texts (sizes may differ between ranks).
The loss all-gathers the texts (``M x D``, like OpenCLIP) and computes the logits of its own
rows against every column, tile by tile: the row statistics are complete locally, the column
statistics are merged across ranks as log-sum-exps (``[k, M]`` floats), the texts' gradient
partial sums are all-reduced, and the per-group embedding sums of the multi-positive term are
all-reduced. No rank ever holds more than one tile of the ``N x M`` logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["GroupComm"]


class GroupComm:
    """Collectives over ``group``; the single-process twin is ``loss._LocalComm``."""

    def __init__(self, group, device: torch.device) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("chunked_clip_loss: group= given but torch.distributed is not initialised")
        self.group = group
        self.device = device
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def rank_sizes(self, n: int, m: int) -> tuple[list[int], list[int]]:
        """Every rank's ``n`` and ``m`` (one collective)."""
        mine = torch.tensor([n, m], dtype=torch.int64, device=self.device)
        out = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [int(o[0]) for o in out], [int(o[1]) for o in out]

    def gather(self, t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0 (first dims may differ: ``sizes``, every
        rank's, asked for when not given), without grad."""
        if sizes is None:
            sizes = self.rank_sizes(t.shape[0], 0)[0]
        big = max(sizes)
        pad = t.new_zeros((big,) + tuple(t.shape[1:]))
        pad[: t.shape[0]] = t.detach()
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def lse(self, t: torch.Tensor) -> torch.Tensor:
        """Log-sum-exp across ranks of same-shape partial statistics."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.logsumexp(torch.stack(parts), dim=0)
