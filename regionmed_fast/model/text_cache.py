"""A cache of a frozen text tower's pooled outputs, one entry per distinct token sequence.

A frozen tower (every parameter ``requires_grad=False``) maps a text to one vector, so each
text needs encoding once per run. Entries are dropped whenever the tower's weights change
(in-place updates or loads are seen through the parameters' version counters). Misses run the
tower with dropout off, so a cached and an uncached call agree.
"""
from __future__ import annotations

import torch
from torch import nn


class TextFeatureCache:
    """``cache.features(tower, ids, mask)`` -> the tower's output ``[T, width]`` float32."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[bytes, torch.Tensor] = {}
        self._version = -1

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def applies_to(tower: nn.Module) -> bool:
        """True while every parameter of ``tower`` is frozen."""
        return not any(p.requires_grad for p in tower.parameters())

    def _check_version(self, tower: nn.Module) -> None:
        version = sum(p._version for p in tower.parameters())
        if version != self._version:
            self._entries.clear()
            self._version = version

    @torch.no_grad()
    def features(self, tower: nn.Module, ids: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """ids / mask int64 [T, L] -> float32 [T, width] on ``ids.device``."""
        self._check_version(tower)
        mask = torch.ones_like(ids) if mask is None else mask
        lengths = mask.sum(1).tolist()
        rows = ids.cpu().numpy()
        keys = [rows[i, :n].tobytes() for i, n in enumerate(lengths)]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self._entries:
                first.setdefault(k, i)  # duplicates in a batch are encoded once
        fresh: dict[bytes, torch.Tensor] = {}
        if first:
            miss = list(first.values())
            was = tower.training
            tower.eval()
            try:
                L = max(lengths[i] for i in miss)
                sel = torch.tensor(miss, device=ids.device)
                new = tower(ids[sel, :L], mask[sel, :L]).float()
            finally:
                tower.train(was)
            fresh = dict(zip(first, new))
            if len(self._entries) < self.max_entries:
                self._entries.update(fresh)
        # .to(device): an entry may predate a model.to(...) move
        return torch.stack([fresh[k] if k in fresh else self._entries[k].to(ids.device)
                            for k in keys])
