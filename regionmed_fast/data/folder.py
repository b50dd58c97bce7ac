"""The CPU path over a dataset folder: global micro-batch ``j`` (data/order.py) built by
:class:`regionmed_fast.data.batch.SampleMaker` in torch DataLoader worker processes
(persistent across epochs, ``prefetch_factor`` batches each in flight), uint8 images across
the process boundary (4x fewer bytes than float32); the loader normalises and tokenises in the
main process.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from regionmed_fast.errors import UserError

from .batch import SampleMaker
from .order import Schedule
from .records import RecordStore


def as_is(batch):
    """DataLoader's collate for ready batches (its default would turn tuples into lists)."""
    return batch


class _Span(Sampler):
    """The micro-batch indices of the current :meth:`FolderSource.raw` call (read by the
    DataLoader in the main process each time it starts iterating)."""

    def __init__(self):
        self.start = self.stop = 0

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class BatchDataset(Dataset):
    """``ds[j]``: this rank's uint8 batch of global micro-batch ``j``. A user error (a bad record
    without ``skip_bad``) comes back as ``{"_raise": error}`` so the main process raises the
    same one-line error instead of DataLoader's wrapped traceback."""

    def __init__(self, store: RecordStore, schedule: Schedule, maker: SampleMaker):
        self.store, self.schedule, self.maker = store, schedule, maker

    def __len__(self) -> int:
        return 1 << 62  # indexed by global micro-batch, across epochs

    def __getitem__(self, j: int) -> dict:
        try:
            pos = self.schedule.indices(j)
            epoch = self.schedule.epoch_of(j)[0]
            return self.maker.batch([self.store[i] for i in pos], epoch, pos)
        except UserError as exc:
            return {"_raise": exc}


class FolderSource:
    """Batches of a packed record list for one rank (see the module docstring)."""

    backend = "cpu"

    def __init__(self, store: RecordStore, schedule: Schedule, maker: SampleMaker, *,
                 num_workers: int = 2, prefetch_factor: int = 2, pin_memory: bool = False):
        self.schedule = schedule
        self.batches_per_epoch = schedule.batches_per_epoch
        self.dataset = BatchDataset(store, schedule, maker)
        self.num_workers = num_workers
        self._span = _Span()
        self._dl = None
        if num_workers > 0:
            self._dl = DataLoader(self.dataset, batch_size=None, sampler=self._span,
                                  collate_fn=as_is, num_workers=num_workers, persistent_workers=True,
                                  prefetch_factor=prefetch_factor, pin_memory=pin_memory)

    def epoch_batches(self, epoch: int) -> int:
        return self.batches_per_epoch

    def locate(self, j: int) -> tuple[int, int]:
        return self.schedule.epoch_of(j)

    def raw(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """``(j, uint8 batch)`` for ``start <= j < stop``."""
        if self._dl is None:
            for j in range(start, stop):
                yield j, self.dataset[j]
            return
        self._span.start, self._span.stop = start, stop
        yield from zip(range(start, stop), self._dl)

    def close(self) -> None:
        it = getattr(self._dl, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
            self._dl._iterator = None
