"""The sample order: which records global micro-batch ``j`` holds, on which rank.

The order of stage ``s``, epoch ``e`` is a permutation seeded by ``(seed, s, e)``
(:func:`epoch_order`); global micro-batch ``b`` of the epoch is ``order[b*G:(b+1)*G]`` with
``G = batch_size * world``, and rank ``r`` takes every ``world``-th element of it,
``glob[r::world]``. So the position in the data is just ``j`` (restored exactly on resume) and the
union of the ranks' batches is the one-process batch (2 processes equal 1). docs/design.md
section 5.4 and docs/data.md ("Loader contract") describe the contract built on it.
"""
from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, stage: int, epoch: int) -> torch.Tensor:
    """The order of ``n`` records in one epoch of one stage: int64 [n], the same on every rank
    and in every process."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + stage * 10_007 + epoch) % (2**63))
    return torch.randperm(n, generator=g)


class Schedule:
    """Global micro-batches of ``n`` records for one rank.

    ``batch_size`` is the per-rank batch; a global micro-batch holds ``batch_size * world``
    records. ``drop_last`` drops the epoch's last partial global batch (every step the same
    size: contrastive losses need it); ``shuffle=False`` keeps record order in every epoch.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int = 0, stage: int = 0, rank: int = 0,
                 world: int = 1, shuffle: bool = True, drop_last: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.n, self.batch_size, self.seed, self.stage = n, batch_size, seed, stage
        self.rank, self.world, self.shuffle, self.drop_last = rank, world, shuffle, drop_last
        self.global_batch = batch_size * world
        per = n // self.global_batch if drop_last else -(-n // self.global_batch)
        self.batches_per_epoch = per
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        """:func:`epoch_order` of ``epoch`` (the identity without shuffle); the last one is kept."""
        if self._order is None or self._order[0] != epoch:
            o = (epoch_order(self.n, self.seed, self.stage, epoch) if self.shuffle
                 else torch.arange(self.n))
            self._order = (epoch, o)
        return self._order[1]

    def epoch_of(self, j: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global micro-batch ``j``."""
        return divmod(int(j), self.batches_per_epoch)

    def global_indices(self, j: int) -> list[int]:
        """Every rank's record positions of global micro-batch ``j``."""
        epoch, b = self.epoch_of(j)
        G = self.global_batch
        return self.order(epoch)[b * G:(b + 1) * G].tolist()

    def indices(self, j: int) -> list[int]:
        """This rank's record positions of global micro-batch ``j``."""
        return self.global_indices(j)[self.rank::self.world]
