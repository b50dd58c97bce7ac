"""A least-recently-used cache bounded in bytes (the loader's optional decoded-sample cache).

One per process: each DataLoader worker holds its own, so the loader's total is the budget
times the number of processes that decode (docs/data.md, ``cache_mb``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

ENTRY_OVERHEAD = 512  # bytes of Python objects around each entry's arrays


def nbytes(value: Any) -> int:
    """Bytes held by ``value``: the arrays in it plus a fixed overhead per entry."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 64


class ByteLRU:
    """``get``/``put`` with at most ``budget`` bytes held; ``budget=0`` holds nothing."""

    def __init__(self, budget: int):
        self.budget, self.used = int(budget), 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        hit = self._items.get(key)
        if hit is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return hit[0]

    def put(self, key, value) -> None:
        size = nbytes(value) + ENTRY_OVERHEAD
        if size > self.budget or key in self._items:
            return
        while self.used + size > self.budget:
            _, (_, s) = self._items.popitem(last=False)
            self.used -= s
        self._items[key] = (value, size)
        self.used += size
